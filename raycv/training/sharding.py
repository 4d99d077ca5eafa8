"""Sharded data parallel (`scaling.strategy=fsdp`), activation checkpointing, and sharded checkpoints.

FSDP2 (`torch.distributed.fsdp.fully_shard`) splits every parameter, its gradient and its optimizer
state along dim 0 across the ranks; each *block* (below) is its own unit, gathered just before its
forward and backward and freed after, so at most one block's full weights live at a time. The
root is wrapped last (what no block holds: the stem, the norm, the head).

Blocks, per model family (the repeated unit of the architecture, by class name):

| family | block |
|---|---|
| torchvision ViT | `EncoderBlock` (one transformer layer) |
| torchvision ResNet / ResNeXt / Wide ResNet | `BasicBlock`, `Bottleneck` |
| torchvision ConvNeXt | `CNBlock` |
| torchvision Swin (v1, v2) | `SwinTransformerBlock`, `SwinTransformerBlockV2` |
| torchvision EfficientNet, MobileNet, RegNet | `MBConv`, `FusedMBConv`, `InvertedResidual`, `ResBottleneckBlock` |
| timm ViT, DeiT, BEiT, EVA | `Block`, `EvaBlock` |
| anything else | no block: the whole model is one unit (sharded at rest, gathered whole for each step) |

`train.activation_checkpointing` recomputes each block's activations in the backward pass
(`torch.utils.checkpoint`, non-reentrant) instead of keeping them; the module tree and its
state_dict keys are unchanged, so checkpoints are the same either way.

Checkpoints of an FSDP run are written with `torch.distributed.checkpoint` (DCP): every rank writes
its own shard (`__<rank>_0.distcp`) into its own folder, which Ray Train merges into the one
checkpoint folder; rank 0 adds DCP's `.metadata`, `train_state.pt` and `raycv.json`, which records
every rank's files with their SHA-256 (gathered first), so a torn checkpoint is refused as before.
Only tensors go through DCP (non-tensor values would be pickled and unpickled by it); DCP's
`.metadata` is a pickle, read here with an unpickler that accepts DCP's own metadata classes only.
DCP reshards on load: a run resumes on any number of workers, and a single process consolidates
the full state_dict (`consolidated_state_dict`) for inference, export and fine-tuning.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycv.errors import UserError

BLOCKS = frozenset({"EncoderBlock", "BasicBlock", "Bottleneck", "CNBlock", "SwinTransformerBlock",
                    "SwinTransformerBlockV2", "MBConv", "FusedMBConv", "InvertedResidual", "ResBottleneckBlock",
                    "Block", "EvaBlock"})
FORMAT = "torch.distributed.checkpoint"

# What FSDP cannot do here, or raycv has not made work with it yet: refused before Ray starts.
_REFUSED = (
    (lambda c, t: t != "classification", lambda c, t: f"this run trains {t}; FSDP block policies are "
     "defined for classification backbones (docs/big-models.md); use scaling.strategy=ddp"),
    (lambda c, t: c.train.ema_decay, lambda c, t: "train.ema_decay: the EMA keeps a full copy of the weights on "
     "every rank, which is what FSDP avoids; use scaling.strategy=ddp for an EMA"),
    (lambda c, t: c.train.amp == "fp16", lambda c, t: "train.amp=fp16 needs a sharded grad scaler; use "
     "train.amp=bf16 (FSDP's own mixed precision)"),
    (lambda c, t: c.train.compile, lambda c, t: "train.compile is not supported with FSDP in raycv yet"),
    (lambda c, t: c.train.sync_batchnorm, lambda c, t: "train.sync_batchnorm is not supported with FSDP"),
    (lambda c, t: c.train.prune.amount, lambda c, t: "train.prune rewrites the model's layers; prune with "
     "scaling.strategy=ddp"),
    (lambda c, t: c.train.distill.teacher or c.train.distill.logits, lambda c, t: "train.distill is not supported "
     "with FSDP in raycv yet; distill with scaling.strategy=ddp"),
)


def check(cfg, task: str) -> None:
    """Before Ray starts: a feature FSDP runs cannot use is one line naming it and the reason."""
    if cfg.scaling.strategy != "fsdp":
        return
    for refused, why in _REFUSED:
        if refused(cfg, task):
            raise UserError(f"scaling.strategy=fsdp: {why(cfg, task)}")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of a block class (BLOCKS), in module order."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if type(m).__name__ in BLOCKS and m is not model:
            found.append(m)
            inside.update(id(s) for s in m.modules())
    return found


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in backward; -> how many blocks (0: the model has none
    raycv knows, and nothing changed)."""
    from torch.utils.checkpoint import checkpoint

    units = blocks(model)
    for block in units:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(units)


