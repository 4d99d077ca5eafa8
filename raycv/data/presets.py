"""Train and eval preprocessing as two named presets (after torchvision's references/presets.py).

Each preset has two halves:
- `geometry(img)`: PIL RGB -> (C, H, W) uint8 tensor of a fixed shape. Deterministic; runs in Ray
  Data decode tasks, so a small dataset is decoded once and cached in Ray's object store.
- the per-batch half, on the training worker: `augment` (train: random, fresh every epoch) and
  `normalize` (uint8 -> float, mean/std), both over a (B, C, H, W) batch.

The eval preset's parameters are stored in every checkpoint (`to_dict` / `from_dict`), so batch
inference preprocesses exactly as validation did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from raycv.data.geometry import Letterbox, ResizeCenterCrop, Square, letterbox_size

if TYPE_CHECKING:  # imported where a preset touches tensors: reading a checkpoint's preset needs neither
    import torch
    from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32, scaled to [0, 1], then standardised per channel."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.float().div_(255.0) - m) / s


@dataclass(frozen=True, kw_only=True)
class ClassificationEvalPreset:
    input_size: int  # model input side, pixels
    resize_size: int  # shorter side is resized to this, then center-cropped to input_size
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    @property
    def pixels(self) -> ResizeCenterCrop:
        """`geometry` as a callable that imports neither torch nor torchvision: what decode tasks run."""
        return ResizeCenterCrop(self.resize_size, self.input_size)

    def geometry(self, img) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.pixels(img))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch, self.mean, self.std)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassificationEvalPreset":
        return cls(input_size=int(d["input_size"]), resize_size=int(d["resize_size"]),
                   mean=tuple(d["mean"]), std=tuple(d["std"]))


@dataclass(frozen=True, kw_only=True)
class ClassificationTrainPreset:
    input_size: int
    resize_size: int  # images are stored (decoded once) as resize_size squares
    augment: str = "light"  # none | light | standard | trivial | randaugment
    hflip: bool = False
    random_erasing: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    _augment: v2.Compose | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.resize_size, self.resize_size)

    @property
    def pixels(self) -> ResizeCenterCrop:
        return ResizeCenterCrop(self.resize_size, self.resize_size)

    def geometry(self, img) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.pixels(img))

    def augment_transform(self) -> v2.Compose:
        from torchvision.transforms import v2

        size, store = self.input_size, self.resize_size
        steps: list = []
        if self.augment == "none":
            steps.append(v2.CenterCrop(size))
        elif self.augment == "light":
            # Small shifts, rotations and zooms: right for digits, glyphs and tiny images.
            if store > size:
                steps.append(v2.RandomCrop(size))
            steps.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
        elif self.augment in ("standard", "trivial", "randaugment"):
            steps.append(v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True))
            if self.augment == "trivial":
                steps.append(v2.TrivialAugmentWide())
            elif self.augment == "randaugment":
                steps.append(v2.RandAugment())
        else:
            raise ValueError(f"unknown augment {self.augment!r} (valid: none, light, standard, trivial, randaugment)")
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.random_erasing > 0:  # on uint8: erased patches are black (the reference erases to the mean)
            steps.append(v2.RandomErasing(p=self.random_erasing, value=0))
        return v2.Compose(steps)

    def augment_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) uint8 -> (B, C, input_size, input_size) uint8, fresh randomness per image."""
        import torch

        if (self.augment == "none" and not self.hflip and not self.random_erasing
                and batch.shape[-1] == batch.shape[-2] == self.input_size):
            return batch  # nothing random to do: skip the per-image loop
        if self._augment is None:
            object.__setattr__(self, "_augment", self.augment_transform())
        return torch.stack([self._augment(img) for img in batch])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch, self.mean, self.std)


# ----------------------------------------------------------------------------------------------
# Semantic segmentation: the image and its class mask go through the same geometry. Images are
# resized to squares (bilinear), masks with nearest-neighbour (class indices never blend);
# torchvision.transforms.v2 moves a `tv_tensors.Mask` with its image through every augmentation.
# ----------------------------------------------------------------------------------------------

IGNORE_INDEX = 255  # VOC's "void" label: pixels that count for neither loss nor metrics


class _PairGeometry:
    """Image (bilinear) and class mask (nearest) to squares of `stored_size`, and normalization."""

    stored_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.stored_size, self.stored_size)

    @property
    def pixels(self) -> Square:
        return Square(self.stored_size)

    def geometry(self, img) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.pixels(img))

    def mask_geometry(self, mask) -> torch.Tensor:
        """A PIL class mask (mode P or L) -> (H, W) uint8 at the stored size."""
        import torch

        return torch.from_numpy(Square(self.stored_size, nearest=True)(mask))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch, self.mean, self.std)


