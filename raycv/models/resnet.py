"""Residual networks for small inputs: torchvision's ResNets with a CIFAR-style stem.

The seed's "ResNet" had no residual connections. These are torchvision's real ResNets (the
BasicBlock / Bottleneck blocks with identity shortcuts); for 32-px images the 7x7 stride-2 stem and
the max-pool would shrink a CIFAR image to 8x8 before the first block, so the `_cifar` variants
use a 3x3 stride-1 stem and no max-pool (He et al. 2016, section 4.2 setup).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from raycv.models.registry import register_model


def _cifar_stem(model: tvm.ResNet) -> tvm.ResNet:
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _make(arch: str):
    def build(*, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
        return _cifar_stem(tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs))

    build.__name__ = f"{arch}_cifar"
    return build


for _arch in ("resnet18", "resnet34", "resnet50"):
    register_model(f"{_arch}_cifar", default_input_size=32)(_make(_arch))
