"""Semantic segmentation models: every torchvision one (FCN, DeepLabV3, LR-ASPP) by name, and
`lraspp_small`, torchvision's LR-ASPP head on a small from-scratch backbone that trains on a CPU.

Every model returns torchvision's `{"out": (B, K, H, W) logits[, "aux": ...]}` at the input size.
Pretrained weights (`model.weights=DEFAULT`) are torchvision's (21 VOC classes); with another
class count the final 1x1 classifier convolutions are replaced. Backbone weights are never
fetched unless `model.kwargs.weights_backbone` asks for them (offline by default).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision import models as tvm
from torchvision.models.segmentation.lraspp import LRASPP

from raycv.errors import UserError
from raycv.models.registry import register_model
from raycv.models.torchvision_zoo import load_weights_state_dict, resolve_weights, verify_backbone_weights


def replace_classifiers(model: nn.Module, old_classes: int, num_classes: int) -> nn.Module:
    """Swap each final 1x1 convolution that predicts `old_classes` for one that predicts `num_classes`."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Conv2d) and mod.out_channels == old_classes and mod.kernel_size == (1, 1) \
                and name.startswith(("classifier", "aux_classifier")):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr,
                    nn.Conv2d(mod.in_channels, num_classes, 1, bias=mod.bias is not None))
            swapped += 1
    if not swapped:
        raise UserError(f"{type(model).__name__} has no {old_classes}-class classifier convolution to replace")
    return model


def _make(arch: str):
    def build(*, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
        kwargs.setdefault("weights_backbone", None)
        verify_backbone_weights(arch, kwargs)
        if weights is None:
            return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        w = resolve_weights(arch, weights)
        old = len(w.meta["categories"])
        state = load_weights_state_dict(w)
        if any(k.startswith("aux_classifier.") for k in state):
            if kwargs.setdefault("aux_loss", True) is False:  # asked for no auxiliary head: drop its weights
                state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        model = tvm.get_model(arch, weights=None, num_classes=old, **kwargs)
        model.load_state_dict(state)
        return replace_classifiers(model, old, num_classes) if num_classes != old else model

    build.__name__ = arch
    return build


for _arch in tvm.list_models(module=tvm.segmentation):
    register_model(_arch, task="segmentation", source="torchvision", default_input_size=520)(_make(_arch))


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _SmallBackbone(nn.Module):
    """Four conv stages (strides 2, 2, 2, 2): `low` features at 1/4 of the input, `high` at 1/16."""

    def __init__(self, width: int):
        super().__init__()
        self.stages = nn.ModuleList([_block(3, width, 2), _block(width, width * 2, 2),
                                     _block(width * 2, width * 4, 2), _block(width * 4, width * 8, 2)])

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return OrderedDict(low=feats[1], high=feats[3])


@register_model("lraspp_small", task="segmentation", default_input_size=64)
def lraspp_small(*, num_classes: int, weights: str | None = None, width: int = 16) -> nn.Module:
    """torchvision's LR-ASPP (Howard et al. 2019) on a small backbone: for CPUs and small images."""
    return LRASPP(_SmallBackbone(width), low_channels=width * 2, high_channels=width * 8, num_classes=num_classes,
                  inter_channels=width * 4)
