"""Object detection models: torchvision's Faster R-CNN (MobileNetV3 and ResNet-50 FPN backbones),
RetinaNet, FCOS, SSD and SSDlite by name, and `fcos_small`, torchvision's FCOS on a small
from-scratch backbone with a feature pyramid, which trains on a CPU.

They are torchvision detection models, used the torchvision way: the input is a list of float
images in [0, 1] (the model normalizes and resizes them itself); in training mode
`model(images, targets)` returns the model's own loss dict, in eval mode a list of
`{"boxes" (N, 4) xyxy, "labels", "scores"}` in input pixels. Class 0 is the background.

Pretrained weights (`model.weights=DEFAULT`) are torchvision's COCO ones (91 categories); with
another class count the class-predicting layers are replaced (the box regressors of one-stage
models do not depend on the class count and keep their weights). Backbone weights are never
fetched unless `model.kwargs.weights_backbone` asks for them (offline by default).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn
from torchvision import models as tvm
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork

from raycv.errors import UserError
from raycv.models.registry import register_model
from raycv.models.torchvision_zoo import load_weights_state_dict, resolve_weights, verify_backbone_weights

# keypoint and mask R-CNN need keypoint / instance-mask targets: not detection as raycv trains it
ARCHS = [a for a in tvm.list_models(module=tvm.detection) if not a.startswith(("keypointrcnn", "maskrcnn"))]
# SSD models resize to their own fixed size; the others take min_size / max_size
FIXED_SIZE = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}
DEFAULT_SIZE = {**FIXED_SIZE, "fasterrcnn_mobilenet_v3_large_320_fpn": 320}  # the rest: 800 (torchvision's min_size)


def sized_kwargs(name: str, kwargs: dict, input_size: int) -> dict:
    """Model arguments that make the model's own transform keep raycv's `input_size` squares as they
    are (min_size = max_size = input_size) instead of resizing them again; what the user set wins."""
    if name in FIXED_SIZE:
        return dict(kwargs)
    return {"min_size": input_size, "max_size": input_size, **kwargs}


def _new_conv(old: nn.Conv2d, out_channels: int, prior: float | None) -> nn.Conv2d:
    conv = nn.Conv2d(old.in_channels, out_channels, old.kernel_size, old.stride, old.padding)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, -math.log((1 - prior) / prior) if prior else 0.0)
    return conv


def replace_class_layers(model: nn.Module, old: int, num_classes: int) -> nn.Module:
    """Swap the layers that predict `old` classes for fresh ones predicting `num_classes`."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    if hasattr(model, "roi_heads"):  # Faster R-CNN: class scores and per-class boxes
        model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, num_classes)
        return model
    head = model.head.classification_head
    if hasattr(head, "cls_logits"):  # RetinaNet, FCOS: one conv, focal-loss prior on the bias
        head.cls_logits = _new_conv(head.cls_logits, head.cls_logits.out_channels // old * num_classes, prior=0.01)
        head.num_classes = num_classes
        return model
    if hasattr(head, "module_list"):  # SSD, SSDlite: one predicting conv per feature map
        for i, block in enumerate(head.module_list):
            conv = block[-1] if isinstance(block, nn.Sequential) else block
            new = _new_conv(conv, conv.out_channels // old * num_classes, prior=None)
            if isinstance(block, nn.Sequential):
                block[-1] = new
            else:
                head.module_list[i] = new
        head.num_columns = num_classes
        return model
    raise UserError(f"{type(model).__name__}: cannot find the class-predicting layers to replace")


def _make(arch: str):
    def build(*, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
        kwargs.setdefault("weights_backbone", None)
        verify_backbone_weights(arch, kwargs)
        if weights is None:
            return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        w = resolve_weights(arch, weights)
        load_weights_state_dict(w)  # fetch or find it, with raycv's one-line error when neither works
        model = tvm.get_model(arch, weights=w, **kwargs)  # torchvision's own loading: frozen batch norms
        old = len(w.meta["categories"])
        return replace_class_layers(model, old, num_classes) if num_classes != old else model

    build.__name__ = arch
    return build


for _arch in ARCHS:
    register_model(_arch, task="detection", source="torchvision",
                   default_input_size=DEFAULT_SIZE.get(_arch, 800))(_make(_arch))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallFPNBackbone(nn.Module):
    """Four conv stages (each stride 2) and torchvision's feature pyramid over the last three:
    maps at 1/4, 1/8 and 1/16 of the input, `out_channels` each."""

    def __init__(self, width: int = 16, out_channels: int = 64):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.stages = nn.ModuleList([_block(cin, cout) for cin, cout in zip([3] + widths[:-1], widths)])
        self.fpn = FeaturePyramidNetwork(widths[1:], out_channels)
        self.out_channels = out_channels

    def forward(self, x):
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i:
                feats[str(i)] = x
        return self.fpn(feats)


@register_model("fcos_small", task="detection", default_input_size=64)
def fcos_small(*, num_classes: int, weights: str | None = None, width: int = 16, fpn_channels: int = 64,
               min_size: int = 64, max_size: int = 64, score_thresh: float = 0.05, **kwargs) -> nn.Module:
    """torchvision's FCOS (Tian et al. 2019) on a small backbone + FPN: for CPUs and small images.
    One anchor point per location; objects up to ~32 px go to the 1/4 map, larger ones up the pyramid."""
    anchors = AnchorGenerator(((4,), (8,), (16,)), ((1.0,),) * 3)
    return FCOS(SmallFPNBackbone(width, fpn_channels), num_classes=num_classes, min_size=min_size, max_size=max_size,
                anchor_generator=anchors, score_thresh=score_thresh, **kwargs)
