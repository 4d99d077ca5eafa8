"""Hugging Face datasets on disk: a `DatasetDict.save_to_disk` folder (Arrow files per split) or a
Parquet export (read by the `parquet` source)."""

from __future__ import annotations

import json

import numpy as np
import ray.data

from raycv.config import DataSection
from raycv.data.io import exists, list_files, read_text, resolve
from raycv.data.registry import DatasetSplits, register_dataset
from raycv.data.sources import HF_TRAIN, HF_VAL, labelled_splits, parquet
from raycv.errors import UserError


def _open_arrow(fs, path: str):
    """A reader of an Arrow file: `save_to_disk` writes the IPC stream format; the IPC file format
    (`.arrow` / `.feather` written by pyarrow) is read too."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(fs.open_input_stream(path))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(fs.open_input_file(path))


def arrow_rows(file: str) -> int:
    """Rows of one Arrow file. A stream has no footer: its record batches are read through (a local
    file is memory-mapped by pyarrow's filesystem, so only the batch headers are touched)."""
    import pyarrow as pa

    fs, p = resolve(file)
    try:
        reader = _open_arrow(fs, p)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{file} is not an Arrow file ({e})") from None
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return sum(b.num_rows for b in reader)


def _read_arrow_file(batch: dict[str, np.ndarray], *, columns: list[str]) -> dict[str, np.ndarray]:
    fs, p = resolve(str(batch["file"][0]))
    table = _open_arrow(fs, p).read_all().select(columns)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


def _split_files(root: str, split: str) -> list[str]:
    """A split's Arrow files, in the order its state.json lists them (else sorted)."""
    folder = f"{root}/{split}"
    state = read_text(f"{folder}/state.json")
    try:
        named = [f"{folder}/{d['filename']}" for d in json.loads(state)["_data_files"]] if state else []
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder}/state.json is not a Hugging Face dataset state") from None
    return named or [f for f in list_files(folder) if f.endswith(".arrow")]


def _class_names(root: str, split: str, label_column: str) -> list[str] | None:
    text = read_text(f"{root}/{split}/dataset_info.json")
    try:
        feature = json.loads(text)["features"][label_column] if text else None
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if names else None


def _saved_splits(root: str) -> tuple[str, str]:
    text = read_text(f"{root}/dataset_dict.json")
    try:
        splits = [str(s) for s in json.loads(text)["splits"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{root}/dataset_dict.json does not list the dataset's splits") from None
    train = next((s for s in splits if s in HF_TRAIN), None)
    val = next((s for s in HF_VAL if s in splits), None)
    if not (train and val):
        raise UserError(f"{root}: a saved DatasetDict needs a 'train' split and one of {', '.join(HF_VAL)}; "
                        f"it has {', '.join(splits) or 'none'}")
    return train, val


def read_arrow_rows(files: list[str], columns: list[str], *, num_cpus: float) -> tuple[ray.data.Dataset, int]:
    """(the Arrow files as a stream of tables read in Ray tasks, one per file; their row count)."""
    rows = 0
    for f in files:
        fs, p = resolve(f)
        names = _open_arrow(fs, p).schema.names
        for col in columns:
            if col not in names:
                raise UserError(f"arrow file {f} has no column {col!r} (columns: {', '.join(names)})")
        rows += arrow_rows(f)
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=max(1, len(files)))
    return ds.map_batches(_read_arrow_file, fn_kwargs={"columns": columns}, batch_size=1, num_cpus=num_cpus), rows


@register_dataset("huggingface", needs_root=True,
                  description="a Hugging Face dataset on disk: a DatasetDict.save_to_disk folder (dataset_dict.json, Arrow files per split) or a Parquet export; image column data.image_column, label data.label_column (ClassLabel names kept)")
def huggingface(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    if not exists(f"{root}/dataset_dict.json"):
        if any(f.endswith(".parquet") for f in list_files(root)):
            return parquet(cfg)
        raise UserError(f"{root} is neither a saved DatasetDict (no dataset_dict.json) nor a Parquet export (no .parquet files)")
    train_split, val_split = _saved_splits(root)
    columns = [cfg.image_column, cfg.label_column]
    (train, n_train), (val, n_val) = (read_arrow_rows(_split_files(root, s), columns, num_cpus=cfg.decode_cpus)
                                      for s in (train_split, val_split))
    return labelled_splits(cfg, root, train, n_train, val, n_val, _class_names(root, train_split, cfg.label_column))
