"""The training driver: `fit(cfg)` builds the datasets and the TorchTrainer, runs it, and writes
the run directory (resolved config, metrics log, checkpoints, summary.json)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raycv import plugins, runtime
from raycv.config import TrainConfig, default_run_name, resolve_storage_path, to_yaml
from raycv import tasks
from raycv.data import build_dataset, check_source
from raycv.data import io as fsio
from raycv.data.decode import decode_batch, decode_boxes, decode_pairs
from raycv.data.presets import (ClassificationEvalPreset, ClassificationTrainPreset, DetectionEvalPreset,
                                DetectionTrainPreset, SegmentationEvalPreset, SegmentationTrainPreset)
from raycv.errors import UserError
from raycv.models import get_model, get_model_entry
from raycv.redact import redact, redact_tree
from raycv.training import pruning, sharding
from raycv.training import distill
from raycv.training.entry import ExactValSplit, train_loop
from raycv.training.progress import TrainProgress
from raycv.training.tracking import METRICS_LOG, mlflow_artifacts, mlflow_tracking_uri, startup_marks


@dataclass
class TrainSummary:
    run_dir: str
    best_checkpoint: str | None
    latest_checkpoint: str | None
    epochs: int
    val_accuracy: float | None
    val_top5: float | None
    val_loss: float | None
    images_per_second: float | None
    wall_seconds: float
    resumed_from_epoch: int
    early_stopped: bool = False
    curves: str | None = None
    task: str = "classification"
    checkpoint_metric: str = "val_accuracy"
    metrics: dict | None = None  # the best checkpoint's validation metrics (every task's)
    # seconds from this process's start: fit called, Ray joined, TorchTrainer.fit called; rank 0's process
    # started, its training function entered, its model ready, its first batch, its first step
    startup: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def make_presets(cfg: TrainConfig, mean, std, task: str = "classification"):
    """(train preset, eval preset) for the task."""
    size = cfg.data.input_size
    resize = cfg.data.resize_size or size
    if resize < size:
        raise UserError(f"data.resize_size={resize} is smaller than data.input_size={size}")
    if task in ("segmentation", "detection"):
        augments = SegmentationTrainPreset.AUGMENTS if task == "segmentation" else DetectionTrainPreset.AUGMENTS
        if cfg.data.augment not in augments:
            raise UserError(f"data.augment={cfg.data.augment} is not available for {task} (valid: {', '.join(augments)})")
        if cfg.train.mixup_alpha or cfg.train.cutmix_alpha or cfg.data.random_erasing:
            raise UserError("train.mixup_alpha / train.cutmix_alpha / data.random_erasing are for classification only")
    if task == "segmentation":
        return (SegmentationTrainPreset(input_size=size, resize_size=resize, augment=cfg.data.augment,
                                        hflip=cfg.data.hflip, mean=tuple(mean), std=tuple(std)),
                SegmentationEvalPreset(input_size=size, mean=tuple(mean), std=tuple(std)))
    if task == "detection":  # the model normalizes (torchvision detection models do it themselves)
        if cfg.data.mean is not None or cfg.data.std is not None:
            raise UserError("data.mean / data.std are not used by detection models, which normalize with their "
                            "own: set model.kwargs.image_mean / model.kwargs.image_std instead")
        return (DetectionTrainPreset(input_size=size, resize_size=resize, augment=cfg.data.augment, hflip=cfg.data.hflip),
                DetectionEvalPreset(input_size=size))
    train = ClassificationTrainPreset(input_size=size, resize_size=resize, augment=cfg.data.augment,
                                      hflip=cfg.data.hflip, random_erasing=cfg.data.random_erasing, mean=tuple(mean), std=tuple(std))
    val = ClassificationEvalPreset(input_size=size, resize_size=resize, mean=tuple(mean), std=tuple(std))
    return train, val


# A cached set this small (decoded) is decoded here, in the driver, which has imported torch and
# torchvision already: a Ray Data task would first spend seconds of CPU in a fresh process
# importing them, on the critical path of every start (measured, digits' 1,797 images: 7.2 s to
# materialize through a task, 2.1 s here). Larger sets go through Ray Data tasks on the cluster;
# up to SMALL_SET_ROWS rows in one decode process (more would each pay those imports).
DRIVER_DECODE_BYTES = 256 * 2**20
SMALL_SET_ROWS = 5000


def decoded_nbytes(preset, rows: int) -> int:
    """Size of `rows` images as `preset` stores them decoded: uint8 C*H*W, plus a segmentation mask's H*W."""
    c, h, w = preset.shape
    return rows * (c + isinstance(preset, (SegmentationTrainPreset, SegmentationEvalPreset))) * h * w


