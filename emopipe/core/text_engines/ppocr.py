"""The default text engine (`text_engine: ppocr`): PP-OCRv4's mobile detector and recognizer as ONNX, the files
that ship inside the `rapidocr-onnxruntime` wheel (no download, ever), run by OpenVINO on the CPU and by
onnxruntime on a GPU; detection on every image, recognition only on the boxes found.

Why this engine (measured with `python -m emopipe.bench ocr --quality`: 120 crops of 15 real photos, each clean
and with text; figures in the README): EasyOCR's CRAFT detector costs ~98 % of EasyOCR's time, and CRAFT
exported to ONNX gave identical decisions at only 1.4-3.5x less CPU (measured in issue 14). PP-OCRv4 finds as
many captions as EasyOCR at 384 px (117/120) for about a tenth of EasyOCR's fp32 CPU time, given two things:

- its input (input_long_side): the longer side at 512 px, up or down, and a short side of at least 384 px
  (the longer side then up to 1024). At a plain 512 px longer side it found 115/120, at 384 px 108; at
  576-640 px for every image it found no more and read letters into cat's eyes and coins.
- a min_confidence of 0.4 (emopipe.catalog.ENGINE_MIN_CONFIDENCE): its recognizer reads textures as short
  words at 0.2-0.4 ("oO", "ra"), 4/120 false positives at 0.2 against 1/120 at 0.4, with no caption lost.

On the CPU the two models run in OpenVINO, not in rapidocr's onnxruntime sessions: at one thread, the
detector took 0.048 CPU-s per image of varied shapes in OpenVINO (bf16 on this AVX512-BF16/AMX CPU) against
0.076 in onnxruntime, the recognizer 0.008 against 0.023 per 48 x 320 crop; in fp32 (CPUs without native
bf16) the detector took 0.042 against 0.068 at 512 x 384. The precision is part of the engine identity.

The misses left, shared with EasyOCR: small, faint text on grass and gravel, which the detector's heat map
does not light up. The direction classifier (180-degree text) is not run: upside-down text is rare in photos,
and the detector finds it either way.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path

import numpy as np

DEFAULT_OCR_SIZE = 512
MIN_SHORT_SIDE, MAX_LONG_SIDE = 384, 1024  # see input_long_side
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


def input_long_side(width: int, height: int, ocr_size: int) -> int:
    """The longer side of the OCR input: ocr_size (up or down), raised until the shorter side is MIN_SHORT_SIDE,
    but not past MAX_LONG_SIDE (a 3:1 panorama reads at 1024 x 341)."""
    floor = -(-MIN_SHORT_SIDE * max(width, height) // min(width, height))  # the long side that gives that short side
    return max(ocr_size, min(floor, MAX_LONG_SIDE))


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
    """"bf16" on a CPU that OpenVINO says computes bfloat16 natively, else "fp32" (the ONNX files' own; a GPU
    runs them as they are in onnxruntime)."""
    if device != "cpu":
        return "fp32"
    import openvino

    return "bf16" if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "fp32"


def runtime(device: str) -> str:
    """What runs the models on the device, with its version: part of the engine identity."""
    return (f"openvino-{metadata.version('openvino')}" if device == "cpu"
            else f"onnxruntime-{metadata.version('onnxruntime')}")


def identity(ocr_size: int, device: str, precision: str, batched: bool = False) -> str:
    """The ocr_results key: library versions, both model files by name and content, input size (with the
    short-side floor), device, precision, and "-square" for the GPU path's padded batches (padding moves the
    detector's view of the bottom and right edges)."""
    models = "+".join(f"{Path(f).stem}.{_file_digest(model_path(f))}" for f in (DETECTOR_FILE, RECOGNIZER_FILE))
    return (f"ppocr-rapidocr_onnxruntime-{metadata.version('rapidocr-onnxruntime')}-{runtime(device)}-"
            f"{models}-db{HEATMAP_THRESHOLD}-{BOX_THRESHOLD}-{ocr_size}px-short{MIN_SHORT_SIDE}-{device}-{precision}"
            + ("-square" if batched else ""))


class OpenVinoModel:
    """An ONNX model compiled by OpenVINO for the CPU, called as rapidocr calls its onnxruntime sessions
    (one input array in, a list of outputs back)."""

    def __init__(self, path: Path, threads: int, precision: str):
        import openvino

        # No CPU pinning: OpenVINO pins each process's inference threads from core 0 up, so two one-thread
        # worker processes shared one core (each ran at half speed, measured) while the other idled.
        compiled = openvino.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp32": "f32"}[precision]})
        self.request = compiled.create_infer_request()

    def __call__(self, inputs: np.ndarray) -> list[np.ndarray]:
        return [self.request.infer({0: inputs})[0].copy()]  # copied: the request reuses its output buffer


class PpOcrReader:
    """PP-OCR detection + recognition with EasyOCR's reader interface (RGB uint8 in, [(corners, text,
    confidence)] out). Uses rapidocr_onnxruntime's detector post-processing, crops and CTC decoding, but
    feeds the detector itself: images padded (never stretched) to a multiple of 32, several per pass. On the
    CPU, OpenVINO runs both models in place of rapidocr's onnxruntime sessions (why: the module docstring)."""

    def __init__(self, device: str, threads: int, precision: str = "fp32", runtime: str | None = None):
        """runtime: "openvino" (the CPU's, the default there) or "onnxruntime" (rapidocr's own sessions: the GPU's,
        and on the CPU the way to run the GPU path's code with onnxruntime's CPU provider, as the tests do)."""
        import cv2
        from rapidocr_onnxruntime import RapidOCR

        cuda = device == "cuda"
        runtime = runtime or ("onnxruntime" if cuda else "openvino")
        if runtime not in ("openvino", "onnxruntime") or (cuda and runtime == "openvino") or (
                runtime == "onnxruntime" and precision != "fp32"):
            raise ValueError(f"the ppocr engine runs in OpenVINO on the CPU (fp32 or bf16) or in onnxruntime (fp32), "
                             f"not {runtime} in {precision} on {device}")
        cv2.setNumThreads(threads)  # OpenCV's resize and warps: no threads beyond this process's share
        self.ocr = RapidOCR(
            det_model_path=str(model_path(DETECTOR_FILE)), rec_model_path=str(model_path(RECOGNIZER_FILE)),
            intra_op_num_threads=threads, inter_op_num_threads=1, det_use_cuda=cuda, rec_use_cuda=cuda,
            det_thresh=HEATMAP_THRESHOLD, det_box_thresh=BOX_THRESHOLD,
            rec_batch_num=64 if cuda else 6, use_cls=False)
        provider = self.ocr.text_det.infer.session.get_providers()[0]
        if cuda and provider != "CUDAExecutionProvider":
            raise RuntimeError(f"device cuda asked for, but onnxruntime runs on {provider}: install onnxruntime-gpu "
                               "(in place of onnxruntime) for the GPU path")
        if runtime == "openvino":
            self.ocr.text_det.infer = OpenVinoModel(model_path(DETECTOR_FILE), threads, precision)
            self.ocr.text_rec.session = OpenVinoModel(model_path(RECOGNIZER_FILE), threads, precision)

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
    """A reader on `device` with `threads` intra-op threads (work_dir: unused, PP-OCR writes nothing).
    precision: "fp32", or "bf16" on the CPU (see default_precision)."""
    if precision not in ("fp32", "bf16") or (precision == "bf16" and device != "cpu"):
        raise ValueError(f"the ppocr engine runs in fp32, or bf16 on the CPU, not {precision!r} on {device}")
    return PpOcrReader(device, threads, precision)
