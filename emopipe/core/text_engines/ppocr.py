"""The fast text engine (`text_engine: ppocr`): PP-OCRv4's mobile detector and recognizer as ONNX, the files that ship inside the
`rapidocr-onnxruntime` wheel (no download, ever), run by onnxruntime; detection on every image, recognition
only on the boxes found.

Why this engine (measured here with `python -m emopipe.bench ocr --quality`: 120 crops of 15 real photos,
each clean and with text; one thread per worker): EasyOCR's CRAFT detector costs ~98 % of EasyOCR's time, and
CRAFT exported to ONNX gave identical decisions at only 1.4-3.5x less CPU (measured in issue 14). PP-OCRv4 at
512 px found 115/120 captions with 1/120 false positives at 0.058 CPU-s per image; EasyOCR at 384 px 117/120
and 0/120 at 0.62 CPU-s (fp32) or 0.16 (bf16). At 384 px PP-OCR missed small watermarks and bare text (108/120);
at 576-640 px it found 117/120 but read letters into cat's eyes and coins (5-6/120 false positives) at 1.5-2x
the CPU. So 512 px: within two captions of EasyOCR, 10x less CPU (EasyOCR stays the default until ppocr finds as
much; the misses are small text on a busy background that the detector's heat map does not light up). The direction classifier (180-degree text) is
not run: upside-down text is rare in photos, and the detector finds it either way.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path

import numpy as np

DEFAULT_OCR_SIZE = 512
# Images per padded detector pass on a GPU; not measured on a GPU yet (the detector's activations at
# 512 x 512 are a few hundred MB at most, so 32 fit in any data-centre GPU).
GPU_BATCH = 32
# A worker's peak resident memory: 0.2 GB once the reader is built, 0.4-0.9 GB peak over 240 photos of varied
# shapes (onnxruntime keeps buffers per input shape), measured with `python -m emopipe.bench ocr --quality`.
READER_BYTES = 2**30
DETECTOR_FILE = "ch_PP-OCRv4_det_infer.onnx"
RECOGNIZER_FILE = "ch_PP-OCRv4_rec_infer.onnx"
STRIDE = 32  # the detector's input sides must be multiples of this
# The detector's heat-map threshold and minimum box score (rapidocr's defaults: 0.3, 0.5). Lower ones found one
# more caption in 120 on the captioned-photo set (grass texture), with the same false positives.
HEATMAP_THRESHOLD, BOX_THRESHOLD = 0.2, 0.4


def model_path(file: str) -> Path:
    """A model file inside the installed rapidocr_onnxruntime package (found without importing it)."""
    spec = util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise RuntimeError("the ppocr text engine needs the rapidocr-onnxruntime package: pip install rapidocr-onnxruntime")
    return Path(spec.origin).parent / "models" / file


@lru_cache
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def default_device() -> str:
    """"cuda" when onnxruntime has its CUDA provider (the onnxruntime-gpu package), else "cpu"."""
    import onnxruntime

    return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


def default_precision(device: str) -> str:
    return "fp32"  # the ONNX files are fp32; onnxruntime runs them as they are on either device


def identity(ocr_size: int, device: str, precision: str, batched: bool = False) -> str:
    """The ocr_results key: library versions, both model files by name and content, input size, device,
    precision, and "-square" for the GPU path's padded batches (padding moves the detector's view of the
    bottom and right edges)."""
    models = "+".join(f"{Path(f).stem}.{_file_digest(model_path(f))}" for f in (DETECTOR_FILE, RECOGNIZER_FILE))
    return (f"ppocr-rapidocr_onnxruntime-{metadata.version('rapidocr-onnxruntime')}-onnxruntime-"
            f"{metadata.version('onnxruntime')}-{models}-db{HEATMAP_THRESHOLD}-{BOX_THRESHOLD}-{ocr_size}px-{device}-{precision}"
            + ("-square" if batched else ""))


class PpOcrReader:
    """PP-OCR detection + recognition with EasyOCR's reader interface (RGB uint8 in, [(corners, text,
    confidence)] out). Uses rapidocr_onnxruntime's detector post-processing, crops and CTC decoding, but
    feeds the detector itself: images padded (never stretched) to a multiple of 32, several per pass."""

    def __init__(self, device: str, threads: int):
        import cv2
        from rapidocr_onnxruntime import RapidOCR

        cv2.setNumThreads(threads)  # OpenCV's resize and warps: no threads beyond this process's share
        cuda = device == "cuda"
        self.ocr = RapidOCR(
            det_model_path=str(model_path(DETECTOR_FILE)), rec_model_path=str(model_path(RECOGNIZER_FILE)),
            intra_op_num_threads=threads, inter_op_num_threads=1, det_use_cuda=cuda, rec_use_cuda=cuda,
            det_thresh=HEATMAP_THRESHOLD, det_box_thresh=BOX_THRESHOLD,
            rec_batch_num=64 if cuda else 6, use_cls=False)
        provider = self.ocr.text_det.infer.session.get_providers()[0]
        if cuda and provider != "CUDAExecutionProvider":
            raise RuntimeError(f"device cuda asked for, but onnxruntime runs on {provider}: install onnxruntime-gpu "
                               "(in place of onnxruntime) for the GPU path")

    def readtext(self, pixels: np.ndarray) -> list[tuple[list, str, float]]:
        return self._read([pixels])[0]

    def readtext_batched(self, images: list[np.ndarray], batch_size: int) -> list[list[tuple[list, str, float]]]:
        """images of one shape (the stage pads them onto its square), batch_size per detector pass."""
        return [found for start in range(0, len(images), batch_size) for found in self._read(images[start:start + batch_size])]

    def _read(self, images: list[np.ndarray]) -> list[list[tuple[list, str, float]]]:
        height = -(-max(i.shape[0] for i in images) // STRIDE) * STRIDE
        width = -(-max(i.shape[1] for i in images) // STRIDE) * STRIDE
        canvas = np.zeros((len(images), height, width, 3), np.uint8)  # black at the right and bottom
        for n, pixels in enumerate(images):
            canvas[n, : pixels.shape[0], : pixels.shape[1]] = pixels[..., ::-1]  # PP-OCR reads BGR
        maps = self.ocr.text_det.infer(((canvas.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2))[0]
        boxes, crops = [], []
        for n in range(len(images)):
            found, _ = self.ocr.text_det.postprocess_op(maps[n : n + 1], (height, width))
            found = self.ocr.text_det.filter_tag_det_res(found, (height, width)) if len(found) else []
            boxes.append(found)
            crops += self.ocr.get_crop_img_list(canvas[n], list(found)) if len(found) else []
        texts = iter(self.ocr.text_rec(crops)[0] if crops else [])
        return [[(box.tolist(), *_text_and_confidence(next(texts))) for box in found] for found in boxes]


def _text_and_confidence(recognized: tuple) -> tuple[str, float]:
    return recognized[0], float(recognized[1])


def make_reader(device: str, work_dir: Path, precision: str = "fp32", threads: int = 1) -> PpOcrReader:
    """A reader on `device` with `threads` intra-op threads (work_dir: unused, PP-OCR writes nothing)."""
    if precision != "fp32":
        raise ValueError(f"the ppocr engine runs in fp32 only, not {precision!r}")
    return PpOcrReader(device, threads)
