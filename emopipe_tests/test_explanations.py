import io
import random

import numpy as np
import torch
from PIL import Image
from torch import nn

from emopipe.core.explanations import PixelInput, caption, explain, overlay_png, select_samples
from emopipe.core.models import IMAGENET, Normalization

INFO = {"normalization": IMAGENET.as_dict(), "classes": ["a", "b", "c"], "task": "classification"}


class LeftHalfNet(nn.Module):
    """A small CNN that sees only the left half of its input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[..., : x.shape[-1] // 2])


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_attribution_shape_range_and_left_half():
    model = LeftHalfNet().eval()
    images = _images(3)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        predicted = PixelInput(model, IMAGENET)(x).argmax(1).tolist()
    heat = explain(model, INFO, images, predicted, steps=16, device="cpu", batch_size=2)
    assert heat.shape == (3, 32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0 and np.allclose(heat.max((1, 2)), 1.0)
    left, right = heat[:, :, :16].sum((1, 2)), heat[:, :, 16:].sum((1, 2))
    assert (left > 0).all() and (right <= 1e-6 * left).all(), (left, right)


def test_integrated_gradients_completeness_through_the_normalization():
    """IG's axiom: the attributions sum to f(image) - f(black); holds only if normalization is inside
    the integrated function and the baseline is black pixels."""
    from captum.attr import IntegratedGradients

    model = LeftHalfNet().eval()
    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    net = PixelInput(model, norm)
    x = torch.from_numpy(_images(2)).permute(0, 3, 1, 2).float()
    attributions = IntegratedGradients(net).attribute(x, baselines=torch.zeros_like(x), target=1, n_steps=64)
    with torch.no_grad():
        expected = net(x)[:, 1] - net(torch.zeros_like(x))[:, 1]
    assert torch.allclose(attributions.sum((1, 2, 3)), expected, rtol=0.05, atol=1e-3)


def test_overlay_png_decodes():
    image = _images(1)[0]
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 1.0
    png = overlay_png(image, heat, caption("fear", 0.834, "fear"))
    decoded = Image.open(io.BytesIO(png))
    decoded.load()
    assert decoded.format == "PNG" and decoded.width >= 256 and decoded.height > decoded.width
    pixels = np.asarray(decoded.convert("RGB"))
    scale = decoded.width // 32
    hot, cold = pixels[10 * scale, 10 * scale], pixels[28 * scale, 28 * scale]
    assert not np.array_equal(hot, image[10, 10])  # heat drawn over the image
    assert np.array_equal(cold, image[28, 28])  # no heat: the image itself
    assert caption("fear", 0.834) == "Heatmap IG. Prediction: fear (0.83)"


def test_select_samples_deterministic():
    rows = [(f"{i:04x}" * 16, ["a", "b", "c"][i % 3], ["a", "b", "c"][(i * 7) % 3]) for i in range(60)]
    chosen = select_samples(rows, per_class=2, classes=["c", "b", "a", "z"])
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert select_samples(shuffled, per_class=2, classes=["c", "b", "a", "z"]) == chosen
    assert [r[1] for r in chosen] == ["c", "c", "b", "b", "a", "a"]
    for label in "abc":
        picked = [r for r in chosen if r[1] == label]
        correct = sorted(r for r in rows if r[1] == label and r[2] == label)
        assert picked == correct[:2]  # correctly predicted first, by image_id
    assert len(select_samples(rows, per_class=100)) == 60


def test_explains_a_project_network():
    """The network trained_model builds (and load_checkpoint returns): timm backbone + head."""
    from emopipe.core.trained_model import build_net

    torch.manual_seed(0)
    net, norm, _ = build_net("test_resnet", image_size=32, pretrained="none", mode="finetune", task="classification",
                             num_outputs=3, head_hidden=8)
    info = {"normalization": norm.as_dict()}
    heat = explain(net.eval(), info, _images(2), [0, 2], steps=8, device="cpu")
    assert heat.shape == (2, 32, 32) and np.isfinite(heat).all() and np.allclose(heat.max((1, 2)), 1.0)


def test_stored_heatmaps_are_reused_only_for_their_key_and_bytes(tmp_path):
    from emopipe.core.explanation_store import stored_heatmaps, write_heatmaps

    written = write_heatmaps(tmp_path, "key1", [("a", "0" * 64, b"png-a"), ("b", "1" * 64, b"png-b")])
    assert stored_heatmaps(tmp_path, "key1") == written and [h.file for h in written] == ["a-000000000000.png", "b-111111111111.png"]
    assert stored_heatmaps(tmp_path, "key2") is None  # other model, images or settings
    (tmp_path / written[0].file).write_bytes(b"changed")
    assert stored_heatmaps(tmp_path, "key1") is None