@dataclass(frozen=True, kw_only=True)
class SegmentationEvalPreset(_PairGeometry):
    input_size: int  # the image is resized to an input_size square; predictions are resized back
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    task = "segmentation"

    @property
    def stored_size(self) -> int:
        return self.input_size

    def to_dict(self) -> dict:
        return {"kind": self.task, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "SegmentationEvalPreset":
        return cls(input_size=int(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


@dataclass(frozen=True, kw_only=True)
class SegmentationTrainPreset(_PairGeometry):
    input_size: int
    resize_size: int  # image and mask are stored (decoded once) as resize_size squares
    augment: str = "light"  # none | light | standard
    hflip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    _augment: v2.Compose | None = field(default=None, init=False, repr=False, compare=False)

    AUGMENTS = ("none", "light", "standard")

    @property
    def stored_size(self) -> int:
        return self.resize_size

    def augment_transform(self) -> v2.Compose:
        from torchvision.transforms import v2

        size = self.input_size
        if self.augment == "none":
            steps: list = [v2.Resize((size, size), antialias=True)]  # bilinear; v2 moves a Mask with nearest
        elif self.augment == "light":
            steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True)]
        elif self.augment == "standard":  # after torchvision's references/segmentation presets
            steps = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                     v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)]
        else:
            raise ValueError(f"augment {self.augment!r} is not available for segmentation "
                             f"(valid: {', '.join(self.AUGMENTS)})")
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps)

    def augment_pairs(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) uint8 images and (B, S, S) uint8 masks -> the same at input_size, each pair
        through one draw of the random geometry."""
        import torch
        from torchvision import tv_tensors

        if self.augment == "none" and not self.hflip and images.shape[-1] == self.input_size:
            return images, masks
        if self._augment is None:
            object.__setattr__(self, "_augment", self.augment_transform())
        pairs = [self._augment(tv_tensors.Image(i), tv_tensors.Mask(m)) for i, m in zip(images, masks)]
        return torch.stack([p[0].as_subclass(torch.Tensor) for p in pairs]), \
            torch.stack([p[1].as_subclass(torch.Tensor) for p in pairs])


# ----------------------------------------------------------------------------------------------
# Object detection: images are letterboxed (the longer side scaled to the square's side, the aspect
# kept, the rest padded with black at the bottom and right, as torchvision's detection transform
# pads a batch), so one scale factor maps boxes in and out. torchvision detection models take
# float images in [0, 1] and normalize them themselves; boxes are (N, 4) x1, y1, x2, y2 in pixels.
# ----------------------------------------------------------------------------------------------


class _Letterbox:
    stored_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.stored_size, self.stored_size)

    @property
    def pixels(self) -> Letterbox:
        return Letterbox(self.stored_size)

    def geometry(self, img) -> torch.Tensor:
        """PIL RGB -> (3, S, S) uint8: letterboxed into the stored square."""
        import torch

        return torch.from_numpy(self.pixels(img))

    def box_scale(self, height: int, width: int) -> tuple[float, float]:
        """(x, y) factors from original pixels to the stored square's pixels."""
        h, w = letterbox_size(height, width, self.stored_size)
        return w / width, h / height

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1]: the detection model normalizes with its own mean and std."""
        return batch.float().div_(255.0)


@dataclass(frozen=True, kw_only=True)
class DetectionEvalPreset(_Letterbox):
    input_size: int  # images are letterboxed into an input_size square; boxes are mapped back
    task = "detection"

    @property
    def stored_size(self) -> int:
        return self.input_size

    def to_dict(self) -> dict:
        return {"kind": self.task, "input_size": self.input_size}

    @classmethod
    def from_dict(cls, d: dict) -> "DetectionEvalPreset":
        return cls(input_size=int(d["input_size"]))


@dataclass(frozen=True, kw_only=True)
class DetectionTrainPreset(_Letterbox):
    input_size: int
    resize_size: int  # images are stored (decoded once) letterboxed into resize_size squares
    augment: str = "light"  # none | light | standard
    hflip: bool = True
    _augment: v2.Compose | None = field(default=None, init=False, repr=False, compare=False)

    AUGMENTS = ("none", "light", "standard")

    @property
    def stored_size(self) -> int:
        return self.resize_size

    def augment_transform(self) -> v2.Compose:
        from torchvision.transforms import v2

        size = self.input_size
        if self.augment == "none":
            steps: list = []
        elif self.augment == "light":  # small shifts and zooms
            steps = [v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.8, 1.2))]
        elif self.augment == "standard":  # torchvision's references/detection "ssd" policy
            steps = [v2.RandomPhotometricDistort(p=0.5), v2.RandomZoomOut(fill=0, side_range=(1.0, 2.0)),
                     v2.RandomIoUCrop()]
        else:
            raise ValueError(f"augment {self.augment!r} is not available for detection "
                             f"(valid: {', '.join(self.AUGMENTS)})")
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.Resize((size, size), antialias=True), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
        return v2.Compose(steps)

    def augment_targets(self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]):
        """(B, 3, S, S) uint8 images with their (n_i, 4) boxes and (n_i,) labels -> the same at
        input_size, each image through one draw of the random geometry with its boxes; boxes that
        leave the image or shrink to nothing go, with their labels."""
        import torch
        from torchvision import tv_tensors

        if self.augment == "none" and not self.hflip and images.shape[-1] == self.input_size:
            return images, boxes, labels
        if self._augment is None:
            object.__setattr__(self, "_augment", self.augment_transform())
        canvas = tuple(images.shape[-2:])
        out_i, out_b, out_l = [], [], []
        for img, b, lbl in zip(images, boxes, labels):
            i, t = self._augment(tv_tensors.Image(img), {
                "boxes": tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=canvas), "labels": lbl})
            out_i.append(i.as_subclass(torch.Tensor))
            out_b.append(t["boxes"].as_subclass(torch.Tensor))
            out_l.append(t["labels"])
        return torch.stack(out_i), out_b, out_l


def eval_preset_from_dict(d: dict):
    """A stored eval preset (checkpoints, Parquet metadata): segmentation and detection ones say so in `kind`."""
    if d.get("kind") == "segmentation":
        return SegmentationEvalPreset.from_dict(d)
    if d.get("kind") == "detection":
        return DetectionEvalPreset.from_dict(d)
    return ClassificationEvalPreset.from_dict(d)
