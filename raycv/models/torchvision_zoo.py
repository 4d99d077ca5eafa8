"""Every torchvision classification model by name, with its pretrained weights when available.

Weights come from the local torch cache ($TORCH_HOME/hub/checkpoints) or are downloaded once by
torchvision. Without internet and without the cached file, the user gets one clear error fast
instead of a hang. When `num_classes` differs from the weights' classes, the classifier head is
replaced by a new one of the right size (fine-tuning).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from raycv.errors import UserError
from raycv.models.registry import register_model

DOWNLOAD_TIMEOUT_S = 30.0


def resolve_weights(arch: str, weights: str) -> tvm.WeightsEnum:
    enum = tvm.get_model_weights(arch)
    if weights.upper() == "DEFAULT":
        return enum.DEFAULT
    names = [w.name for w in enum]
    short = weights.split(".")[-1]  # accept both IMAGENET1K_V1 and ResNet18_Weights.IMAGENET1K_V1
    if short not in names:
        raise UserError(f"model {arch!r} has no weights {weights!r} (valid: DEFAULT, {', '.join(names)})")
    return enum[short]


def load_weights_state_dict(w: tvm.WeightsEnum) -> dict[str, torch.Tensor]:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return w.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # URLError, timeouts, a corrupt cache file: all one message
        raise UserError(
            f"could not load torchvision weights {w}: not usable at {cached} and the download "
            f"failed ({type(e).__name__}: {e}); copy the file there or run with internet access"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def last_linear_name(model: nn.Module) -> str:
    """The classifier head: the last nn.Linear in module order (fc, heads.head, classifier.1, ...)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear classifier head to replace")
    return names[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    name = last_linear_name(model)
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


def _make(arch: str):
    def build(*, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
        if weights is None:
            return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        w = resolve_weights(arch, weights)
        model = tvm.get_model(arch, weights=None, num_classes=len(w.meta["categories"]), **kwargs)
        model.load_state_dict(load_weights_state_dict(w))
        if num_classes != len(w.meta["categories"]):
            replace_head(model, num_classes)
        return model

    build.__name__ = arch
    return build


def _default_input_size(arch: str) -> int:
    try:
        return int(tvm.get_model_weights(arch).DEFAULT.transforms().crop_size[0])
    except Exception:
        return 224


for _arch in tvm.list_models(module=tvm):
    register_model(_arch, source="torchvision", default_input_size=_default_input_size(_arch))(_make(_arch))
