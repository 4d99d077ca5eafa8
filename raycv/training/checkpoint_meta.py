"""What a checkpoint's `raycv.json` must hold (docs/outputs.md), validated with bounds: a damaged
or crafted file is one line naming the field, never a traceback or an absurd allocation later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raycv.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _ModelMeta(_Strict):
    name: str = Field(min_length=1, max_length=200)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class _PresetMeta(_Strict):
    kind: Literal["classification", "segmentation", "detection"] | None = None
    input_size: int = Field(ge=8, le=4096)  # the same bounds as data.input_size / resize_size, with room
    resize_size: int | None = Field(None, ge=8, le=8192)
    mean: list[float] | None = Field(None, min_length=1, max_length=4)
    std: list[float] | None = Field(None, min_length=1, max_length=4)


class _FileMeta(_Strict):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _QuantMeta(_Strict):
    method: Literal["static", "dynamic"]
    backend: Literal["x86", "qnnpack", "fbgemm"] = "x86"
    dtype: Literal["int8"] = "int8"
    calibration_images: int = Field(0, ge=0)
    source: str | None = None
    note: str | None = None


class _PruneMeta(_Strict):
    method: Literal["global_magnitude", "ln_structured"]
    amount: float = Field(ge=0.0, le=1.0)
    structured: bool = False  # layers narrower than the registered model's: shaped on load
    sparsity: float | None = Field(None, ge=0.0, le=1.0)
    parameters: int | None = Field(None, ge=0)
    source: str | None = None


class _ShardMeta(_Strict):
    format: Literal["torch.distributed.checkpoint"]
    world_size: int = Field(ge=1)
    strategy: Literal["fsdp"] = "fsdp"


class Meta(_Strict):
    """What `raycv.json` must hold."""

    format: Literal["raycv-checkpoint"]
    task: Literal["classification", "segmentation", "detection"]
    model: _ModelMeta
    classes: list[str] = Field(min_length=1, max_length=100_000)
    preprocess: _PresetMeta
    epoch: int = Field(ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, _FileMeta] = Field(default_factory=dict)
    quantization: _QuantMeta | None = None
    pruning: _PruneMeta | None = None
    sharded: _ShardMeta | None = None


def read_meta(path: Path) -> Meta:
    """`raycv.json`, parsed and validated; a damaged or crafted one is one line naming the field."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:
        raise UserError(f"not a raycv checkpoint: {path} is unreadable ({str(e).splitlines()[0]})") from None
    return parse_meta(text, str(path))


def parse_meta(text: str, where: str) -> Meta:
    try:
        return Meta.model_validate(json.loads(text))
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "the file"
        raise UserError(f"not a raycv checkpoint: {where}: {field}: {first['msg']}") from None
    except ValueError as e:
        raise UserError(f"not a raycv checkpoint: {where} is unreadable ({str(e).splitlines()[0]})") from None
