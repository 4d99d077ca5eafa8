"""One registry that maps a dataset name to the function that reads it through Ray Data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from raycv.errors import UserError

if TYPE_CHECKING:
    import ray.data

    from raycv.config import DataSection


@dataclass
class DatasetSplits:
    """What every source returns: undecoded rows. Classification: `path`, `label`, and `bytes` or
    `image`; segmentation: `path`, `mask_path`, and `bytes` / `mask_bytes` when the files travel
    with the job. `classes` of a segmentation set start with the background class (index 0)."""

    classes: list[str]
    train: "ray.data.Dataset"
    val: "ray.data.Dataset"
    num_train: int
    num_val: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    builder: Callable[["DataSection"], DatasetSplits]
    description: str
    needs_root: bool  # the user points data.root at their files
    task: str = "classification"  # or "segmentation": what the rows' targets are


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, description: str, needs_root: bool = False, task: str = "classification"):
    def wrap(builder):
        if name in _DATASETS:
            from raycv.plugins import NameTaken

            raise NameTaken(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, builder, description, needs_root, task)
        return builder

    return wrap


def replace_dataset(entry: DatasetEntry) -> None:
    """Register `entry` under its name, replacing an earlier one: for datasets that live in this
    process only (raycv.train(data=...))."""
    _DATASETS[entry.name] = entry


def get_dataset_entry(name: str) -> DatasetEntry:
    if name not in _DATASETS:
        from raycv import plugins

        plugins.load_entry_points()
    try:
        return _DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r} (valid: {', '.join(sorted(_DATASETS))}; a dataset of your own: "
                        f"load its plugin with --import MODULE or run.plugins)") from None


def check_source(cfg: "DataSection") -> DatasetEntry:
    """The dataset exists and, when it reads the user's files, they are there: checked before Ray
    starts (a wrong name or path fails in a second, not after a cluster start)."""
    from raycv.data import io as fsio

    entry = get_dataset_entry(cfg.name)
    if entry.needs_root:
        if not cfg.root:
            raise UserError(f"dataset {cfg.name!r} needs data.root=PATH (where its files are)")
        if not fsio.exists(cfg.root):
            raise UserError(f"data.root does not exist: {cfg.root}")
    return entry


def build_dataset(cfg: "DataSection") -> DatasetSplits:
    return check_source(cfg).builder(cfg)


def list_datasets() -> list[DatasetEntry]:
    from raycv import plugins

    plugins.load_entry_points()
    return [e for _, e in sorted(_DATASETS.items())]
