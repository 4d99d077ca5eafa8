"""The Ray Train worker: `train_loop_per_worker(config)`, run once per DDP rank.

Everything here runs inside Ray Train worker processes. Rank 0 alone writes checkpoints and the
metrics log; every rank calls `ray.train.report` the same number of times (it is a barrier).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint

from raycv.config import TrainConfig
from raycv.data.presets import (IGNORE_INDEX, ClassificationEvalPreset, ClassificationTrainPreset, DetectionEvalPreset,
                                DetectionTrainPreset, SegmentationEvalPreset, SegmentationTrainPreset)
from raycv.models import get_model
from raycv.train import checkpoint as ckpt
from raycv.train.optim import build_batch_mix, build_loss, build_optimizer, build_scheduler, correct_topk
from raycv.train.tracking import RunLogger, flatten


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
    (and, with a ShardCache, keeps the un-augmented batch for later epochs)."""

    def __init__(self, preset: ClassificationTrainPreset | None, cache: ShardCache | None = None):
        self.preset, self.cache = preset, cache

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (B, C, S, S) uint8
        labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
        if self.cache is not None:
            self.cache.add(images, labels)  # kept as decoded: augment_batch and training never modify in place
        if self.preset is not None:
            images = self.preset.augment_batch(images)  # (B, C, H, W) uint8
        return {"image": images, "label": labels}


class PairCollate(NumpyBatchCollateFn):
    """Segmentation: each image and its class mask through one draw of the random geometry, in
    Ray Data's prefetch threads on the worker (`preset=None`: validation, as decoded)."""

    def __init__(self, preset: SegmentationTrainPreset | None):
        self.preset = preset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (B, C, S, S) uint8
        masks = torch.from_numpy(np.require(batch["mask"], requirements=["C", "W"]))  # (B, S, S) uint8
        if self.preset is not None:
            images, masks = self.preset.augment_pairs(images, masks)
        return {"image": images, "mask": masks.long()}


class BoxCollate(NumpyBatchCollateFn):
    """Detection: each image and its boxes through one draw of the random geometry, in Ray Data's
    prefetch threads (`preset=None`: validation, as decoded). Targets differ in length from image
    to image, so they travel flat: `boxes` (sum n_i, 4), `labels` (sum n_i,) and `counts` (B,)."""

    def __init__(self, preset: DetectionTrainPreset | None):
        self.preset = preset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))  # (B, 3, S, S) uint8
        boxes = [torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1, 4)) for b in batch["boxes"]]
        labels = [torch.from_numpy(np.asarray(lb, dtype=np.int64).reshape(-1)) for lb in batch["labels"]]
        if self.preset is not None:
            images, boxes, labels = self.preset.augment_targets(images, boxes, labels)
        return {"image": images, "boxes": torch.cat(boxes).reshape(-1, 4), "labels": torch.cat(labels),
                "counts": torch.tensor([len(b) for b in boxes], dtype=torch.int64)}


def box_targets(batch: dict[str, torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """A BoxCollate batch's flat targets -> torchvision's list of {"boxes", "labels"}, one per image."""
    counts = batch["counts"].tolist()
    return [{"boxes": b.to(device), "labels": lb.to(device)}
            for b, lb in zip(batch["boxes"].split(counts), batch["labels"].split(counts))]


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, shard, preset: ClassificationEvalPreset, loss_fn, batch_size: int,
             device: torch.device, precision: "Precision | None" = None) -> dict[str, float]:
    """Loss, top-1 and top-5 over this rank's shard, summed over all ranks: each sample once."""
    import contextlib

    model.eval()
    loss_sum = c1 = c5 = n = 0.0
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=AugmentCollate(None)):
        x, y = preset.normalize(batch["image"].to(device)), batch["label"].to(device)
        with precision.autocast() if precision else contextlib.nullcontext():
            out = model(precision.input(x) if precision else x).float()
        loss_sum += float(loss_fn(out, y)) * y.shape[0]
        k1, k5 = correct_topk(out, y, (1, 5))
        c1, c5, n = c1 + k1, c5 + k5, n + y.shape[0]
    loss_sum, c1, c5, n = _all_reduce_sum([loss_sum, c1, c5, n], device)
    return {"val_loss": loss_sum / max(n, 1), "val_accuracy": c1 / max(n, 1), "val_top5": c5 / max(n, 1),
            "val_count": int(n)}


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, shard, preset: SegmentationEvalPreset, loss_fn, num_classes: int,
                          batch_size: int, device: torch.device, precision: "Precision | None" = None) -> dict[str, float]:
    """Loss, mIoU and pixel accuracy over every validation pixel of every rank (torchmetrics sums
    the confusion matrices across ranks); void pixels (255) are not counted."""
    import contextlib

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
    loss_sum, n = _all_reduce_sum([loss_sum, n], device)
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
    import contextlib

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