def shard(model: nn.Module, *, amp: str) -> nn.Module:
    """FSDP2 on every block, then the root (in place; the model's parameters become DTensors).
    bf16: parameters are gathered and computed in bf16, gradients reduced in fp32, outputs fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
          if amp == "bf16" else MixedPrecisionPolicy())
    for block in blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model)."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """FSDP2's no_sync: between accumulation micro-batches, gradients are not reduce-scattered."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------
# sharded checkpoints


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: its shard of the model and the optimizer's tensors into `directory` (rank 0:
    also DCP's .metadata). -> the optimizer's param_groups (plain values: rank 0 keeps them in
    train_state.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    tensors = {"model": msd, "optim": osd["state"]}
    bad = [k for k, v in _flat(tensors) if not isinstance(v, torch.Tensor)]
    assert not bad, f"non-tensor values would be pickled into the sharded checkpoint: {bad[:3]}"
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(directory)))
    return {"param_groups": osd["param_groups"]}


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list) -> None:
    """Every rank: the model's and optimizer's shards for this world size, from a checkpoint
    written by any world size (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    tensors = {"model": msd, "optim": osd["state"]}
    dcp.load(tensors, storage_reader=SafeReader(str(directory)))
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optim"], "param_groups": param_groups})


def verify_together(directory: Path) -> None:
    """Resuming: each rank hashes its slice of the checkpoint's recorded files, and every rank
    raises the first problem any rank found (a torn shard stops the run on all of them)."""
    import torch.distributed as dist

    from raycv.training import checkpoint as ckpt

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = None
    try:
        ckpt.verify_all(directory, part=(rank, world))
    except UserError as e:
        problem = str(e)
    every: list[Any] = [problem]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, problem)
    first = next((p for p in every if p), None)
    if first:
        raise UserError(first)


def consolidated_state_dict(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state_dict of a sharded checkpoint, in this one process (no process group):
    `model` (built from raycv.json) gives the names and shapes to fill."""
    import torch.distributed.checkpoint as dcp

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        dcp.load({"model": state}, storage_reader=SafeReader(str(directory)), no_dist=True)
    except UserError:
        raise
    except Exception as e:  # a key or shape the checkpoint lacks
        raise UserError(f"checkpoint {directory}: cannot consolidate its shards into {type(model).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return state


def _flat(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_DCP_META, n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
_ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch.Size, dtypes and layouts; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _reader_class():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    class Reader(dcp.FileSystemReader):
        """DCP's file reader whose `.metadata` is read with `_MetadataUnpickler`, and which holds
        tensors only (DCP reads a non-tensor entry with a full unpickle)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = Path(self.path) / ".metadata"
            try:
                meta = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            except Exception as e:
                raise UserError(f"refusing sharded checkpoint {self.path}: its .metadata is not DCP's metadata "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            entries = getattr(meta, "state_dict_metadata", None)
            if not isinstance(entries, dict) or not all(isinstance(v, TensorStorageMetadata) for v in entries.values()):
                raise UserError(f"refusing sharded checkpoint {self.path}: it holds values other than tensors")
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return Reader


def SafeReader(path: str):  # noqa: N802  (a class, built on first use: DCP is imported lazily)
    global _READER
    if _READER is None:
        _READER = _reader_class()
    return _READER(path)


_READER = None


def files(directory: Path) -> list[str]:
    """The files a rank wrote into its checkpoint folder (names, sorted)."""
    return sorted(p.name for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith(".raycv"))


def world_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every rank's files with size and SHA-256, gathered (all ranks call it; rank 0 records them)."""
    import torch.distributed as dist

    from raycv.data.io import sha256_file

    mine = {n: {"bytes": (Path(directory) / n).stat().st_size, "sha256": sha256_file(Path(directory) / n)}
            for n in files(directory)}
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    merged: dict[str, dict[str, Any]] = {}
    for part in every:
        clash = set(part) & set(merged)
        assert not clash, f"two ranks wrote the same checkpoint file: {sorted(clash)}"
        merged.update(part)
    return merged

