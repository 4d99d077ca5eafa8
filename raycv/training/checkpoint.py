"""The checkpoint format (docs/outputs.md, docs/architecture.md): a directory holding

- `model.pt`: the model's state_dict, tensors only (`torch.load(..., weights_only=True)`);
- `raycv.json`: what rebuilds the model and its eval preprocessing (task, model name and
  arguments, class names, eval preset) plus the epoch, its metrics and the run config;
- `train_state.pt`: optimizer, scheduler and epoch for resume, tensors and plain values only.

A run with `scaling.strategy=fsdp` writes a sharded checkpoint instead of `model.pt`: every rank's
`__<rank>_0.distcp` and DCP's `.metadata` (raycv.training.sharding), with `raycv.json` saying
`sharded`; loading consolidates it, so nothing downstream needs to know how it was trained.

Loading never unpickles arbitrary objects: a file that needs more than tensors is refused.
`raycv.json` is written last and records the size and SHA-256 of the other files: a checkpoint
torn by a crash while it was written or copied (a truncated `model.pt`, or one file from another
write) is refused by name instead of loading the wrong weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import raycv
from raycv.data.io import sha256_file
from raycv.data.presets import (ClassificationEvalPreset, DetectionEvalPreset, SegmentationEvalPreset,
                                eval_preset_from_dict)
from raycv.errors import UserError
from raycv.training.checkpoint_meta import Meta, parse_meta, read_meta

if TYPE_CHECKING:  # imported where tensors are read or written: a checkpoint's raycv.json needs neither
    import torch
    from torch import nn

MODEL_FILE = "model.pt"
META_FILE = "raycv.json"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    task: str
    model_name: str
    model_kwargs: dict[str, Any]
    classes: list[str]
    preprocess: ClassificationEvalPreset | SegmentationEvalPreset | DetectionEvalPreset
    epoch: int
    metrics: dict[str, Any]
    config: dict[str, Any]
    quantization: dict[str, Any] | None = None  # int8 (raycv quantize): method, backend, calibration
    pruning: dict[str, Any] | None = None  # train.prune: method, amount, structured, sparsity, parameters
    sharded: dict[str, Any] | None = None  # scaling.strategy=fsdp: format, world_size (no model.pt)

    def to_json(self, files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"format": "raycv-checkpoint", "format_version": FORMAT_VERSION, "raycv_version": raycv.__version__,
                "task": self.task, "model": {"name": self.model_name, "kwargs": self.model_kwargs},
                "classes": self.classes, "num_classes": len(self.classes), "preprocess": self.preprocess.to_dict(),
                "epoch": self.epoch, "metrics": self.metrics, "config": self.config, "files": files or {},
                **({"quantization": self.quantization} if self.quantization else {}),
                **({"pruning": self.pruning} if self.pruning else {}),
                **({"sharded": self.sharded} if self.sharded else {})}

    @classmethod
    def from_meta(cls, m: "Meta") -> "CheckpointInfo":
        """From a validated `raycv.json` (`read_meta`: bounds checked, a crafted file is one line)."""
        return cls(task=m.task, model_name=m.model.name, model_kwargs=m.model.kwargs, classes=m.classes,
                   preprocess=eval_preset_from_dict(m.preprocess.model_dump(exclude_none=True)), epoch=m.epoch,
                   metrics=m.metrics, config=m.config,
                   quantization=m.quantization.model_dump() if m.quantization else None,
                   pruning=m.pruning.model_dump() if m.pruning else None,
                   sharded=m.sharded.model_dump() if m.sharded else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def write_checkpoint(directory: str | os.PathLike, model: nn.Module, info: CheckpointInfo,
                     train_state: dict[str, Any] | None = None) -> Path:
    import torch

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), d / MODEL_FILE)
    files = [MODEL_FILE]
    if train_state is not None:
        torch.save(train_state, d / STATE_FILE)
        files.append(STATE_FILE)
    digests = {name: {"bytes": (d / name).stat().st_size, "sha256": sha256_file(d / name)} for name in files}
    return write_meta(d, info, digests)


def write_meta(d: Path, info: CheckpointInfo, digests: dict[str, dict[str, Any]]) -> Path:
    """raycv.json, last and atomically: its presence marks a whole checkpoint, its digests say which
    files belong to it (a sharded checkpoint's: every rank's)."""
    tmp = d / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(info.to_json(digests), indent=1))
    os.replace(tmp, d / META_FILE)
    return d


def verify(directory: str | os.PathLike, name: str) -> None:
    """Refuse a file of the checkpoint whose size or SHA-256 is not what `raycv.json` recorded
    (checkpoints written before digests were recorded are not checked)."""
    d = Path(directory)
    if not (d / META_FILE).is_file():
        return  # read_info reports a missing raycv.json
    recorded = read_meta(d / META_FILE).files.get(name)
    if not recorded:
        return
    path = d / name
    size = path.stat().st_size if path.is_file() else None
    expected = recorded.bytes
    if size is None:
        problem = "missing"
    elif size != expected:
        problem = f"{size} bytes, {expected} recorded"
    elif sha256_file(path) != recorded.sha256:
        problem = "its SHA-256 differs from the recorded one"
    else:
        return
    raise UserError(f"checkpoint {d} is torn: {name} is not the file its {META_FILE} records ({problem}); "
                    f"was it written or copied by a run that crashed? use another checkpoint")


def verify_all(directory: str | os.PathLike, part: tuple[int, int] = (0, 1)) -> None:
    """Every file `raycv.json` records (a sharded checkpoint: every rank's) is the one it records;
    part=(i, n): the i-th of n slices of them (n ranks share the hashing)."""
    d = Path(directory)
    if (d / META_FILE).is_file():
        for name in sorted(read_meta(d / META_FILE).files)[part[0]::part[1]]:
            verify(d, name)


def new_checkpoint_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="raycv-ckpt-"))


def _tensors_only(path: Path) -> Any:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # int8 weights are rebuilt through the TypedStorage torch deprecates
            warnings.filterwarnings("ignore", message="(TypedStorage is deprecated|torch.quantize_per_tensor)")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"refusing to load {path}: not a tensors-only raycv file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


_DOWNLOADED: dict[str, Path] = {}


def local_dir(directory: str | os.PathLike) -> Path:
    """A checkpoint on object storage (`s3://...`) is copied to a local temp folder, once per process."""
    uri = str(directory)
    if "://" not in uri:
        return Path(directory)
    if uri not in _DOWNLOADED:
        from raycv.data import io as fsio

        local = Path(tempfile.mkdtemp(prefix="raycv-ckpt-dl-"))
        try:
            fsio.download_dir(uri, str(local))
        except OSError as e:
            raise UserError(f"checkpoint not found: {uri} ({str(e).splitlines()[0]})") from None
        _DOWNLOADED[uri] = local
    return _DOWNLOADED[uri]


def read_info(directory: str | os.PathLike) -> CheckpointInfo:
    """A checkpoint's raycv.json, validated, with the weights it names present. On object storage
    it reads raycv.json in place: a driver that leaves the weights to its actors copies nothing."""
    where, read, has = _folder(directory)
    try:
        text = read(META_FILE)
    except (OSError, ValueError) as e:
        raise UserError(f"not a raycv checkpoint: {where}/{META_FILE} is unreadable ({str(e).splitlines()[0]})") from None
    if text is None:
        raise UserError(f"not a raycv checkpoint: {where} lacks {META_FILE}")
    info = CheckpointInfo.from_meta(parse_meta(text, f"{where}/{META_FILE}"))
    weights = ".metadata" if info.sharded else MODEL_FILE
    if not has(weights):
        raise UserError(f"not a raycv checkpoint: {where} lacks {weights}{' (a sharded checkpoint)' if info.sharded else ''}")
    return info


def _folder(directory: str | os.PathLike) -> tuple[str, Callable[[str], str | None], Callable[[str], bool]]:
    """A checkpoint folder as (where, read(name) -> text or None, has(name)): a local one, one this
    process copied already, or one on object storage, read where it is."""
    uri = str(directory)
    if "://" in uri and uri not in _DOWNLOADED:
        from raycv.data import io as fsio

        try:
            found = fsio.is_dir(uri)
        except OSError as e:
            raise UserError(f"checkpoint not found: {uri} ({str(e).splitlines()[0]})") from None
        if not found:
            raise UserError(f"checkpoint not found: {uri}")
        return uri, lambda name: fsio.read_text(fsio.join(uri, name)), lambda name: fsio.exists(fsio.join(uri, name))
    d = local_dir(directory)
    if not d.is_dir():
        raise UserError(f"checkpoint not found: {d}")
    return str(d), lambda name: (d / name).read_text() if (d / name).is_file() else None, lambda name: (d / name).is_file()


def load_state_dict(directory: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's full state_dict; a sharded checkpoint's consolidated in this process (into the
    names and shapes of `model`, or of the model its raycv.json describes)."""
    d = Path(directory)
    if (d / META_FILE).is_file() and not (d / MODEL_FILE).is_file():
        info = read_info(d)
        if info.sharded:
            from raycv.training import sharding

            verify_all(d)
            return sharding.consolidated_state_dict(d, model if model is not None else _build(info, d))
    verify(directory, MODEL_FILE)
    return _tensors_only(Path(directory) / MODEL_FILE)


def _build(info: CheckpointInfo, directory) -> nn.Module:
    """The registered model `raycv.json` names, freshly initialized."""
    from raycv.models import get_model

    try:
        return get_model(info.model_name, num_classes=len(info.classes), **info.model_kwargs)
    except (TypeError, ValueError) as e:  # kwargs the constructor refuses
        raise UserError(f"checkpoint {directory}: cannot build {info.model_name!r} from its {META_FILE}: "
                        f"{str(e).splitlines()[0]}") from None


def consolidate(checkpoint: str, output: str | os.PathLike) -> tuple[Path, CheckpointInfo]:
    """`raycv consolidate`: a sharded checkpoint's shards gathered into a plain checkpoint (model.pt
    and raycv.json; the optimizer's shards stay behind: resume from the sharded one)."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out} exists and is not empty; give a new folder")
    directory = local_dir(resolve_checkpoint(str(checkpoint)))
    info = read_info(directory)
    if not info.sharded:
        raise UserError(f"{directory} is not a sharded checkpoint: its {MODEL_FILE} already holds the whole model")
    model, _ = load_model(directory)
    write_checkpoint(out, model, replace(info, sharded=None))
    return out, info


def load_train_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(directory) / STATE_FILE
    verify(directory, STATE_FILE)
    return _tensors_only(p) if p.is_file() else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder (its summary's best checkpoint); local or a URI."""
    from raycv.data import io as fsio

    p = fsio.normalize(path)
    if fsio.read_text(fsio.join(p, META_FILE)) is not None:
        return p
    summary = fsio.read_text(fsio.join(p, "summary.json"))
    if summary is not None:
        try:
            best = json.loads(summary).get("best_checkpoint")
        except (ValueError, AttributeError):
            raise UserError(f"not a raycv run directory: {fsio.join(p, 'summary.json')} is unreadable") from None
        if isinstance(best, str) and best:
            # the checkpoint of that name inside the folder given (summary.json holds the path redacted
            # when it carried credentials, and the run may have been moved or copied since)
            inside = fsio.join(p, best.rstrip("/").rsplit("/", 1)[-1])
            return inside if fsio.read_text(fsio.join(inside, META_FILE)) is not None else best
    if not fsio.is_dir(p):
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"not a raycv checkpoint or run directory: {path} (no {META_FILE} or summary.json)")


