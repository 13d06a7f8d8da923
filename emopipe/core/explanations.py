"""Integrated-Gradients heatmaps (the core of `explanations`): which pixels made a trained model
predict what it did, for a few test images per class.

IG (captum) integrates the gradient of the predicted class's score along the straight line from a
baseline to the image. Input space: the pixels as stored (uint8 values as floats, 0..255) with the
model's input normalization folded into the network (`PixelInput`), so the baseline is a true black
image and the attributions are per pixel of the image the user sees; IG on the already-normalized
tensor would give the same attributions only with the baseline (-mean/std), and would make every
caller repeat that mapping.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from emopipe.allocator import keep_freed_memory
from emopipe.core.device_data import pick_device
from emopipe.core.models import Normalization

OVERLAY_MIN_SIZE = 256  # 32 px images are upscaled so the heatmap can be seen
HEATMAP_ALPHA = 0.5


class PixelInput(nn.Module):
    """model(normalize(x)) for x: float pixels (B, 3, S, S) in 0..255."""

    def __init__(self, model: nn.Module, norm: Normalization):
        super().__init__()
        self.model = model
        self.register_buffer("scale", (1 / (255 * torch.tensor(norm.std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(norm.mean) / torch.tensor(norm.std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def explain(model: nn.Module, info: dict, images: np.ndarray, targets: Sequence[int], *, steps: int = 32,
            device: str | torch.device | None = None, batch_size: int = 8) -> np.ndarray:
    """(N, S, S) float32 attributions in [0, 1] (each image scaled by its largest) of uint8 images
    (N, S, S, 3) for output `targets[n]` (the predicted class). model/info: from load_checkpoint.

    Per pixel: |IG| summed over the colour channels, black baseline. Memory stays bounded: `batch_size`
    images at a time, `steps` interpolation points run `batch_size * 4` at a time (internal_batch_size).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(targets):
        raise ValueError(f"expected uint8 images (N, S, S, 3) and N targets, got {images.shape} and {len(targets)}")
    keep_freed_memory()
    device = pick_device(device, log=lambda _: None)
    net = PixelInput(model, Normalization.from_dict(info["normalization"])).eval().to(device)
    ig = IntegratedGradients(net)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float()
        target = torch.as_tensor(np.asarray(targets[start:start + batch_size]), dtype=torch.long, device=device)
        attributions = ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=steps,
                                    internal_batch_size=batch_size * 4)
        out.append(attributions.detach().abs().sum(1).float().cpu())
    heat = torch.cat(out) if out else torch.zeros((0, *images.shape[1:3]))
    peak = heat.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (heat / peak).numpy().astype(np.float32)


def overlay_png(image: np.ndarray, attribution: np.ndarray, caption: str) -> bytes:
    """PNG: the image with the attribution heatmap (matplotlib's inferno, alpha by strength) over it,
    upscaled to at least 256 px, the caption in a strip below."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    size = image.shape[0]
    scale = max(1, -(-OVERLAY_MIN_SIZE // size))
    side = size * scale
    base = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST).convert("RGBA")
    heat = np.clip(attribution, 0.0, 1.0)
    rgba = (colormaps["inferno"](heat) * 255).astype(np.uint8)
    rgba[..., 3] = (HEATMAP_ALPHA * 255 * np.sqrt(heat)).astype(np.uint8)  # weak attribution: image shows through
    overlay = Image.fromarray(rgba, "RGBA").resize((side, side), Image.Resampling.BILINEAR)
    font = ImageFont.load_default(size=max(12, side // 20))
    lines = _wrapped(caption, font, side - 12)
    line_height = font.size + 4
    canvas = Image.new("RGB", (side, side + 10 + line_height * len(lines)), "white")
    canvas.paste(Image.alpha_composite(base, overlay).convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((6, side + 5 + k * line_height), line, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _wrapped(text: str, font, width: int) -> list[str]:
    """The words of text in lines no wider than width pixels (a word longer than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def caption(predicted: str, probability: float, label: str | None = None) -> str:
    """E.g. "Heatmap IG. Prediction: fear (0.83); label: fear"."""
    text = f"Heatmap IG. Prediction: {predicted} ({probability:.2f})"
    return text if label is None else f"{text}; label: {label}"


def select_samples(rows: Iterable[Sequence], per_class: int, classes: Sequence[str] | None = None) -> list[tuple]:
    """Up to `per_class` (image_id, label, predicted) rows per true label, correctly predicted ones
    first, then by image_id (a sha256: a fixed, content-derived shuffle), so the choice is the same
    on every run and for every row order. Classes in `classes` order (default: sorted)."""
    by_class: dict[str, list[tuple]] = {}
    for image_id, label, predicted in (tuple(r)[:3] for r in rows):
        by_class.setdefault(label, []).append((image_id, label, predicted))
    order = list(classes) if classes is not None else sorted(by_class, key=str)
    chosen = []
    for label in order:
        ranked = sorted(by_class.get(label, []), key=lambda r: (r[2] != r[1], r[0]))
        chosen += ranked[:per_class]
    return chosen
