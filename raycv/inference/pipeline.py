"""Batch inference: `run_inference(cfg)` streams the inputs through Ray Data (decode and the
checkpoint's eval preset on CPU tasks, the model on a pool of actors) into Parquet, and publishes
the output only when every input is accounted for."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
import ray.data

from raycv import runtime
from raycv.config import InferConfig
from raycv.data.decode import decode_batch
from raycv.data.io import IMAGE_EXTENSIONS, normalize
from raycv.data.presets import ClassificationEvalPreset, DetectionEvalPreset, SegmentationEvalPreset
from raycv.errors import UserError, find_storage_error
from raycv.inference.output import OutputLocation
from raycv.inference.progress import ProgressLine, row_counter
from raycv.inference.schema import file_metadata, output_schema
from raycv.inference.shards import ShardSink
from raycv.inference.source import check_input, open_input, registry_data
from raycv.redact import redact
from raycv.training import checkpoint as ckpt


@dataclass
class InferSummary:
    output: str
    rows: int
    ok: int
    errors: int
    images_per_second: float
    wall_seconds: float
    skipped_done: int  # inputs already in committed parts (infer.mode=resume), reused
    total_rows: int = 0  # rows in the published output: this run's and the reused
    first_prediction_s: float | None = None  # from the start of the run to the first predicted rows (seen within 0.2 s)
    # Where the time to the first prediction went, in seconds from the process's start: `run`
    # (run_inference called: the interpreter and imports), `ray` (connected to or started Ray),
    # `pipeline` (the input planned, the Ray Data pipeline handed to Ray),
    # `actor_spawned` / `actor_init` / `actor_ready` (the first predictor's worker process started,
    # its __init__ began after the imports, and ended with the model loaded), `first_prediction`.
    startup: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ModelSpec:
    name: str
    kwargs: dict
    classes: list[str]
    preprocess: ClassificationEvalPreset | SegmentationEvalPreset | DetectionEvalPreset
    weights: str | None
    checkpoint: str | None
    embedding_dim: int  # input features of the classifier head: the `embedding` column's size (0: none)
    task: str = "classification"
    data: dict | None = None  # the data section the checkpoint was trained with (its recorded config)
    model: Any = None  # the model as loaded here (checked, on CPU); the actors load their own


class ModelActor:
    """What Ray Data runs on each predictor actor: the task's predictor, built in the actor's
    process. Its module (and torch with it) is imported there, not in the driver."""

    def __init__(self, *, task: str, **kwargs):
        from raycv.inference.predictor import PREDICTORS

        self.predictor = PREDICTORS[task](**kwargs)

    def __call__(self, batch):
        return self.predictor(batch)


def weights_checked_here(cfg: InferConfig) -> bool:
    """Whether the driver loads the model to check it before joining Ray. Always when it starts its
    own Ray instance: a bad checkpoint must not start one. Joining a running instance (run.address,
    $RAY_ADDRESS) with a checkpoint, the driver reads only its raycv.json and each actor loads and
    checks the weights (a failure is the same one line): the driver then never imports torch, and
    the actors start that much sooner (bench/README.md). Embeddings need the head's width: loaded."""
    return not (runtime.joins_running_instance(cfg.run.address) and cfg.infer.checkpoint and not cfg.infer.embedding)


def load_spec(cfg: InferConfig, *, load: bool = True) -> ModelSpec:
    """`load=False`: a checkpoint's raycv.json only (its files present, its fields valid)."""
    if cfg.infer.checkpoint:
        directory = ckpt.resolve_checkpoint(cfg.infer.checkpoint)
        if load:
            model, info = ckpt.load_model(directory)  # fail here, not in the actors: files present, weights fit
        else:
            model, info = None, ckpt.read_info(directory)
        if info.quantization and cfg.infer.use_gpu:
            raise UserError(f"{directory} is an int8 checkpoint (raycv quantize), which runs on CPUs: "
                            f"set infer.use_gpu=false, or infer with the float checkpoint it came from")
        if model is not None:
            ckpt.check_runs(model, info, directory)
        return ModelSpec(info.model_name, info.model_kwargs, info.classes, info.preprocess, None, str(directory),
                         _head_features(model, info.task) if model is not None else 0, info.task,
                         (info.config or {}).get("data"), model)
    if not cfg.model.weights:
        raise UserError("give --checkpoint, or model.name with model.weights (pretrained torchvision weights)")
    from raycv.models import get_model, get_model_entry
    from raycv.models.torchvision_zoo import resolve_weights

    entry = get_model_entry(cfg.model.name)
    task, kwargs = entry.task, dict(cfg.model.kwargs)
    w = resolve_weights(cfg.model.name, cfg.model.weights)
    classes = list(w.meta["categories"])
    if task == "detection":  # letterboxed into the model's usual size, which the model then keeps
        from raycv.models.detection import sized_kwargs

        kwargs = sized_kwargs(cfg.model.name, kwargs, entry.default_input_size)
    model = get_model(cfg.model.name, num_classes=len(classes), weights=cfg.model.weights, **kwargs)
    t = w.transforms()
    if task == "detection":
        preset = DetectionEvalPreset(input_size=entry.default_input_size)
    elif task == "segmentation":  # torchvision resizes the shorter side to resize_size; raycv, a square of it
        preset = SegmentationEvalPreset(input_size=int(t.resize_size[0]), mean=tuple(t.mean), std=tuple(t.std))
    else:
        preset = ClassificationEvalPreset(input_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                                          mean=tuple(t.mean), std=tuple(t.std))
    return ModelSpec(cfg.model.name, kwargs, classes, preset, cfg.model.weights, None,
                     _head_features(model, task), task, model=model)


