"""Every torchvision classification model by name, with its pretrained weights when available.

Weights come from the local torch cache ($TORCH_HOME/hub/checkpoints) or are downloaded once by
torchvision. Without internet and without the cached file, the user gets one clear error fast
instead of a hang. When `num_classes` differs from the weights' classes, the classifier head is
replaced by a new one of the right size (fine-tuning).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from raycv.data.io import sha256_file
from raycv.errors import UserError
from raycv.models.heads import last_linear_name
from raycv.models.registry import register_model

DOWNLOAD_TIMEOUT_S = 30.0
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: <name>-<sha256 prefix>.<ext>
# RAYCV_WEIGHTS_HASH=skip: accept a file under torchvision's name whose content is not torchvision's
# release (a stand-in the tests plant, a re-export of your own). It is still loaded tensors-only. The
# driver passes it on to raycv's Ray workers and actors (FORWARDED_ENV).
HASH_ENV = "RAYCV_WEIGHTS_HASH"


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
    """A torchvision weights file as tensors only. It is found in $TORCH_HOME/hub/checkpoints or
    downloaded there once; its SHA-256 must start with the hash its name carries (torchvision names
    files `<arch>-<hash>.pth`; torch checks that only while downloading, raycv every time), and it
    is loaded with `weights_only=True`: a file that needs anything but tensors is refused, so a
    planted pickle never runs."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    named = HASH_IN_NAME.search(cached.name)
    if not cached.is_file():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(w.url, str(cached), named.group(1) if named else None, progress=False)
        except Exception as e:  # URLError, timeouts, a hash mismatch: all one message
            raise UserError(
                f"could not load torchvision weights {w}: not at {cached} and the download failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); copy the file there or run "
                f"with internet access") from None
        finally:
            socket.setdefaulttimeout(old)
    if named and os.environ.get(HASH_ENV, "verify") != "skip" and not sha256_file(cached).startswith(named.group(1)):
        raise UserError(f"refusing weights file {cached}: its SHA-256 does not start with {named.group(1)}, "
                        f"the hash in its name (a different or damaged file); delete it to download it again")
    try:
        return torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"refusing weights file {cached}: not a tensors-only file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def verify_backbone_weights(arch: str, kwargs: dict) -> None:
    """`model.kwargs.weights_backbone`: torchvision loads it inside its builder with a full
    unpickle. Load and check that same file first, tensors-only (`load_weights_state_dict`); a file
    that passes holds nothing but tensors, so torchvision's read of it runs no code."""
    value = kwargs.get("weights_backbone")
    if value is None:
        return
    import inspect
    import typing

    annotation = inspect.signature(tvm.get_model_builder(arch)).parameters["weights_backbone"].annotation
    enum = next(t for t in typing.get_args(annotation) if isinstance(t, type) and issubclass(t, tvm.WeightsEnum))
    try:
        w = enum.verify(value)
    except (KeyError, ValueError, TypeError):
        raise UserError(f"model.kwargs.weights_backbone={value!r} is not one of {enum.__name__}: "
                        f"{', '.join(['DEFAULT', *(m.name for m in enum)])}") from None
    load_weights_state_dict(w)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    name = last_linear_name(model)
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


# torchvision's ViT builders fix these; raycv lets model.kwargs change them (a smaller or larger ViT
# of the same family, trained from scratch): vit_b_16 with {num_layers: 2, hidden_dim: 64, ...}.
VIT_SHAPES = {"vit_b_16": (16, 12, 12, 768, 3072), "vit_b_32": (32, 12, 12, 768, 3072),
              "vit_l_16": (16, 24, 16, 1024, 4096), "vit_l_32": (32, 24, 16, 1024, 4096),
              "vit_h_14": (14, 32, 16, 1280, 5120)}
VIT_KEYS = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")


def _make(arch: str):
    def build(*, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
        if arch in VIT_SHAPES and any(k in kwargs for k in VIT_KEYS):
            if weights is not None:
                raise UserError(f"model {arch!r}: pretrained weights fix {', '.join(VIT_KEYS)}; drop them from "
                                f"model.kwargs or drop model.weights")
            shape = dict(zip(VIT_KEYS, VIT_SHAPES[arch]), image_size=224)
            return tvm.VisionTransformer(**{**shape, **kwargs}, num_classes=num_classes)
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
