"""How training batches arrive on a Ray Train worker: collate functions that run in Ray Data's
prefetch threads (augmentation happens there, off the training thread), one per task, and the
per-rank ShardCache that serves later epochs from memory."""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from raycv.data.presets import ClassificationTrainPreset, DetectionTrainPreset, SegmentationTrainPreset


class ShardCache:
    """This rank's shard of decoded uint8 training images, gathered during the first epoch (by the
    collate function, in Ray Data's prefetch threads) and kept in this process. Later epochs draw
    shuffled batches from it directly: for data that fits, the per-batch trip through Ray Data's
    iterator costs more than the forward and backward of a small model. Each rank keeps the rows it
    saw in the first epoch (like a DistributedSampler without cross-rank reshuffling); augmentation
    stays fresh every epoch."""

    def __init__(self, limit_bytes: float):
        self.limit, self.size = limit_bytes, 0
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.overflow = False

    @property
    def ready(self) -> bool:
        return self.images is not None

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.overflow:
            return
        self.size += images.numel() * images.element_size()
        if self.size > self.limit:
            self.overflow, self.parts = True, []
            return
        self.parts.append((images, labels))

    def seal(self) -> None:
        if not self.overflow and self.parts:
            self.images = torch.cat([p[0] for p in self.parts])
            self.labels = torch.cat([p[1] for p in self.parts])
        self.parts = []

    def batches(self, batch_size: int, preset: ClassificationTrainPreset, generator: torch.Generator):
        order = torch.randperm(len(self.labels), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield {"image": preset.augment_batch(self.images[idx]), "label": self.labels[idx]}


class AugmentCollate(NumpyBatchCollateFn):
    """Runs in Ray Data's prefetch threads on the worker: random augmentation of a uint8 batch
    (and, with a ShardCache, keeps the un-augmented batch for later epochs). `defer`: leave the
    augmentation to `augment`, called on the training thread (train.deterministic: random draws
    made in prefetch threads would interleave with the training thread's)."""

    def __init__(self, preset: ClassificationTrainPreset | None, cache: ShardCache | None = None, defer: bool = False):
        self.preset, self.cache, self.defer = preset, cache, defer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (B, C, S, S) uint8
        labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
        out = {"image": images, "label": labels}
        if "logits" in batch:  # a teacher's, read from disk (train.distill.logits)
            out["logits"] = torch.from_numpy(np.asarray(batch["logits"], dtype=np.float32))
        return out if self.defer else self.augment(out)

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cache is not None:  # kept as decoded (augment_batch and training never modify in place),
            self.cache.add(batch["image"], batch["label"])  # deferred: in batch order
        if self.preset is None:
            return batch
        return {**batch, "image": self.preset.augment_batch(batch["image"])}  # (B, C, H, W) uint8


class PairCollate(NumpyBatchCollateFn):
    """Segmentation: each image and its class mask through one draw of the random geometry, in
    Ray Data's prefetch threads on the worker (`preset=None`: validation, as decoded; `defer`: as
    AugmentCollate's)."""

    def __init__(self, preset: SegmentationTrainPreset | None, defer: bool = False):
        self.preset, self.defer = preset, defer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (B, C, S, S) uint8
        masks = torch.from_numpy(np.require(batch["mask"], requirements=["C", "W"]))  # (B, S, S) uint8
        out = {"image": images, "mask": masks}
        return out if self.defer else self.augment(out)

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, masks = batch["image"], batch["mask"]
        if self.preset is not None:
            images, masks = self.preset.augment_pairs(images, masks)
        return {"image": images, "mask": masks.long()}


class BoxCollate(NumpyBatchCollateFn):
    """Detection: each image and its boxes through one draw of the random geometry, in Ray Data's
    prefetch threads (`preset=None`: validation, as decoded; `defer`: as AugmentCollate's).
    Targets differ in length from image to image, so they travel flat: `boxes` (sum n_i, 4),
    `labels` (sum n_i,) and `counts` (B,)."""

    def __init__(self, preset: DetectionTrainPreset | None, defer: bool = False):
        self.preset, self.defer = preset, defer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (B, 3, S, S) uint8
        boxes = [torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1, 4)) for b in batch["boxes"]]
        labels = [torch.from_numpy(np.asarray(lb, dtype=np.int64).reshape(-1)) for lb in batch["labels"]]
        out = _flat(images, boxes, labels)
        return out if self.defer else self.augment(out)

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.preset is None:
            return batch
        counts = batch["counts"].tolist()
        images, boxes, labels = self.preset.augment_targets(batch["image"], list(batch["boxes"].split(counts)),
                                                            list(batch["labels"].split(counts)))
        return _flat(images, boxes, labels)


def _flat(images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"image": images, "boxes": torch.cat(boxes).reshape(-1, 4), "labels": torch.cat(labels),
            "counts": torch.tensor([len(b) for b in boxes], dtype=torch.int64)}


def box_targets(batch: dict[str, torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """A BoxCollate batch's flat targets -> torchvision's list of {"boxes", "labels"}, one per image."""
    counts = batch["counts"].tolist()
    return [{"boxes": b.to(device), "labels": lb.to(device)}
            for b, lb in zip(batch["boxes"].split(counts), batch["labels"].split(counts))]

