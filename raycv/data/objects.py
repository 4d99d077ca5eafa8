"""Datasets handed to `raycv.train(..., data=...)` as Python objects: Hugging Face `datasets.Dataset`s
(through `ray.data.from_huggingface`) or Ray Datasets, for image classification. They live in the
driver's process, so they are registered there under the name `python` for that run only; the
run's config.yaml says `data.name: python` (the objects themselves cannot be written down)."""

from __future__ import annotations

from typing import Any

from raycv.config import DataSection
from raycv.data.presets import IMAGENET_MEAN, IMAGENET_STD
from raycv.data.registry import DatasetEntry, DatasetSplits, replace_dataset
from raycv.errors import UserError

NAME = "python"
VAL_KEYS = ("validation", "valid", "val", "test")


def _pick(data: Any) -> tuple[Any, Any]:
    """(train, val) of a DatasetDict or a mapping with `train` and `validation` / `val` / `test`."""
    try:
        keys = list(data.keys())
    except AttributeError:
        raise UserError(f"data= wants a mapping with train and val splits (a datasets.DatasetDict or "
                        f"{{'train': ..., 'val': ...}}), not a {type(data).__name__}") from None
    val_key = next((k for k in VAL_KEYS if k in keys), None)
    if "train" not in keys or val_key is None:
        raise UserError(f"data= needs a 'train' split and one of {', '.join(VAL_KEYS)}; it has {', '.join(map(str, keys))}")
    return data["train"], data[val_key]


def _class_names(split: Any, label_column: str) -> list[str] | None:
    feature = getattr(split, "features", {}).get(label_column) if hasattr(split, "features") else None
    names = getattr(feature, "names", None)
    return [str(n) for n in names] if names else None


def _as_ray(split: Any, cfg: DataSection):
    """(a Ray Dataset of raycv's undecoded rows, its row count)."""
    import ray.data

    from raycv.data.sources import _parquet_rows

    if isinstance(split, ray.data.Dataset):
        ds, n = split, split.count()
    elif type(split).__module__.startswith("datasets."):
        ds, n = ray.data.from_huggingface(split), len(split)
    else:
        raise UserError(f"a data= split is a datasets.Dataset or a ray.data.Dataset, not a {type(split).__name__}")
    columns = ds.columns() or []
    for col in (cfg.image_column, cfg.label_column):
        if col not in columns:
            raise UserError(f"a data= split has no column {col!r} (columns: {', '.join(columns)}); "
                            f"set data.image_column / data.label_column")
    return ds.map_batches(_parquet_rows, fn_kwargs=dict(image_column=cfg.image_column, label_column=cfg.label_column,
                                                        index=None, source=NAME),
                          batch_format="numpy", num_cpus=cfg.decode_cpus), n


def register_objects(data: Any) -> None:
    """Make `data` the `python` dataset of this process (replacing an earlier one)."""
    train_split, val_split = _pick(data)

    def build(cfg: DataSection) -> DatasetSplits:
        classes = cfg.classes or _class_names(train_split, cfg.label_column)
        train, n_train = _as_ray(train_split, cfg)
        val, n_val = _as_ray(val_split, cfg)
        if not classes:
            top = max(int(train.max("label")), int(val.max("label")))
            classes = [str(i) for i in range(top + 1)]
        return DatasetSplits(list(classes), train, val, n_train, n_val, tuple(cfg.mean or IMAGENET_MEAN),
                             tuple(cfg.std or IMAGENET_STD))

    replace_dataset(DatasetEntry(NAME, build, "a dataset handed to raycv.train(data=...) in this process", False))
