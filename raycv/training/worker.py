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
from ray.train import Checkpoint

from raycv.config import TrainConfig
from raycv.data.presets import (ClassificationEvalPreset, ClassificationTrainPreset, DetectionEvalPreset,
                                DetectionTrainPreset, SegmentationEvalPreset, SegmentationTrainPreset)
from raycv.models import get_model
from raycv.training import checkpoint as ckpt
from raycv.training import pruning, sharding
from raycv.training.batches import AugmentCollate, BoxCollate, PairCollate, ShardCache, box_targets
from raycv.training.evaluation import all_reduce_sum, evaluate, evaluate_detection, evaluate_segmentation
from raycv.training.optim import build_optimizer, build_scheduler, follow_config
from raycv.training.precision import Precision
from raycv.training.step import build_stepper
from raycv.redact import redact_tree
from raycv.training.tracking import RunLogger, flatten


def _worker_nodes(rank: int, world: int) -> list[str]:
    """The Ray node ID of every rank, in rank order (for the metrics log: who ran where)."""
    mine = ray.get_runtime_context().get_node_id()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, mine)
    return [str(n) for n in nodes]


def _write_sharded(model, optimizer, info: ckpt.CheckpointInfo, state: dict, rank: int, world: int):
    """A sharded checkpoint folder of this rank (Ray Train merges the ranks' folders into one)."""
    d = ckpt.new_checkpoint_dir()
    state = {**state, **sharding.save(d, model, optimizer)}  # + the optimizer's param_groups
    if rank == 0:
        torch.save(state, d / ckpt.STATE_FILE)
    digests = sharding.world_files(d)  # every rank's files, gathered
    if rank == 0:
        info.sharded = {"format": sharding.FORMAT, "world_size": world, "strategy": "fsdp"}
        ckpt.write_meta(d, info, digests)
    return d


