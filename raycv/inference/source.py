"""Inference inputs: an image folder (recursive), a Parquet dataset of encoded images, a Parquet
manifest of image URIs (`infer.image_column=null`), or a registry dataset split
(`registry:digits:val`). Local paths or object-storage URIs.

The driver lists only the top level of a folder (or reads the Parquet footers) and hands Ray
units to list or read (`raycv/inference/shards.py`); a registry split, small, is taken here."""

from __future__ import annotations

from dataclasses import dataclass

import json

import pyarrow.parquet as pq
import ray.data

from raycv.config import DataSection, InferConfig
from raycv.data import build_dataset, check_source, get_dataset_entry
from raycv.data.sources import num_blocks
from raycv.data.io import IMAGE_EXTENSIONS, exists, is_dir, list_files, resolve
from raycv.errors import UserError
from raycv.inference.output import OutputLocation
from raycv.inference.shards import EMIT_ROWS, expand_unit, folder_units, parquet_units, plan_rows
from raycv.ray_internals import in_blocks_of
from raycv.redact import HIDDEN


@dataclass
class InputPlan:
    ds: ray.data.Dataset | None  # rows to predict: path, shard, and bytes when the source carries them
    unit_keys: list[str]  # one plan file per unit, read back by the check before publishing
    ids_unique: bool  # a folder's paths are; a Parquet or registry input's ids may repeat


def _registry_split(spec: str) -> tuple[str, str]:
    """`registry:<dataset>[:train|val]` -> (dataset, split)."""
    _, name, *rest = spec.split(":")
    split = rest[0] if rest else "val"
    if split not in ("train", "val") or len(rest) > 1:
        raise UserError(f"registry input split must be train or val, got {':'.join(rest)!r} in {spec}")
    return name, split


def check_input(cfg: InferConfig) -> None:
    """The input exists (a path or URI, or a registered dataset whose files are there): checked
    before Ray starts."""
    spec = cfg.infer.input
    if spec is None:
        raise UserError("infer.input is required (--input FOLDER | PARQUET | registry:<dataset>[:train|val])")
    if spec.startswith("registry:"):
        get_dataset_entry(_registry_split(spec)[0])  # its files are checked on the section it is read with
    elif not exists(spec):
        raise UserError(f"infer.input does not exist: {spec}")


# What decides which images land in a registry dataset's train and val splits.
SPLIT_KEYS = ("root", "num_samples", "seed", "val_fraction", "classes")


def registry_data(cfg: InferConfig, recorded: dict | None) -> DataSection | None:
    """The data section a `registry:<dataset>` input is read with, or None for other inputs. With a
    checkpoint trained on that dataset, the split it recorded (root, size, seed, fraction, classes):
    read with other settings, "val" would hold images the checkpoint trained on (a 2,000-scene
    default against a 1,000-scene run: half of the rows scored were training images). A checkpoint
    that records no split for it is refused rather than guessed at."""
    if not (cfg.infer.input or "").startswith("registry:"):
        return None
    name, _ = _registry_split(cfg.infer.input)
    data = cfg.data.model_copy(update={"name": name})
    if recorded is None or recorded.get("name") != name:  # torchvision weights, or a checkpoint of another
        check_source(data)  # dataset: none of these images was trained on
        return data
    missing = [k for k in SPLIT_KEYS if k not in recorded]
    if missing:
        raise UserError(f"the checkpoint records no data.{missing[0]} for {name}, so the split it was validated on "
                        f"cannot be reproduced; pass the images as a folder or Parquet instead of {cfg.infer.input}")
    split = {k: recorded[k] for k in SPLIT_KEYS}
    if HIDDEN in str(split["root"]):  # recorded redacted: the user's own data.root (with its credentials) is the one
        split["root"] = cfg.data.root
    data = data.model_copy(update=split)
    check_source(data)  # the files it will be read from are there
    return data