def decoded(ds: ray.data.Dataset, preset, *, num_cpus: float, cache: bool, rows: int | None = None,
            num_classes: int | None = None, keep: tuple[str, ...] = ("label",)) -> ray.data.Dataset:
    """Decode + the preset's geometry; `cache`: materialized in the object store. Segmentation
    masks and detection labels are checked against `num_classes`. A small cached set (`rows`
    known) is decoded in this process, anything else in Ray Data tasks."""
    if isinstance(preset, (SegmentationTrainPreset, SegmentationEvalPreset)):
        fn, kwargs = decode_pairs, {"preset": preset, "num_classes": num_classes}
    elif isinstance(preset, (DetectionTrainPreset, DetectionEvalPreset)):
        fn, kwargs = decode_boxes, {"preset": preset, "num_classes": num_classes}
    else:
        fn, kwargs = decode_batch, {"geometry": preset.pixels, "shape": preset.shape, "with_path": False, "keep": keep}
    if cache and rows is not None and decoded_nbytes(preset, rows) <= DRIVER_DECODE_BYTES:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.batch_to_block(fn(batch, **kwargs))
                  for batch in ds.iter_batches(batch_size=64, batch_format="numpy")]
        return ray.data.from_blocks(tables) if tables else ds  # metadata computed here: no task
    one = {"concurrency": 1} if rows is not None and rows <= SMALL_SET_ROWS else {}
    ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=64, num_cpus=num_cpus, **one)
    return ds.materialize() if cache else ds


# glibc's malloc in a Ray Train worker: the training function runs in a thread of its own (so in
# a malloc arena of its own), and that arena handed the activations' memory back to the kernel
# after every step (madvise, ~1 ms a call) for the next step to page-fault it in again. Measured
# with bench/train_cpu.py, strace and perf (simple_cnn, 32 px, 1 worker, 2 CPUs): 30-120 page
# faults per image in most runs, 6.8% of the worker's CPU samples in the kernel; with these
# settings at most 0.3, and 1.01-1.30x the images/s in four interleaved pairs. One arena, up to
# 1 GiB kept free at the top of the heap, mmap only above 32 MiB. The driver's environment wins.
WORKER_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(2**30),
                     "MALLOC_MMAP_THRESHOLD_": str(2**25), "MALLOC_TOP_PAD_": str(2**26)}


def worker_malloc_env() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()}