def _torch_home() -> str:
    import torch

    return torch.hub.get_dir()


def _head_features(model, task: str) -> int:
    from raycv.models import last_linear_name

    return model.get_submodule(last_linear_name(model)).in_features if task == "classification" else 0


def plan_actors(cfg: InferConfig, total_cpus: float, decode_cpus: float, free_cpus: float | None = None,
                node_cpus: float | None = None) -> tuple[float, int]:
    """(CPUs per predictor actor, torch threads). By default the actors share the CPUs free now
    (less what this job's driver holds) minus `decode_cpus`. An actor that takes every CPU leaves
    the decode tasks none and the pipeline waits forever without a word: refuse that up front.
    Actors on accelerators (GPU or `infer.actor_resources`) may wait for an autoscaler to add them."""
    n = cfg.infer.max_actors
    if cfg.infer.use_gpu or cfg.infer.actor_resources:
        cpus = cfg.infer.cpus_per_actor or 1.0
        return cpus, max(1, int(cpus + 0.5))
    free_cpus = total_cpus if free_cpus is None else free_cpus
    node_cpus = total_cpus if node_cpus is None else node_cpus
    cpus = cfg.infer.cpus_per_actor or max(0.25, min((free_cpus - decode_cpus) / n, node_cpus))
    if n * cpus + decode_cpus > total_cpus + 1e-6:
        raise UserError(f"infer.max_actors={n} x {cpus:g} CPUs + {decode_cpus:g} for decoding needs more than this "
                        f"cluster's {total_cpus:g} CPUs and would wait forever; lower infer.cpus_per_actor or "
                        f"infer.max_actors")
    return round(cpus, 3), max(1, int(cpus + 0.5))


def check_apart(input_spec: str, output: str) -> None:
    """--output equal to, inside, or around --input would write over (or delete) the inputs."""
    if input_spec.startswith("registry:"):
        return
    i, o = normalize(input_spec).rstrip("/"), normalize(output).rstrip("/")
    if i == o or o.startswith(i + "/") or i.startswith(o + "/"):
        raise UserError(f"--output {output} overlaps --input {input_spec}: write the predictions to a folder "
                        f"outside the inputs")


