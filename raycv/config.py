"""Typed, validated configuration: a YAML recipe plus dotted `key=value` overrides.

Every job kind has one config object (`TrainConfig`, `InferConfig`). Validation happens once, at
the edge, before Ray starts: an unknown key, a wrong type or an impossible value raises
`ConfigError` with one line naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raycv.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


class _Section(BaseModel):
    # inf and nan are never a sensible learning rate, fraction or size
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSection(_Section):
    name: str = "digits"  # dataset registry name (`raycv datasets`)
    root: str | None = None  # where a user dataset lives (image_folder, cifar10, parquet); local or URI
    input_size: int = Field(32, ge=8, le=1024)  # side of the square model input, pixels
    resize_size: int | None = Field(None, ge=8, le=2048)  # eval: resize shorter side to this, then center-crop input_size (default: input_size)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # used when a source has no val split of its own
    num_samples: int = Field(2000, ge=10)  # generated sets (shapes) only
    seed: int = 0  # split / generation seed: the same seed gives the same split
    batch_size: int = Field(32, ge=1)  # per training worker, images
    augment: Literal["none", "light", "standard", "trivial", "randaugment"] = "light"  # train preset strength
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)  # probability per training image
    hflip: bool = False  # horizontal flips (wrong for digits; right for photos)
    mean: list[float] | None = None  # per channel; default: the dataset's own
    std: list[float] | None = None
    cache: bool = True  # keep decoded images in Ray's object store across epochs (small sets)
    # With data.cache, when a worker's shard of decoded uint8 training images is at most this many MB,
    # each worker also keeps it in its own memory after epoch 1 and later epochs shuffle it there (no
    # per-batch trip through Ray Data's iterator). 0: off.
    worker_cache_mb: float = Field(512.0, ge=0.0)
    image_column: str = "image"  # parquet sources: encoded image bytes
    label_column: str = "label"  # parquet sources: integer class index or class name
    mask_column: str = "mask"  # parquet_segmentation: PNG class masks (pixel value = class index)
    boxes_column: str = "boxes"  # parquet_detection: [[x1, y1, x2, y2], ...] per image, pixels
    labels_column: str = "labels"  # parquet_detection: class index (1..K) or name per box
    classes: list[str] | None = None  # segmentation / detection: class names, background first (default: the source's)
    decode_cpus: float = Field(0.5, gt=0.0, le=16.0)  # CPUs per Ray Data decode task


class ModelSection(_Section):
    name: str = "simple_cnn"  # model registry name (`raycv models`)
    weights: str | None = None  # torchvision weights, e.g. DEFAULT or IMAGENET1K_V1 (needs them cached or internet)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra constructor arguments
    init_from: str | None = None  # fine-tune: start from a raycv checkpoint / run dir (a new head if classes differ)


class OptimSection(_Section):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(2e-3, gt=0.0)  # peak learning rate for the global batch as configured
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = Field(0.0, ge=0.0)
    decay_norm_and_bias: bool = False  # false: normalization weights and biases get no weight decay


class DistillSection(_Section):
    teacher: str | None = None  # a raycv classification checkpoint or run with the same classes; runs beside the student
    logits: str | None = None  # offline: a raycv infer output with infer.logits=true over the training images, read instead of a teacher
    temperature: float = Field(4.0, gt=0.0)  # softens both distributions
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the teacher's term; 1 - alpha: the labels' cross-entropy


class PruneSection(_Section):
    amount: float = Field(0.0, ge=0.0, le=0.95)  # 0: off; with model.init_from, the share of weights (or channels) pruned before fine-tuning
    method: Literal["global_magnitude", "ln_structured"] = "global_magnitude"  # zeros (sparse) or channels removed (smaller, faster)


class TrainSection(_Section):
    epochs: int = Field(10, ge=1, le=100_000)
    warmup_epochs: float = Field(1.0, ge=0.0)  # linear warmup from lr * warmup_factor, in epochs
    warmup_factor: float = Field(0.1, gt=0.0, le=1.0)
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"  # after warmup
    step_epochs: int = Field(30, ge=1)  # step schedule: decay every this many epochs
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # ranks checkpoints (best N kept, early stopping); default: the task's (val_accuracy; segmentation
    # val_miou; detection val_map, COCO's mAP@[.5:.95])
    checkpoint_metric: Literal["val_accuracy", "val_top5", "val_loss", "val_miou", "val_pixel_accuracy",
                               "val_map", "val_map50"] | None = None
    keep_checkpoints: int = Field(2, ge=1)  # best N by checkpoint_metric (the latest is always kept)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    seed: int = 0
    deterministic: bool = False  # same weights run to run: fixed data split and order, augmentation on the training thread, fixed thread count, deterministic kernels (slower)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast: bf16 on CPU or GPU; fp16 (with a grad scaler) on GPU
    channels_last: bool = False  # NHWC memory format for convolutions
    compile: bool = False  # torch.compile the model
    grad_clip_norm: float | None = Field(None, gt=0.0)  # clip the global gradient norm
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    mixup_alpha: float = Field(0.0, ge=0.0)  # > 0 enables MixUp
    cutmix_alpha: float = Field(0.0, ge=0.0)  # > 0 enables CutMix (with MixUp: one of them per batch)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # EMA of the weights, evaluated and checkpointed
    sync_batchnorm: bool = False  # SyncBatchNorm across ranks (GPU)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    log_every_steps: int = Field(50, ge=0)  # rank 0's loss and lr every N optimizer steps (steps.jsonl, TensorBoard); 0: off
    tensorboard: bool = True  # TensorBoard event files in <run>/tensorboard
    early_stop_patience: int | None = Field(None, ge=1)  # stop after this many epochs without a better checkpoint_metric
    distill: DistillSection = Field(default_factory=DistillSection)  # knowledge distillation (classification)
    prune: PruneSection = Field(default_factory=PruneSection)  # prune model.init_from, then fine-tune


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1, le=10_000)  # Ray Train workers (DDP ranks)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: parameters, gradients and optimizer state sharded (FSDP2)
    # Elastic training: with min_workers below num_workers, Ray Train starts with as many workers as the
    # cluster holds between the two, and resizes (restarting from the last checkpoint) as nodes come and go.
    min_workers: int | None = Field(None, ge=1, le=10_000)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0.0)  # default: share the cluster's CPUs with Ray Data
    gpus_per_worker: float = Field(1.0, gt=0.0)  # with use_gpu
    data_cpus: float = Field(0.5, ge=0.0)  # CPUs left free for Ray Data while training runs
    # how workers are placed: PACK fills a node first; SPREAD / STRICT_SPREAD put them on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _elastic(self) -> "ScalingSection":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"scaling.min_workers={self.min_workers} is above scaling.num_workers={self.num_workers}")
        return self

    @property
    def fewest_workers(self) -> int:
        """What the run cannot start without: min_workers when elastic, else num_workers."""
        return self.min_workers or self.num_workers


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RunSection(_Section):
    storage_path: str = "runs"  # local folder or URI; relative paths are resolved against the cwd
    name: str | None = None  # default: <data>-<model>-<timestamp>; the same name resumes that run
    # auto: an existing run of this name continues from its latest checkpoint when its task, model,
    # classes and data are the same (refused otherwise); never: an existing run is set aside
    # (renamed <name>.set-aside-<time>, nothing deleted) and a fresh one starts
    resume: Literal["auto", "never"] = "auto"
    address: str | None = None  # Ray cluster address; default: $RAY_ADDRESS, else a new local instance
    verbose: bool = False  # show Ray's own logs
    # MLflow (optional: pip install 'raycv[mlflow]'): a tracking URI turns it on; so does $MLFLOW_TRACKING_URI
    # when mlflow is installed. Rank 0 logs the config as params, epoch and step metrics; the driver adds
    # curves.png and summary.json as artifacts. A resumed run continues the same MLflow run.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "raycv"
    # Python modules that register models or datasets (raycv/plugins.py), imported by the driver before
    # Ray starts and by every worker and actor; `--import MODULE` on the command line adds one.
    plugins: list[str] = Field(default_factory=list)

    @field_validator("plugins")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", m)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a Python module name (a.b.c; put its folder on the path or "
                             "in the current folder)")
        return v

    @field_validator("name", mode="before")
    @classmethod
    def _name_as_written(cls, v: Any) -> Any:
        """`run.name=2024` or `2024-01-01` is the name the user typed, not a number or a date."""
        return str(v) if isinstance(v, (int, float, _dt.date)) and not isinstance(v, bool) else v

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, v: str | None) -> str | None:
        if v is not None and not RUN_NAME.fullmatch(v):
            raise ValueError(f"{v!r} must be one folder name: letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit, at most 128 characters")
        return v


class InferSection(_Section):
    checkpoint: str | None = None  # a raycv checkpoint directory (or a run directory: its best checkpoint)
    input: str | None = None  # image folder, Parquet dataset, or `registry:<name>[:split]`
    output: str | None = None  # Parquet output directory
    batch_size: int = Field(64, ge=1)
    topk: int = Field(5, ge=1)
    score_threshold: float = Field(0.05, ge=0.0, le=1.0)  # detection: keep boxes scoring at least this
    max_detections: int = Field(100, ge=1)  # detection: at most this many boxes per image, best first
    embedding: bool = False  # add the penultimate features as an `embedding` column
    logits: bool = False  # add the raw class outputs as a `logits` column (a teacher's, for train.distill.logits)
    mode: Literal["error", "overwrite", "resume"] = "error"  # what to do when output exists
    max_error_fraction: float = Field(1.0, ge=0.0, le=1.0)  # fail the job above this share of bad inputs
    min_actors: int = Field(1, ge=1, le=10_000)
    max_actors: int = Field(1, ge=1, le=10_000)
    cpus_per_actor: float | None = Field(None, gt=0.0)  # default: what the cluster can spare
    use_gpu: bool = False
    actor_resources: dict[str, float] = Field(default_factory=dict)  # custom resources per actor, e.g. {accel: 1}
    path_column: str = "path"  # parquet inputs: the id / path column
    image_column: str | None = "image"  # parquet inputs: encoded image bytes (null: a manifest, the path column holds URIs)
    # Inputs per shard, the unit of progress that survives a crash, and at most the rows of one part file.
    rows_per_file: int = Field(100_000, ge=1)
    # Rows a write task gathers before it commits a part (at most rows_per_file): how much a crash can
    # lose per write task in flight, against how many part files a shard is written as.
    commit_rows: int = Field(10_000, ge=1)
    # Decode inside the predictor actors instead of in separate Ray Data tasks. Separate tasks win when
    # decoding is the bottleneck (they run beside the model); on a few CPUs with a compute-heavy model,
    # decoding in the actor avoids decode processes preempting torch's threads (see bench/).
    decode_in_actor: bool = False
    # The model and its input batches in NHWC (channels_last) memory: inference ran 1.2-2.0x faster on
    # CPUs for the models measured (bench/layout_bench.py), predictions equal to the NCHW model's.
    channels_last: bool = True

    @model_validator(mode="after")
    def _actors(self) -> "InferSection":
        if self.min_actors > self.max_actors:
            raise ValueError(
                f"infer.min_actors={self.min_actors} is above infer.max_actors={self.max_actors}"
            )
        return self


class TrainConfig(_Section):
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)


class InferConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)  # used when no checkpoint is given
    data: DataSection = Field(default_factory=DataSection)  # for `registry:` inputs
    infer: InferSection = Field(default_factory=InferSection)
    run: RunSection = Field(default_factory=RunSection)


DISTRIBUTIONS = {"loguniform": "[low, high], 0 < low < high", "uniform": "[low, high], low < high",
                 "randint": "[low, high], integers, both included", "choice": "[a, b, ...]", "grid": "[a, b, ...]"}
METRICS = ("val_accuracy", "val_top5", "val_loss", "val_miou", "val_pixel_accuracy", "val_map", "val_map50")


def _number(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


class TuneSection(_Section):
    # config key -> one distribution: {loguniform: [1e-4, 1e-1]}, {uniform: [0, 0.3]}, {randint: [1, 4]},
    # {choice: [none, light]}, {grid: [16, 32]} (every value of a grid, num_samples times)
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric: Literal[METRICS] | None = None  # what the search ranks by; default: the task's checkpoint metric
    mode: Literal["max", "min"] | None = None  # default: min for val_loss, else max
    num_samples: int = Field(4, ge=1, le=10_000)  # trials (with a grid: per grid point)
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: as many as the cluster holds with scaling.cpus_per_worker, else 1 (pbt: num_samples)
    # asha: stop trials that fall behind at each rung of epochs; pbt: population based training, the
    # trials behind continue from the weights of those ahead with their values perturbed
    scheduler: Literal["none", "asha", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)  # asha: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = Field(2, ge=1)  # pbt: epochs between two comparisons of the population
    search: Literal["random", "optuna"] = "random"  # optuna: pip install 'raycv[optuna]'
    seed: int | None = 0  # the search's seed: the same seed samples the same trials

    @field_validator("space")
    @classmethod
    def _distributions(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("is empty: give at least one key to search, e.g. tune.space={optim.lr: {loguniform: [1e-4, 1e-1]}}")
        for key, dist in v.items():
            if key.split(".", 1)[0] in ("tune", "run"):
                raise ValueError(f"{key}: the search cannot vary tune.* or run.* keys")
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: want one of {', '.join(f'{{{n}: {a}}}' for n, a in DISTRIBUTIONS.items())}, "
                                 f"got {dist!r}")
            (name, args), = dist.items()
            if not isinstance(args, list) or not args:
                raise ValueError(f"{key}: {name} wants {DISTRIBUTIONS[name]}, got {args!r}")
            if name in ("loguniform", "uniform"):  # YAML 1.1 reads 1e-4 (no dot) as a string
                args = dist[name] = [_number(a) for a in args]
            if name in ("loguniform", "uniform", "randint"):
                ok = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                    and args[0] < args[1] and (name != "loguniform" or args[0] > 0) \
                    and (name != "randint" or all(isinstance(a, int) for a in args))
                if not ok:
                    raise ValueError(f"{key}: {name} wants {DISTRIBUTIONS[name]}, got {args!r}")
        return v


class TuneConfig(TrainConfig):
    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _space_keys(self) -> "TuneConfig":
        """Every searched key exists and takes every value the space can give it (bounds and choices)."""
        if self.tune.search == "optuna" and any("grid" in d for d in self.tune.space.values()):
            raise ValueError("tune.space: a grid needs tune.search=random (Optuna samples; it does not enumerate)")
        base = self.train_config().model_dump(mode="json")
        for key, dist in self.tune.space.items():
            (name, args), = dist.items()
            for value in args:
                nested: dict[str, Any] = {}
                node = nested
                *parents, last = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[last] = value
                try:
                    TrainConfig.model_validate(_merge(base, nested))
                except ValidationError as e:
                    raise ValueError(f"tune.space.{key}: {_format_error(e, TrainConfig)}") from None
        if self.tune.scheduler == "pbt":
            self._pbt_space()
        return self

    def _pbt_space(self) -> None:
        """PBT changes a trial's values mid-run and continues it from another trial's checkpoint:
        only values a checkpoint does not depend on can change."""
        if self.tune.search != "random":
            raise ValueError("tune.scheduler=pbt samples its population at random: use tune.search=random")
        if self.scaling.strategy != "ddp":
            raise ValueError("tune.scheduler=pbt continues trials from DDP checkpoints: use scaling.strategy=ddp")
        if self.tune.perturbation_interval >= self.train.epochs:
            raise ValueError(f"tune.perturbation_interval={self.tune.perturbation_interval} is not below "
                             f"train.epochs={self.train.epochs}: PBT would never compare the trials")
        for key, dist in self.tune.space.items():
            (name, args), = dist.items()
            if key not in PBT_MUTABLE:
                raise ValueError(f"tune.space.{key}: tune.scheduler=pbt changes values mid-run, from another trial's "
                                 f"checkpoint, and {key} cannot change there (it can: {', '.join(PBT_MUTABLE)})")
            if name == "grid":
                raise ValueError(f"tune.space.{key}: tune.scheduler=pbt mutates what it samples; a grid is not sampled")
            if key == "optim.weight_decay" and min(args if name == "choice" else args[:1]) <= 0:
                raise ValueError("tune.space.optim.weight_decay: with tune.scheduler=pbt every value must be > 0 "
                                 "(0 changes the optimizer's parameter groups mid-run)")

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(mode="json", exclude={"tune"}))


# What PBT may change in a running trial: the optimizer's values and the training recipe, never what
# the weights or the optimizer's state are shaped by (the model, the data, the schedule's length).
PBT_MUTABLE = ("optim.lr", "optim.momentum", "optim.weight_decay", "train.label_smoothing", "train.mixup_alpha",
               "train.cutmix_alpha", "train.grad_clip_norm", "data.augment", "data.random_erasing", "data.hflip")


CONFIG_KINDS: dict[str, type[_Section]] = {"train": TrainConfig, "infer": InferConfig, "tune": TuneConfig}

# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.epochs=3", "data.mean=[0.5,0.5,0.5]"]` -> nested dict. Values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(err: ValidationError, kind: type[_Section]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        model: Any = kind
        for part in loc[:-1]:
            field = model.model_fields.get(part)
            model = field.annotation if field is not None else None
            if model is None or not hasattr(model, "model_fields"):
                break
        valid = ", ".join(model.model_fields) if model is not None and hasattr(model, "model_fields") else "?"
        return f"unknown config key '{key}' (valid keys here: {valid})"
    msg = first["msg"]
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if not key else f"{key}: {msg}"
    return f"{key}={first.get('input')!r}: {msg}"


def load_config(kind: str, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Any:
    """Build the validated config of `kind` ("train" or "infer") from a recipe and overrides."""
    cls = CONFIG_KINDS[kind]
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(list(overrides)))
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, cls)) from None


def default_run_name(cfg: TrainConfig) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.name}-{cfg.model.name.replace('/', '-')}-{stamp}"


def resolve_storage_path(storage_path: str) -> str:
    """Ray Train wants an absolute path or a URI."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


def to_yaml(cfg: BaseModel) -> str:
    """The config as written down (config.yaml): credentials in URIs redacted."""
    from raycv.redact import redact_tree

    return yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False)