def fit(cfg: TrainConfig, echo: Callable[[str], None] = print, callbacks: list | None = None,
        continue_from: str | None = None, pause_every: int | None = None) -> TrainSummary:
    """Train `cfg` with Ray Train; resume when `run.name` names an existing run. What it echoes and
    writes has credentials in URIs redacted. `callbacks`: more Ray Train callbacks (raycv tune's
    reports). raycv tune's PBT: `continue_from`, a raycv checkpoint of another run that a new run
    starts from (its weights, optimizer state and epoch; the optimizer's values are `cfg`'s), and
    `pause_every`, the run ends after each epoch that is a multiple of it (run again, it goes on)."""
    echo = _redacted(echo)
    t_start = time.perf_counter()
    marks = {"fit": time.time()}
    plugins.load(cfg.run.plugins)  # a plugin that fails to import, or takes a name, fails here, before Ray starts
    task = check_source(cfg.data).task  # unknown model or dataset, missing files, a mismatch: fail before Ray starts
    if cfg.model.init_from and not fsio.exists(cfg.model.init_from):
        raise UserError(f"model.init_from does not exist: {cfg.model.init_from}")
    tasks.check_model_fits(task, cfg.model.name, get_model_entry(cfg.model.name).task)
    distill.check(cfg, task)  # a teacher's checkpoint, or logits and a recipe that keeps their pairing
    pruning.check(cfg.train.prune, task=task, init_from=cfg.model.init_from)
    sharding.check(cfg, task)
    tasks.check_extras(task)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "checkpoint_metric": tasks.checkpoint_metric(task, cfg.train.checkpoint_metric)})})
    if task == "detection":  # the model's own transform keeps raycv's input squares as they are
        from raycv.models.detection import sized_kwargs

        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
            "kwargs": sized_kwargs(cfg.model.name, cfg.model.kwargs, cfg.data.input_size)})})
    make_presets(cfg, (0.0,) * 3, (1.0,) * 3, task)  # their settings are checked here, before Ray starts
    if cfg.train.amp == "fp16" and not cfg.scaling.use_gpu:
        raise UserError("train.amp=fp16 needs GPUs (scaling.use_gpu=true); on CPU use train.amp=bf16")
    mlflow_uri = mlflow_tracking_uri(cfg.run.mlflow_tracking_uri, echo)
    storage = resolve_storage_path(cfg.run.storage_path)
    name = cfg.run.name or default_run_name(cfg)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name, "storage_path": storage})})
    run_dir = fsio.join(storage, name)  # a local folder, a shared mount, or an object-storage URI
    resumed_from = _check_resume(cfg, run_dir, echo)
    if continue_from and not resumed_from:  # a run of its own continues its own checkpoints
        from raycv.training.checkpoint import read_info

        resumed_from = read_info(continue_from).epoch
        echo(f"raycv: continuing from {continue_from} (epoch {resumed_from}) with this run's values")
    else:
        continue_from = None
    runtime.connect(cfg.run.address, verbose=cfg.run.verbose)
    marks["ray"] = time.time()
    default_sizing = cfg.scaling.cpus_per_worker is None and not cfg.scaling.use_gpu  # shares the CPUs free now
    budget = runtime.cpu_budget(need=cfg.scaling.data_cpus + 0.1 * cfg.scaling.fewest_workers if default_sizing else 0.0)
    resources, threads = runtime.plan_worker_resources(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, cpus_per_worker=cfg.scaling.cpus_per_worker,
        gpus_per_worker=cfg.scaling.gpus_per_worker, data_cpus=cfg.scaling.data_cpus, total_cpus=budget.total,
        free_cpus=budget.free, node_cpus=budget.largest_node, min_workers=cfg.scaling.min_workers)
    if cfg.train.deterministic:  # a float sum depends on how many threads split it: not on the CPUs free today
        threads = max(1, int(cfg.scaling.cpus_per_worker or 1))
    runtime.check_can_hold({k: v * cfg.scaling.fewest_workers for k, v in resources.items()},
                           f"training with {cfg.scaling.fewest_workers} worker(s) x {resources}",
                           "lower scaling.num_workers or gpus_per_worker, or set scaling.use_gpu=false")
    try:  # after the checks above: a refused request leaves no run directory behind
        fsio.make_dirs(run_dir)
        fsio.write_text(fsio.join(run_dir, "config.yaml"), to_yaml(cfg))
    except OSError as e:
        raise UserError(f"cannot write the run directory {run_dir}: {str(e).splitlines()[0]}") from None

    splits = build_dataset(cfg.data)
    train_preset, eval_preset = make_presets(cfg, splits.mean, splits.std, task)
    model = get_model(cfg.model.name, num_classes=len(splits.classes), weights=cfg.model.weights, **cfg.model.kwargs)
    if cfg.model.init_from:  # fail here, not in the workers
        from raycv.training.checkpoint import init_from_checkpoint

        init_from_checkpoint(model, cfg.model.init_from, task)
    distill.check(cfg, task, splits.classes)
    offline = bool(cfg.train.distill.logits)
    splits.train = distill.with_teacher_logits(splits.train, cfg)
    echo(f"raycv: {cfg.model.name} on {cfg.data.name} ({splits.num_train} train / {splits.num_val} val images, "
         f"{len(splits.classes)} classes), "
         f"{f'{cfg.scaling.min_workers}-' if cfg.scaling.min_workers else ''}{cfg.scaling.num_workers} worker(s) "
         f"x {resources}; run {run_dir}")
    # A shard small enough for the workers' own memory is also kept there after epoch 1 (ShardCache).
    shard_mb = decoded_nbytes(train_preset, splits.num_train) / cfg.scaling.fewest_workers / 1e6
    worker_cache = (task == "classification" and cfg.data.cache and 0 < shard_mb <= cfg.data.worker_cache_mb
                    and not offline)  # ShardCache keeps images and labels only
    train_ds = decoded(splits.train, train_preset, num_cpus=cfg.data.decode_cpus, cache=cfg.data.cache,
                       rows=splits.num_train, num_classes=len(splits.classes),
                       keep=("label", "logits") if offline else ("label",))
    val_ds = decoded(splits.val, eval_preset, num_cpus=cfg.data.decode_cpus, cache=cfg.data.cache, rows=splits.num_val,
                     num_classes=len(splits.classes))

    order = "max" if cfg.train.checkpoint_metric != "val_loss" else "min"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "classes": splits.classes, "run_dir": run_dir, "task": task,
            "train_preset": {k: getattr(train_preset, k) for k in ("input_size", "resize_size", "augment", "hflip",
                                                                   "random_erasing", "mean", "std")
                             if hasattr(train_preset, k)},
            "eval_preset": eval_preset.to_dict(), "num_train": splits.num_train, "threads": threads,
            "mlflow_tracking_uri": mlflow_uri, "worker_cache": worker_cache, "continue_from": continue_from,
            "pause_every": pause_every,
        },
        scaling_config=ScalingConfig(num_workers=(cfg.scaling.min_workers, cfg.scaling.num_workers)
                                     if cfg.scaling.min_workers else cfg.scaling.num_workers,
                                     use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.checkpoint_metric,
                                               checkpoint_score_order=order),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": {**worker_malloc_env(), **runtime.forwarded_env()}},
            callbacks=list(callbacks or []),
        ),
        datasets={"train": train_ds.randomize_block_order(), "val": val_ds},
        dataset_config=ExactValSplit(execution_options=_ingest_options(cfg.train.deterministic),
                                     fixed_train=_fixed_parts(train_ds, cfg)),
    )
    progress = TrainProgress(run_dir, echo, since=time.time())
    progress.start()
    marks["trainer_fit"] = time.time()
    try:
        result = trainer.fit()
    finally:
        progress.stop.set()
        progress.join()

    best = result.get_best_checkpoint(metric=cfg.train.checkpoint_metric, mode=order) if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints or [] if best is not None and c.path == best.path), {})
    summary = TrainSummary(
        run_dir=run_dir, best_checkpoint=_uri(best, storage),
        latest_checkpoint=_uri(result.checkpoint, storage),
        epochs=_latest_checkpoint_epoch(run_dir), val_accuracy=best_metrics.get("val_accuracy"),
        val_top5=best_metrics.get("val_top5"), val_loss=best_metrics.get("val_loss"),
        images_per_second=_mean_throughput(run_dir), wall_seconds=time.perf_counter() - t_start,
        resumed_from_epoch=resumed_from, task=task, checkpoint_metric=cfg.train.checkpoint_metric,
        metrics={k: v for k, v in best_metrics.items() if k.startswith("val_")},
    )
    summary.early_stopped = summary.epochs < cfg.train.epochs
    summary.startup = startup_marks(marks, run_dir)
    try:
        from raycv.training.report import write_report

        summary.curves = write_report(run_dir).plot
    except Exception as e:  # a plot is not worth failing a finished run
        echo(f"raycv: could not draw the training curves: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    fsio.write_text(fsio.join(run_dir, "summary.json"), json.dumps(redact_tree(summary.to_json()), indent=1))
    if mlflow_uri:
        mlflow_artifacts(mlflow_uri, run_dir, echo)
    return summary


def _fixed_parts(ds: ray.data.Dataset, cfg: TrainConfig) -> list | None:
    """With train.deterministic, a materialized training set in the seed's block order, split into
    one equal part per worker here (ExactValSplit hands rank i part i)."""
    from ray.data.dataset import MaterializedDataset

    if not cfg.train.deterministic or cfg.scaling.min_workers or not isinstance(ds, MaterializedDataset):
        return None
    return ds.randomize_block_order(seed=cfg.train.seed).split(cfg.scaling.num_workers, equal=True)


def _ingest_options(deterministic: bool):
    """Ray Train's ingest options, with train.deterministic in the order the blocks were planned."""
    if not deterministic:
        return None
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return {"train": options}


# What a resumed run must share with the run it continues: the task (from data.name), the model,
# the classes and the data (the split, the input size), and the checkpoints' layout (a sharded FSDP
# checkpoint or DDP's model.pt). A key added after a run was made has its default there.
RESUME_KEYS = (("data", "name"), ("data", "root"), ("data", "num_samples"), ("data", "seed"), ("data", "val_fraction"),
               ("data", "input_size"), ("data", "classes"), ("model", "name"), ("model", "kwargs"),
               ("scaling", "strategy"))
_ADDED_LATER = {("scaling", "strategy"): "ddp"}


def _check_resume(cfg: TrainConfig, run_dir: str, echo: Callable[[str], None]) -> int:
    """-> the epoch this run resumes from (0: a fresh start). An existing run with a checkpoint is
    continued only when compatible; run.resume=never sets it aside first. Checked before Ray
    starts, before config.yaml is rewritten."""
    import yaml

    latest = _latest_checkpoint_epoch(run_dir)
    if latest == 0:
        return 0  # nothing to resume: a fresh start in this folder
    if cfg.run.resume == "never":
        aside = f"{run_dir}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
        fs, src = fsio.resolve(run_dir)
        fs.move(src, fsio.resolve(aside)[1])
        echo(f"raycv: run.resume=never: the existing run was moved to {aside}")
        return 0
    try:
        old = yaml.safe_load(fsio.read_text(fsio.join(run_dir, "config.yaml")) or "") or {}
    except yaml.YAMLError:
        old = {}
    new = redact_tree(cfg.model_dump(mode="json"))  # config.yaml holds the redacted form
    for section, key in RESUME_KEYS:
        was, now = (old.get(section) or {}).get(key, _ADDED_LATER.get((section, key))), new[section][key]
        if was != now:
            raise UserError(f"run {cfg.run.name} exists with {section}.{key}={was!r} (now {now!r}) and cannot be "
                            f"resumed with another {section}; choose a new run.name, or pass run.resume=never to "
                            f"set the old run aside and start fresh")
    return latest


def _redacted(echo: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: echo(redact(line))


def _uri(checkpoint, storage: str) -> str | None:
    """Ray reports a checkpoint's path inside its filesystem (no scheme): give the scheme back."""
    if checkpoint is None:
        return None
    fs, _ = fsio.resolve(storage)
    return fsio.with_scheme(fs, checkpoint.path, storage)


def _latest_checkpoint_epoch(run_dir: str) -> int:
    """The epoch a re-run resumes from: Ray Train always keeps the latest checkpoint (0: none)."""
    from raycv.training.checkpoint import META_FILE

    epochs = []
    for name in fsio.list_names(run_dir):
        if name.startswith("checkpoint_") and (meta := fsio.read_text(fsio.join(run_dir, name, META_FILE))):
            epochs.append(int(json.loads(meta)["epoch"]))
    return max(epochs, default=0)


def _mean_throughput(run_dir: str) -> float | None:
    text = fsio.read_text(fsio.join(run_dir, METRICS_LOG))
    if not text:
        return None
    rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    steady = rows[1:] or rows  # the first epoch pays for warm-up
    return sum(r["images_per_second"] for r in steady) / len(steady) if steady else None
