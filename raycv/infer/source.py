"""Inference inputs: an image folder (recursive), a Parquet dataset of encoded images, or a
registry dataset split (`registry:digits:val`). Local paths or object-storage URIs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import ray.data

from raycv.config import DataSection, InferConfig
from raycv.data import build_dataset, check_source, get_dataset_entry
from raycv.data.sources import num_blocks, read_parquet_rows
from raycv.data.io import IMAGE_EXTENSIONS, exists, is_dir, list_files, resolve
from raycv.errors import UserError
from raycv.redact import HIDDEN


@dataclass
class InputRows:
    ds: ray.data.Dataset  # rows: path, and bytes when the source carries them
    count: int


def _drop_done(batch: dict, *, done: frozenset) -> dict:
    keep = [p not in done for p in batch["path"]]
    return {k: v[keep] for k, v in batch.items()}


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


def open_input(cfg: InferConfig, done: set[str], data: DataSection | None = None) -> InputRows:
    """`data`: the section a registry input is read with (`registry_data`); `check_input` ran before."""
    spec = cfg.infer.input
    if spec.startswith("registry:"):
        name, split = _registry_split(spec)
        splits = build_dataset(data or cfg.data.model_copy(update={"name": name}))
        ds = splits.val if split == "val" else splits.train
        ds = ds.drop_columns([c for c in ("label", "mask_path", "mask_bytes") if c in ds.columns()])
        rows = [r for r in ds.take_all() if r["path"] not in done]
        return InputRows(ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows))), len(rows))

    parquet = spec.endswith(".parquet") or (is_dir(spec) and any(f.endswith(".parquet") for f in list_files(spec)))
    if parquet:
        files = [f for f in list_files(spec) if f.endswith(".parquet")]
        cpus = cfg.data.decode_cpus
        _check_parquet_columns(spec, files, cfg.infer.path_column, cfg.infer.image_column)
        ds, count = read_parquet_rows(files, [cfg.infer.path_column, cfg.infer.image_column], num_cpus=cpus)
        ds = ds.map_batches(_rename, fn_kwargs={"path": cfg.infer.path_column, "image": cfg.infer.image_column},
                            batch_format="numpy", num_cpus=cpus)
        if done:
            ds = ds.map_batches(_drop_done, fn_kwargs={"done": frozenset(done)}, batch_format="numpy", num_cpus=cpus)
            ds = ds.materialize()
            count = ds.count()  # materialized: counted from block metadata
        return InputRows(ds, count)

    paths = [p for p in list_files(spec, IMAGE_EXTENSIONS) if p not in done]
    if not paths and not done:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {spec}")
    rows = [{"path": p} for p in paths]
    # With nothing left to do (resume), the pipeline is skipped; the dataset is never executed.
    ds = ray.data.from_items(rows or [{"path": ""}], override_num_blocks=num_blocks(len(rows)))
    return InputRows(ds, len(rows))


def _check_parquet_columns(spec: str, files: list[str], path_col: str, image_col: str) -> None:
    """Every file must have the two columns with usable types: fail before any work starts."""
    import pyarrow as pa

    for f in files:
        fs, p = resolve(f)
        try:
            schema = pq.read_schema(p, filesystem=fs)
        except Exception as e:
            raise UserError(f"parquet input {f} is unreadable: {str(e).splitlines()[0]}") from None
        for col, ok, want in ((path_col, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                               or pa.types.is_integer(t), "string or integer ids"),
                              (image_col, lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
                               "binary (encoded image bytes)")):
            if col not in schema.names:
                raise UserError(f"parquet input {f} has no column {col!r} (columns: {', '.join(schema.names)}); "
                                f"set infer.path_column / infer.image_column")
            if not ok(schema.field(col).type):
                raise UserError(f"parquet input {f}: column {col!r} is {schema.field(col).type}, expected {want}")


def _rename(batch: dict, *, path: str, image: str) -> dict:
    return {"path": np.asarray([str(p) for p in batch[path]], dtype=object), "bytes": batch[image]}
