"""OCR engines for the text filter. Each engine module offers the same few names, so `text_scores` runs any
of them the same way:

- `DEFAULT_OCR_SIZE`: the longer side of the image it reads by default; `input_long_side(width, height,
  ocr_size)`: the longer side it reads an image of that size at; `GPU_BATCH`: images per padded pass on a
  GPU; `READER_BYTES`: one reader's resident memory, with headroom;
- `default_device()`, `default_precision(device)`;
- `identity(ocr_size, device, precision, batched)`: the ocr_results cache key, everything that decides the
  raw boxes (library and version, model files, input size, device, arithmetic, padding);
- `make_reader(device, work_dir, precision, threads)`: a reader with `readtext(rgb) -> [(corners, text,
  confidence)]` and `readtext_batched(images, batch_size=n)`, EasyOCR's interface.

Engines are imported only when used: each loads its own heavy libraries (torch, OpenVINO, onnxruntime,
OpenCV). Each engine's default min_confidence is in emopipe.catalog.ENGINE_MIN_CONFIDENCE (the catalog reads
it without importing an engine).
"""

from __future__ import annotations

from types import ModuleType


def text_engine(name: str) -> ModuleType:
    """The engine module for a catalog `text_engine` name (emopipe.catalog.TEXT_ENGINES)."""
    if name == "ppocr":
        from emopipe.core.text_engines import ppocr
        return ppocr
    if name == "easyocr":
        from emopipe.core.text_engines import easyocr
        return easyocr
    raise ValueError(f"unknown text engine {name!r}: 'ppocr' or 'easyocr'")
