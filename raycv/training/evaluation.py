"""Validation on a Ray Train worker, one function per task. Each rank scores its own shard of the
validation set and the ranks combine their sums, so every sample counts once whatever the world size."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from raycv.data.presets import IGNORE_INDEX, ClassificationEvalPreset, DetectionEvalPreset, SegmentationEvalPreset
from raycv.training.batches import AugmentCollate, BoxCollate, PairCollate, box_targets
from raycv.training.optim import correct_topk
from raycv.training.precision import Precision


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def in_lockstep(batches, device: torch.device):
    """Sharded models (FSDP) gather their weights from every rank in each forward, so all ranks
    must forward as often; the validation shards are unequal (each sample counted once). A rank
    whose shard has run out yields None (a stand-in forward) until every rank is done."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([int(batch is not None)], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, shard, preset: ClassificationEvalPreset, loss_fn, batch_size: int,
             device: torch.device, precision: "Precision | None" = None, lockstep: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 over this rank's shard, summed over all ranks: each sample once.
    `lockstep`: every rank forwards as often (`in_lockstep`)."""
    model.eval()
    loss_sum = c1 = c5 = n = 0.0
    batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=AugmentCollate(None))
    for batch in in_lockstep(batches, device) if lockstep else batches:
        if batch is None:  # this rank is done: a forward the others' gathers wait for, not counted
            model(torch.zeros((1, *preset.shape), device=device))
            continue
        x, y = preset.normalize(batch["image"].to(device)), batch["label"].to(device)
        with precision.autocast() if precision else contextlib.nullcontext():
            out = model(precision.input(x) if precision else x).float()
        loss_sum += float(loss_fn(out, y)) * y.shape[0]
        k1, k5 = correct_topk(out, y, (1, 5))
        c1, c5, n = c1 + k1, c5 + k5, n + y.shape[0]
    loss_sum, c1, c5, n = all_reduce_sum([loss_sum, c1, c5, n], device)
    return {"val_loss": loss_sum / max(n, 1), "val_accuracy": c1 / max(n, 1), "val_top5": c5 / max(n, 1),
            "val_count": int(n)}


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, shard, preset: SegmentationEvalPreset, loss_fn, num_classes: int,
                          batch_size: int, device: torch.device, precision: "Precision | None" = None) -> dict[str, float]:
    """Loss, mIoU and pixel accuracy over every validation pixel of every rank (torchmetrics sums
    the confusion matrices across ranks); void pixels (255) are not counted."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    miou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX).to(device)
    pixel = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX).to(device)
    model.eval()
    loss_sum = n = 0.0
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=PairCollate(None)):
        x, y = preset.normalize(batch["image"].to(device)), batch["mask"].to(device)
        with precision.autocast() if precision else contextlib.nullcontext():
            out = model(precision.input(x) if precision else x)
        out = {k: v.float() for k, v in out.items() if v is not None}
        loss_sum += float(loss_fn(out, y)) * y.shape[0]
        n += y.shape[0]
        pred = out["out"].argmax(1)
        miou.update(pred, y)
        pixel.update(pred, y)
    loss_sum, n = all_reduce_sum([loss_sum, n], device)
    return {"val_loss": loss_sum / max(n, 1), "val_miou": float(miou.compute()),
            "val_pixel_accuracy": float(pixel.compute()), "val_count": int(n)}


@torch.no_grad()
def evaluate_detection(model: torch.nn.Module, shard, preset: DetectionEvalPreset, batch_size: int,
                       device: torch.device, precision: "Precision | None" = None) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@.5 over every validation image of every rank (torchmetrics'
    MeanAveragePrecision on pycocotools). Boxes are compared in the letterboxed pixels: one scale
    factor for prediction and truth, so the IoUs are those at the original size.

    The ranks exchange their detections and ground truth with one all_gather_object and each
    computes the same result: torchmetrics' own sync gathers the per-image list states one
    collective call per image, which deadlocks when the ranks hold different numbers of images."""
    from torchmetrics.detection import MeanAveragePrecision

    model.eval()
    preds, truth = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=BoxCollate(None)):
        x = preset.normalize(batch["image"].to(device))
        with precision.autocast() if precision else contextlib.nullcontext():
            out = model(list(precision.input(x) if precision else x))
        preds += [{"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu()}
                  for o in out]
        truth += [{k: v.cpu() for k, v in t.items()} for t in box_targets(batch, torch.device("cpu"))]
    parts = [(preds, truth)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (preds, truth))
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False)
    n = 0
    for p, t in parts:
        if p:
            metric.update(p, t)
            n += len(p)
    result = metric.compute() if n else {"map": torch.tensor(0.0), "map_50": torch.tensor(0.0)}
    # -1 means "no ground truth to score against": report 0 rather than a negative precision
    return {"val_map": max(0.0, float(result["map"])), "val_map50": max(0.0, float(result["map_50"])),
            "val_count": int(n)}
