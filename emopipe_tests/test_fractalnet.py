import timm
import torch
from torch import nn

from emopipe.core.fractalnet import FractalNet
from emopipe.core.models import create_model
from emopipe.core.trained_model import build_net

# The paper's layout at small widths, 4 blocks for 16 px images: fast on 2 CPU cores.
TINY = {"channels": (8, 8, 16, 16), "dropout": (0.0, 0.1, 0.2, 0.3)}


def test_created_by_name_through_the_model_factory():
    model, _ = create_model("fractalnet_c3b5", num_outputs=8, image_size=32, pretrained="none")
    assert isinstance(model, FractalNet) and model.num_columns == 3 and len(model.blocks) == 5
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 8)
        assert model.forward_features(x).shape == (2, 512, 1, 1)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features) == (2, 512)
    # 4 columns: deepest path 8 convs per block, 15 convs per block
    deep = timm.create_model("fractalnet_c4b5", num_classes=3, **TINY)
    assert sum(isinstance(m, nn.Conv2d) for m in deep.modules()) == 4 * 15


def test_linear_probe_backbone_through_build_net():
    net, _, num_features = build_net("fractalnet_c3b5", image_size=32, pretrained="none", mode="linear_probe",
                                     task="classification", num_outputs=4, head_hidden=16)
    assert num_features == 512
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def _conv_calls(model: nn.Module, x: torch.Tensor, repeats: int) -> list[int]:
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    counts = []
    for _ in range(repeats):
        calls[0] = 0
        with torch.no_grad():
            model(x)
        counts.append(calls[0])
    for h in hooks:
        h.remove()
    return counts


def test_drop_path_in_training_only():
    torch.manual_seed(0)
    model = timm.create_model("fractalnet_c3b5", num_classes=4, **TINY)
    x = torch.randn(4, 3, 16, 16)
    total = 4 * 7  # 3 columns: 1 + 2 + 4 convs per block

    model.train()
    counts = _conv_calls(model, x, 16)
    # global drop-path runs one column (4 x 1, 2 or 4 convs); local drop-path skips no conv layer but
    # drops join inputs, so its outputs differ between calls even with BatchNorm in batch mode
    assert {4, 8, 16} & set(counts), counts
    assert total in counts, counts
    assert all(c in (4, 8, 16, total) for c in counts)

    model.eval()
    assert _conv_calls(model, x, 3) == [total] * 3
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_local_drop_path_changes_joins():
    torch.manual_seed(1)
    model = timm.create_model("fractalnet_c3b5", num_classes=4, **TINY, global_prob=0.0).train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        outs = [model(x) for _ in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_trains_on_a_tiny_set():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    # class 1: bright left half; class 0: bright right half
    x = torch.rand(16, 3, 16, 16, generator=generator) * 0.2
    x[y == 1, :, :, :8] += 0.8
    x[y == 0, :, :, 8:] += 0.8
    model = timm.create_model("fractalnet_c3b5", num_classes=2, **TINY).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # training losses (drop-path makes each step's network a different subnetwork: average a few)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