def init_from_checkpoint(model: nn.Module, path: str, task: str = "classification") -> CheckpointInfo:
    """Fine-tuning: load a raycv checkpoint's weights into `model`. When the class count differs,
    the classifier head (segmentation: the classifier modules; detection: the class-predicting layers)
    keeps its fresh initialization; any
    other mismatch is refused."""
    from raycv.models import last_linear_name

    directory = resolve_checkpoint(path)
    info = read_info(directory)
    if info.task != task:
        raise UserError(f"model.init_from={path} is a {info.task} checkpoint; this run trains {task}")
    if info.quantization:
        raise UserError(f"model.init_from={path} is an int8 checkpoint (raycv quantize); start from the float one "
                        f"it was made from: {info.quantization.get('source')}")
    state = load_state_dict(local_dir(directory))
    if info.pruning and info.pruning.get("structured"):  # fine-tuning a pruned model further: its widths
        from raycv.training.pruning import shaped_like

        shaped_like(model, state)
    own = model.state_dict()
    head = ((last_linear_name(model) + ".",) if task == "classification" else ("classifier.", "aux_classifier.")
            if task == "segmentation" else ("roi_heads.box_predictor.", "head.classification_head."))
    for key in [k for k, v in state.items() if k in own and own[k].shape != v.shape]:
        if not key.startswith(head):
            raise UserError(f"model.init_from={path}: {key} has shape {tuple(state[key].shape)}, "
                            f"the model wants {tuple(own[key].shape)}; is it the same architecture?")
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(head)] + list(unexpected)
    if bad:
        raise UserError(f"model.init_from={path} ({info.model_name}) does not fit this model: "
                        f"{len(bad)} mismatched keys, e.g. {bad[0]}")
    return info


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model from `raycv.json` and load `model.pt` into it (weights only)."""
    info = read_info(directory)
    model = _build(info, directory)
    state = load_state_dict(local_dir(directory), model)
    if info.pruning and info.pruning.get("structured"):  # narrower layers than the registered model's
        from raycv.training.pruning import shaped_like

        model = shaped_like(model, state)
    if info.quantization:  # the int8 module of this architecture, then its int8 weights
        from raycv.quantize import rebuild

        model = rebuild(model, info.quantization, info.preprocess.shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {directory} does not fit model {info.model_name!r} with "
                        f"{len(info.classes)} classes: {str(e).splitlines()[0]}") from None
    return model.eval(), info


def check_runs(model: nn.Module, info: CheckpointInfo, directory) -> None:
    """One input of the checkpoint's recorded size through the model: a preprocess the model cannot
    take fails with its reason before any input is predicted (in the driver before Ray starts, or
    in each actor when the driver did not load the model), not on every batch."""
    import torch

    try:
        with torch.inference_mode():
            x = torch.zeros(info.preprocess.shape)
            model([x]) if info.task == "detection" else model(x[None])
    except Exception as e:
        raise UserError(f"checkpoint {directory}: {info.model_name!r} cannot run on its preprocess "
                        f"(input_size={info.preprocess.input_size}): {str(e).splitlines()[0]}") from None