def open_input(cfg: InferConfig, out: OutputLocation, prior: dict[str, list[dict]], counter,
               data: DataSection | None = None) -> InputPlan:
    """`data`: the section a registry input is read with (`registry_data`); `check_input` ran before.
    `prior`: the committed parts per shard a resumed run may reuse."""
    spec = cfg.infer.input
    per_shard = cfg.infer.rows_per_file
    if spec.startswith("registry:"):
        name, split = _registry_split(spec)
        splits = build_dataset(data or cfg.data.model_copy(update={"name": name}))
        ds = splits.val if split == "val" else splits.train
        ds = ds.drop_columns([c for c in ("label", "mask_path", "mask_bytes") if c in ds.columns()])
        todo, unit_key = plan_rows(ds.take_all(), spec, per_shard, prior, out.fs, out.path)
        counter.add_total.remote(len(todo), 1)
        rows = ray.data.from_items(todo, override_num_blocks=num_blocks(len(todo))) if todo else None
        return InputPlan(rows, [unit_key], ids_unique=False)

    parquet = spec.endswith(".parquet") or (is_dir(spec) and any(f.endswith(".parquet") for f in list_files(spec)))
    if parquet:
        files = [f for f in list_files(spec) if f.endswith(".parquet")]
        _check_parquet_columns(spec, files, cfg.infer.path_column, cfg.infer.image_column)
        units = parquet_units(files)
    else:
        units = folder_units(spec, per_shard)
        if not units:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {spec}")
    by_unit: dict[str, dict] = {}
    for sid, parts in prior.items():
        by_unit.setdefault(sid.rsplit("-", 1)[0], {})[sid] = parts
    items = [{"unit": json.dumps(u), "prior": json.dumps(by_unit.get(u["key"], {}))} for u in units]
    # Unit tasks take no CPU and are few at a time. A unit task is a streaming generator that Ray
    # pauses while its rows wait downstream; holding a CPU share, it held the slot the decode tasks
    # that would drain it need, and the run stopped for good (2,000,000 rows on 2 CPUs, seen twice:
    # the actors holding 1.5 CPUs, a paused unit task the last 0.5). Their memory is bounded by their
    # number (a Parquet unit holds its row group).
    cpus = 0
    listing = max(1, min(len(items), max(2, int(ray.cluster_resources().get("CPU", 2)) // 4)))  # Ray warns above the units
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        expand_unit, batch_size=1, num_cpus=cpus, compute=ray.data.TaskPoolStrategy(size=listing),
        fn_kwargs={"out_uri": out.uri, "rows_per_shard": per_shard, "path_column": cfg.infer.path_column,
                   "image_column": cfg.infer.image_column if parquet else None, "counter": counter})
    block_rows = min(EMIT_ROWS, per_shard, cfg.infer.commit_rows)  # a part can commit at commit_rows
    return InputPlan(in_blocks_of(ds, block_rows, num_cpus=cpus, tasks=listing), [u["key"] for u in units], ids_unique=not parquet)


def _check_parquet_columns(spec: str, files: list[str], path_col: str, image_col: str | None) -> None:
    """Every file must have the two columns with usable types (a manifest, `image_col` None: the
    path column, holding each image's path or URI): fail before any work starts."""
    import pyarrow as pa

    for f in files:
        fs, p = resolve(f)
        try:
            schema = pq.read_schema(p, filesystem=fs)
        except Exception as e:
            raise UserError(f"parquet input {f} is unreadable: {str(e).splitlines()[0]}") from None
        text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
        checks = [(path_col, lambda t: text(t) or pa.types.is_integer(t), "string or integer ids")]
        if image_col is None:
            checks = [(path_col, text, "string (image paths or URIs: infer.image_column is null)")]
        else:
            checks.append((image_col, lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
                           "binary (encoded image bytes)"))
        for col, ok, want in checks:
            if col not in schema.names:
                raise UserError(f"parquet input {f} has no column {col!r} (columns: {', '.join(schema.names)}); "
                                f"set infer.path_column / infer.image_column (null: the path column holds "
                                f"image URIs to read)")
            if not ok(schema.field(col).type):
                raise UserError(f"parquet input {f}: column {col!r} is {schema.field(col).type}, expected {want}")