def train_loop_per_worker(config: dict[str, Any]) -> None:
    loop_entered = time.time()  # this module's imports (torch, torchvision, Ray Train) are done
    cfg = TrainConfig.model_validate(config["cfg"])
    from raycv import plugins

    plugins.load(cfg.run.plugins)  # models and datasets of the user's own, in this worker's process too
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
    fsdp = cfg.scaling.strategy == "fsdp"  # bf16 through FSDP's own policy, not autocast
    precision = Precision("none" if fsdp else tc.amp, tc.channels_last, device)

    model = get_model(cfg.model.name, num_classes=len(classes), weights=cfg.model.weights, **cfg.model.kwargs)
    if cfg.model.init_from:
        ckpt.init_from_checkpoint(model, cfg.model.init_from, task)
    pause_every = config.get("pause_every")
    resumed = ray.train.get_checkpoint()
    if resumed is None and config.get("continue_from"):  # raycv tune's PBT: another trial's weights, this run's values
        resumed = Checkpoint.from_directory(str(ckpt.local_dir(config["continue_from"])))
    if tc.prune.amount and resumed is None:
        model = pruning.prune(model, tc.prune, eval_preset.shape)
    elif tc.prune.amount and tc.prune.method == "ln_structured":  # the widths the run's checkpoint has
        with resumed.as_directory() as d:
            model = pruning.shaped_like(model, ckpt.load_state_dict(d))
    if tc.sync_batchnorm and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tc.activation_checkpointing:
        sharding.checkpoint_activations(model)
    model = precision.layout(model)
    if fsdp:  # sharded before the optimizer is built: it holds each rank's shards only
        model = sharding.shard(model.to(device), amp=tc.amp)
    optimizer = build_optimizer(model, cfg.optim)
    rows_per_rank = config["num_train"] // world  # streaming_split(equal=True) gives each rank this many
    batches_per_epoch = max(1, math.ceil(rows_per_rank / cfg.data.batch_size))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / tc.grad_accum_steps))
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, cfg=tc)
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    ema = None
    if tc.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True).to(device)

    start_epoch, best, stale = 1, None, 0
    if resumed is not None and fsdp:
        with resumed.as_directory() as d:
            sharding.verify_together(d)  # every shard is the one raycv.json records (ranks share the hashing)
            state = ckpt.load_train_state(d)
            sharding.load(d, model, optimizer, state["param_groups"])  # resharded to this world size
    elif resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.load_train_state(d)
            # With EMA, model.pt holds the averaged weights; the raw ones are in the train state.
            model.load_state_dict(state["model"] if "model" in state else ckpt.load_state_dict(d))
        optimizer.load_state_dict(state["optimizer"])
    if resumed is not None:
        scheduler.load_state_dict(state["scheduler"])
        follow_config(optimizer, scheduler, configured)
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if "scaler" in state:
            precision.scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, stale = state.get("best"), int(state.get("stale", 0))
    recorded_cfg = redact_tree(config["cfg"])  # what checkpoints and MLflow write down: no credentials
    mlflow = None
    if rank == 0 and config.get("mlflow_tracking_uri"):
        mlflow = dict(tracking_uri=config["mlflow_tracking_uri"], experiment=cfg.run.mlflow_experiment,
                      run_name=cfg.run.name, params=flatten(recorded_cfg))
    log = RunLogger(run_dir, start_epoch, steps_done=(start_epoch - 1) * steps_per_epoch,
                    every_steps=tc.log_every_steps, tensorboard=tc.tensorboard, mlflow=mlflow) if rank == 0 else None

    if not fsdp:
        model = ray.train.torch.prepare_model(model)
    raw = ckpt.unwrap(model)
    stepper = build_stepper(model, optimizer, scheduler, cfg=tc, task=task, num_classes=len(classes),
                            precision=precision, batches_per_epoch=batches_per_epoch, ema=ema, ema_source=raw,
                            student_norm=(train_preset.mean, train_preset.std) if task == "classification" else None,
                            device=device,
                            masks=pruning.masks(raw) if tc.prune.amount and tc.prune.method == "global_magnitude" else None)
    loss_fn = stepper.loss_fn
    nodes = _worker_nodes(rank, world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    cache = ShardCache(cfg.data.worker_cache_mb * 1e6) if config.get("worker_cache") else None
    defer = tc.deterministic  # augmentation on this thread, in batch order (see AugmentCollate)
    collate = (PairCollate(train_preset, defer) if segmentation else BoxCollate(train_preset, defer) if detection
               else AugmentCollate(train_preset, cache, defer))

    def shuffle_seed(epoch: int) -> int | None:
        return tc.seed * 1_000_000 + rank * 1000 + epoch if tc.deterministic else None

    order = torch.Generator().manual_seed(tc.seed * 1000 + rank)
    startup = None
    if rank == 0:  # where this attempt's start-up went, as wall-clock times (startup.json)
        import psutil

        startup = {"worker_process": psutil.Process().create_time(), "loop_entered": loop_entered,
                   "model_ready": time.time()}
    higher_is_better = tc.checkpoint_metric != "val_loss"

    def pruned(m) -> dict | None:  # what raycv.json says of the pruning (raycv.training.pruning)
        if not tc.prune.amount:
            return None
        return {"method": tc.prune.method, "amount": tc.prune.amount, "structured": tc.prune.method == "ln_structured",
                "sparsity": round(pruning.sparsity(m), 6), "parameters": sum(p.numel() for p in m.parameters()),
                "source": cfg.model.init_from}

    for epoch in range(start_epoch, tc.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, kd_sum = 0.0, 0, torch.zeros((), device=device)
        stepper.begin_epoch()
        if cache is not None and cache.ready:
            batches = cache.batches(cfg.data.batch_size, train_preset, order)
        else:
            batches = train_shard.iter_torch_batches(batch_size=cfg.data.batch_size, collate_fn=collate,
                                                     prefetch_batches=2, local_shuffle_buffer_size=4 * cfg.data.batch_size,
                                                     local_shuffle_seed=shuffle_seed(epoch))
        for batch in batches:
            if startup is not None and "first_batch" not in startup:
                startup["first_batch"] = time.time()
            if defer:
                batch = collate.augment(batch)
            x = train_preset.normalize(batch["image"].to(device))  # (B, C, H, W) float32
            y = box_targets(batch, device) if detection else batch[target].to(device)
            result = stepper(x, y, batch["logits"].to(device) if "logits" in batch else None)
            loss = result.loss.item()  # one device sync per batch
            if result.stepped and log is not None:
                log.step(epoch=epoch, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=result.grad_norm)
            if startup is not None and "first_step" not in startup:
                startup["first_step"] = time.time()
                log.startup(startup)
            loss_sum += loss * x.shape[0]
            seen += x.shape[0]
            if stepper.distill is not None:  # the teacher's term alone, summed on the device
                kd_sum += stepper.distill.last_kd * x.shape[0]
            if log is not None:
                log.progress(epoch=epoch, epochs=tc.epochs, images=seen * world, total=rows_per_rank * world,
                             seconds=time.perf_counter() - t0)
        train_time = time.perf_counter() - t0
        if cache is not None and not cache.ready:
            cache.seal()
            collate.cache = None
        loss_sum, seen, train_time, kd_sum = all_reduce_sum([loss_sum, seen, train_time, float(kd_sum)], device)
        train_time /= world
        metrics = {"epoch": epoch, "epochs": tc.epochs, "train_loss": loss_sum / max(seen, 1),
                   "train_images": int(seen), "images_per_second": seen / max(train_time, 1e-9),
                   "train_seconds": train_time, "lr": optimizer.param_groups[0]["lr"]}
        if stepper.distill is not None:
            metrics["train_distill_loss"] = kd_sum / max(seen, 1)
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
            metrics.update(evaluate(evaluated, val_shard, eval_preset, loss_fn, cfg.data.batch_size, device, precision,
                                    lockstep=fsdp))
        if fsdp:  # the share of the parameters this rank holds
            local, full = sharding.local_numel(model)
            metrics["param_shard_fraction"] = local / full
        metrics["val_seconds"] = time.perf_counter() - t1

        value = metrics[tc.checkpoint_metric]
        if best is None or (value > best if higher_is_better else value < best):
            best, stale = value, 0
        else:
            stale += 1
        stop = tc.early_stop_patience is not None and stale >= tc.early_stop_patience and epoch < tc.epochs
        checkpoint = None
        info = ckpt.CheckpointInfo(task=task, model_name=cfg.model.name, model_kwargs=cfg.model.kwargs,
                                   classes=classes, preprocess=eval_preset, epoch=epoch, metrics=metrics,
                                   config=recorded_cfg, pruning=pruned(evaluated) if rank == 0 else None)
        state = {"scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "stale": stale}
        if fsdp:  # every rank writes its shard; rank 0 the rest, recording every rank's files
            checkpoint = Checkpoint.from_directory(str(_write_sharded(model, optimizer, info, state, rank, world)))
        elif rank == 0:
            state["optimizer"] = optimizer.state_dict()
            if precision.scaler.is_enabled():
                state["scaler"] = precision.scaler.state_dict()
            if ema is not None:
                state["ema"] = ema.state_dict()
                state["model"] = raw.state_dict()
            checkpoint = Checkpoint.from_directory(str(ckpt.write_checkpoint(ckpt.new_checkpoint_dir(), evaluated, info, state)))
        if rank == 0:
            log.epoch({**metrics, "worker_nodes": nodes, "time": time.time(), "started_at_epoch": start_epoch,
                       **({"early_stopped": True} if stop else {})})
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        if stop:  # every rank sees the same all-reduced metrics, so all stop together
            break
        if pause_every and epoch % pause_every == 0 and epoch < tc.epochs:  # raycv tune's PBT compares here
            break
    if log is not None:
        log.close()