def _process_age() -> float:
    """Seconds since this process started (its start as the kernel recorded it)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def run_inference(cfg: InferConfig) -> InferSummary:
    t0 = time.perf_counter()
    age0 = _process_age()  # process start -> t0
    if not cfg.infer.output:
        raise UserError("infer.output is required (--output FOLDER or URI)")
    from raycv import plugins

    plugins.load(cfg.run.plugins)  # before Ray starts: a plugin that fails is one line
    check_input(cfg)
    check_apart(cfg.infer.input, cfg.infer.output)
    checked_here = weights_checked_here(cfg)
    spec = load_spec(cfg, load=checked_here)
    spec.model = None  # loaded to check it; the actors load their own
    if cfg.infer.embedding and spec.task != "classification":
        raise UserError(f"infer.embedding is for classification models; {spec.name} is a {spec.task} model")
    if cfg.infer.logits and spec.task != "classification":
        raise UserError(f"infer.logits is for classification models; {spec.name} is a {spec.task} model")
    data = registry_data(cfg, spec.data)  # a registry input reproduces the checkpoint's own split
    out = OutputLocation(cfg.infer.output)
    out.check(cfg.infer.mode)  # before Ray starts: an output raycv may not write into is refused untouched
    runtime.connect(cfg.run.address, verbose=cfg.run.verbose)
    startup = {"run": age0, "ray": age0 + time.perf_counter() - t0}
    base, prior = out.prepare(cfg.infer.mode)
    try:
        counter = row_counter()
        inputs = open_input(cfg, out, prior, counter, data)
        decode_cpus = cfg.data.decode_cpus
        budget = runtime.cpu_budget()
        actor_cpus, threads = plan_actors(cfg, budget.total, decode_cpus, budget.free, budget.largest_node)
        per_actor = {**({"GPU": 1.0} if cfg.infer.use_gpu else {}), **cfg.infer.actor_resources}
        runtime.check_can_hold({k: v * cfg.infer.min_actors for k, v in per_actor.items()},
                               f"inference with infer.min_actors={cfg.infer.min_actors} x {per_actor}",
                               "set infer.use_gpu=false / drop infer.actor_resources, or lower infer.min_actors")
        metadata = file_metadata(checkpoint=spec.checkpoint and redact(spec.checkpoint), model=spec.name, classes=spec.classes,
                                 preprocess=spec.preprocess.to_dict(), task=spec.task)
        embedding_dim = spec.embedding_dim if cfg.infer.embedding else None
        predictor_kwargs = dict(task=spec.task, check=not checked_here,
                                checkpoint=spec.checkpoint, model_name=spec.name, model_kwargs=spec.kwargs,
                                weights=spec.weights, torch_home=_torch_home() if spec.weights else None,
                                classes=spec.classes, preprocess=spec.preprocess.to_dict(), threads=threads,
                                use_gpu=cfg.infer.use_gpu, schema_metadata=metadata, counter=counter,
                                plugins=list(cfg.run.plugins), channels_last=cfg.infer.channels_last)
        if spec.task == "classification":
            predictor_kwargs.update(topk=cfg.infer.topk, embedding=cfg.infer.embedding, logits=cfg.infer.logits)
        elif spec.task == "detection":
            predictor_kwargs.update(score_threshold=cfg.infer.score_threshold, max_detections=cfg.infer.max_detections)
        written: list[dict] = []
        progress = None
        if inputs.ds is not None:
            progress = ProgressLine(counter, len(inputs.unit_keys), t_start=t0)
            preset = spec.preprocess
            decode = {"geometry": preset.pixels, "shape": preset.shape, "errors": "row", "keep": ("shard",),
                      "with_size": spec.task != "classification"}
            if cfg.infer.decode_in_actor:
                ds = inputs.ds
                predictor_kwargs["decode"] = decode
            else:
                ds = inputs.ds.map_batches(decode_batch, fn_kwargs=decode, batch_size=cfg.infer.batch_size,
                                           num_cpus=decode_cpus)
            ds = ds.map_batches(
                ModelActor, fn_constructor_kwargs=predictor_kwargs, batch_size=cfg.infer.batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=cfg.infer.min_actors, max_size=cfg.infer.max_actors),
                num_cpus=actor_cpus, num_gpus=1 if cfg.infer.use_gpu else 0,
                **({"resources": dict(cfg.infer.actor_resources)} if cfg.infer.actor_resources else {}),
                **({"runtime_env": {"env_vars": env}} if (env := runtime.forwarded_env()) else {}))
            schema = output_schema(spec.task, embedding_dim, len(spec.classes) if cfg.infer.logits else None)
            sink = ShardSink(out.uri, out.run_id, schema.with_metadata(metadata), min(cfg.infer.commit_rows, cfg.infer.rows_per_file))
            progress.start()
            startup["pipeline"] = age0 + time.perf_counter() - t0
            failed = True
            try:
                # 0 CPUs: a write task waits on storage, and with a CPU share it queued behind the
                # decode tasks for the slot the actors leave (measured: first commit at 104 s of a
                # 154-s run on 2 CPUs; 37 s without)
                ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
                written, failed = sink.written, False
            except Exception as e:
                if (reason := find_storage_error(e)) is None:
                    raise
                raise UserError(f"cannot write to output {cfg.infer.output}: {reason}; nothing was published") from None
            finally:
                progress.finish(failed=failed)
            if (actor := ray.get(counter.first_actor.remote())) is not None:
                zero = time.time() - (age0 + time.perf_counter() - t0)  # the process's start, wall clock
                startup.update(actor_spawned=actor[0] - zero, actor_init=actor[1] - zero, actor_ready=actor[2] - zero)
            if progress.first_rows_s is not None:
                startup["first_prediction"] = age0 + progress.first_rows_s
        checked = out.check_shards(inputs.unit_keys, written)
        if not checked.rows:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {cfg.infer.input}")
        if not inputs.ids_unique and (distinct := out.distinct_ids(checked, decode_cpus)) != checked.rows:
            out.abandon(keep=False)  # the input is at fault: its parts would fail this check again
            raise UserError(f"inference wrote {checked.rows} rows ({distinct} distinct ids) for {checked.rows} inputs, "
                            f"so the output would not hold every input exactly once; nothing was published (are "
                            f"the input's ids unique?)")
        rows, errors = checked.rows, checked.errors
        if rows and errors / rows > cfg.infer.max_error_fraction:
            raise UserError(f"{errors} of {rows} inputs failed to decode ({errors / rows:.1%}), above "
                            f"infer.max_error_fraction={cfg.infer.max_error_fraction}; output not published")
        out.publish(cfg.infer.mode, base, checked,
                    metadata={"checkpoint": spec.checkpoint and redact(spec.checkpoint), "model": spec.name, "classes": spec.classes,
                              "task": spec.task})
    except UserError as e:
        if kept := out.abandon():
            raise UserError(f"{e}; the {kept} parts committed so far are kept: infer.mode=resume continues "
                            f"from them") from None
        raise
    except BaseException:
        out.abandon()
        raise
    wall = time.perf_counter() - t0
    return InferSummary(output=cfg.infer.output, rows=checked.new_rows, ok=checked.new_rows - checked.new_errors,
                        errors=checked.new_errors, images_per_second=checked.new_rows / max(wall, 1e-9),
                        wall_seconds=wall, skipped_done=checked.reused, total_rows=rows,
                        first_prediction_s=progress.first_rows_s if progress else None,
                        startup={k: round(v, 2) for k, v in startup.items()})