def _worker_nodes(rank: int, world: int) -> list[str]:
    """The Ray node ID of every rank, in rank order (for the metrics log: who ran where)."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, mine)
    return [str(n) for n in nodes]


class Precision:
    """Autocast and the fp16 grad scaler, per `train.amp`; `channels_last` input layout."""

    def __init__(self, amp: str, channels_last: bool, device: torch.device):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.device_type = device.type
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _no_sync(model: torch.nn.Module, skip: bool):
    """DDP all-reduces gradients on every backward; between accumulation steps it need not."""
    import contextlib

    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(config["cfg"])
    tc = cfg.train
    classes: list[str] = config["classes"]
    run_dir: str = config["run_dir"]
    task: str = config.get("task", "classification")
    segmentation, detection = task == "segmentation", task == "detection"
    if segmentation:
        train_preset = SegmentationTrainPreset(**config["train_preset"])
        eval_preset = SegmentationEvalPreset.from_dict(config["eval_preset"])
    elif detection:
        train_preset = DetectionTrainPreset(**config["train_preset"])
        eval_preset = DetectionEvalPreset.from_dict(config["eval_preset"])
    else:
        train_preset = ClassificationTrainPreset(**config["train_preset"])
        eval_preset = ClassificationEvalPreset.from_dict(config["eval_preset"])
    target = "mask" if segmentation else "label"
    torch.set_num_threads(config["threads"])

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed * 1000 + rank)
    np.random.seed(tc.seed * 1000 + rank)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = ray.train.torch.get_device()
    precision = Precision(tc.amp, tc.channels_last, device)

    model = get_model(cfg.model.name, num_classes=len(classes), weights=cfg.model.weights, **cfg.model.kwargs)
    if cfg.model.init_from:
        ckpt.init_from_checkpoint(model, cfg.model.init_from, task)
    if tc.sync_batchnorm and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    rows_per_rank = config["num_train"] // world  # streaming_split(equal=True) gives each rank this many
    batches_per_epoch = max(1, math.ceil(rows_per_rank / cfg.data.batch_size))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / tc.grad_accum_steps))
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, cfg=tc)
    loss_fn = None if detection else build_loss(tc, task)  # detection models compute their own losses
    mix = build_batch_mix(tc, len(classes)) if task == "classification" else None
    ema = None
    if tc.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True).to(device)

    start_epoch, best, stale = 1, None, 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.load_train_state(d)
            # With EMA, model.pt holds the averaged weights; the raw ones are in the train state.
            model.load_state_dict(state["model"] if "model" in state else ckpt.load_state_dict(d))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if "scaler" in state:
            precision.scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, stale = state.get("best"), int(state.get("stale", 0))
    mlflow = None
    if rank == 0 and config.get("mlflow_tracking_uri"):
        mlflow = dict(tracking_uri=config["mlflow_tracking_uri"], experiment=cfg.run.mlflow_experiment,
                      run_name=cfg.run.name, params=flatten(config["cfg"]))
    log = RunLogger(run_dir, start_epoch, steps_done=(start_epoch - 1) * steps_per_epoch,
                    every_steps=tc.log_every_steps, tensorboard=tc.tensorboard, mlflow=mlflow) if rank == 0 else None

    model = ray.train.torch.prepare_model(model)
    raw = ckpt.unwrap(model)
    step_model = torch.compile(model) if tc.compile else model
    nodes = _worker_nodes(rank, world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    cache = ShardCache(cfg.data.worker_cache_mb * 1e6) if config.get("worker_cache") else None
    collate = (PairCollate(train_preset) if segmentation else BoxCollate(train_preset) if detection
               else AugmentCollate(train_preset, cache))
    order = torch.Generator().manual_seed(tc.seed * 1000 + rank)
    higher_is_better = tc.checkpoint_metric != "val_loss"

    for epoch in range(start_epoch, tc.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, micro = 0.0, 0, 0
        optimizer.zero_grad(set_to_none=True)
        if cache is not None and cache.ready:
            batches = cache.batches(cfg.data.batch_size, train_preset, order)
        else:
            batches = train_shard.iter_torch_batches(batch_size=cfg.data.batch_size, collate_fn=collate,
                                                     prefetch_batches=2, local_shuffle_buffer_size=4 * cfg.data.batch_size,
                                                     local_shuffle_seed=None)
        for batch in batches:
            x = train_preset.normalize(batch["image"].to(device))  # (B, C, H, W) float32
            y = box_targets(batch, device) if detection else batch[target].to(device)
            if mix is not None:
                x, y = mix(x, y)  # y: (B, num_classes) probabilities
            micro += 1
            last = micro % tc.grad_accum_steps == 0 or micro == batches_per_epoch
            with _no_sync(model, not last), precision.autocast():
                if detection:  # torchvision detection models: a list of images and targets in, their loss dict out
                    loss = sum(step_model(list(precision.input(x)), y).values())
                else:
                    loss = loss_fn(step_model(precision.input(x)), y)
            precision.scaler.scale(loss / tc.grad_accum_steps).backward()
            if last:
                if tc.grad_clip_norm:
                    precision.scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip_norm)
                precision.scaler.step(optimizer)
                precision.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(raw)
                if log is not None:
                    log.step(epoch=epoch, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
            loss_sum += loss.item() * x.shape[0]
            seen += x.shape[0]
        train_time = time.perf_counter() - t0
        if cache is not None and not cache.ready:
            cache.seal()
            collate.cache = None
        loss_sum, seen, train_time = _all_reduce_sum([loss_sum, seen, train_time], device)
        train_time /= world
        metrics = {"epoch": epoch, "epochs": tc.epochs, "train_loss": loss_sum / max(seen, 1),
                   "train_images": int(seen), "images_per_second": seen / max(train_time, 1e-9),
                   "train_seconds": train_time, "lr": optimizer.param_groups[0]["lr"]}
        if device.type == "cuda":  # this rank's peak; utilization needs pynvml
            metrics["gpu_max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            try:
                metrics["gpu_utilization"] = float(torch.cuda.utilization(device))
            except Exception:
                pass
        t1 = time.perf_counter()
        evaluated = ema.module if ema is not None else raw  # with EMA, the averaged weights are the model
        if segmentation:
            metrics.update(evaluate_segmentation(evaluated, val_shard, eval_preset, loss_fn, len(classes),
                                                 cfg.data.batch_size, device, precision))
        elif detection:
            metrics.update(evaluate_detection(evaluated, val_shard, eval_preset, cfg.data.batch_size, device, precision))
        else:
            metrics.update(evaluate(evaluated, val_shard, eval_preset, loss_fn, cfg.data.batch_size, device, precision))
        metrics["val_seconds"] = time.perf_counter() - t1

        value = metrics[tc.checkpoint_metric]
        if best is None or (value > best if higher_is_better else value < best):
            best, stale = value, 0
        else:
            stale += 1
        stop = tc.early_stop_patience is not None and stale >= tc.early_stop_patience and epoch < tc.epochs
        checkpoint = None
        if rank == 0:
            info = ckpt.CheckpointInfo(task=task, model_name=cfg.model.name, model_kwargs=cfg.model.kwargs,
                                       classes=classes, preprocess=eval_preset, epoch=epoch, metrics=metrics,
                                       config=config["cfg"])
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                     "best": best, "stale": stale}
            if precision.scaler.is_enabled():
                state["scaler"] = precision.scaler.state_dict()
            if ema is not None:
                state["ema"] = ema.state_dict()
                state["model"] = raw.state_dict()
            checkpoint = Checkpoint.from_directory(str(ckpt.write_checkpoint(ckpt.new_checkpoint_dir(), evaluated, info, state)))
            log.epoch({**metrics, "worker_nodes": nodes, "time": time.time(),
                       **({"early_stopped": True} if stop else {})})
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        if stop:  # every rank sees the same all-reduced metrics, so all stop together
            break
    if log is not None:
        log.close()
