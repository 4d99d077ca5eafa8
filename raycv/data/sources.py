"""The dataset sources for classification, and what every task's sources share. Each source lists its
inputs on the driver and hands Ray Data undecoded rows; decoding happens later, in Ray Data tasks
(`raycv.data.decode`). Segmentation sources: `segmentation_sources`; detection: `detection_sources`."""

from __future__ import annotations

import pickle
import random
from collections import defaultdict
from typing import Any

import numpy as np
import ray.data

from raycv.config import DataSection
from raycv.data import bundled
from raycv.data.io import IMAGE_EXTENSIONS, is_dir, list_files, normalize, read_bytes, read_text, resolve
from raycv.data.presets import IMAGENET_MEAN, IMAGENET_STD
from raycv.data.registry import DatasetSplits, register_dataset
from raycv.errors import UserError


def num_blocks(n: int) -> int:
    """Blocks for a list of n input rows: enough for parallel decode tasks, few enough to be cheap."""
    return max(4, min(200, n // 256))


def stratified_split(items: list[tuple[str, int]], val_fraction: float, seed: int):
    """Per class, a seeded shuffle, then the first round(n * val_fraction) go to val."""
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label])
        rng.shuffle(group)
        k = max(1, round(len(group) * val_fraction)) if len(group) > 1 else 0
        val += group[:k]
        train += group[k:]
    rng.shuffle(train)  # blocks must not be sorted by class: shuffling on the worker is local
    return train, val


def _folder_items(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """An ImageNet-style tree `<root>/<class>/.../<image>` -> (classes, [(path, label)])."""
    files = list_files(root, IMAGE_EXTENSIONS)
    base = normalize(root).rstrip("/")
    pairs = []
    for f in files:
        parts = f[len(base):].lstrip("/").split("/")
        if len(parts) < 2:
            continue  # files directly under root have no class folder
        pairs.append((f, parts[0]))
    classes = sorted({c for _, c in pairs})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [(f, index[c]) for f, c in pairs]


def _rows(items: list[tuple[str, int]], *, embed_bytes: bool) -> ray.data.Dataset:
    rows: list[dict[str, Any]] = []
    for path, label in items:
        row: dict[str, Any] = {"path": path, "label": label}
        if embed_bytes:  # small bundled sets travel with the job, so any node can decode them
            row["bytes"] = read_bytes(path)
        rows.append(row)
    return ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows)))


def _from_folder_split(root: str, cfg: DataSection, *, embed_bytes: bool, mean, std) -> DatasetSplits:
    classes, items = _folder_items(root)
    if not items:
        raise UserError(f"no images found under {root} (expected <root>/<class>/<image>)")
    train, val = stratified_split(items, cfg.val_fraction, cfg.seed)
    return DatasetSplits(classes, _rows(train, embed_bytes=embed_bytes), _rows(val, embed_bytes=embed_bytes),
                         len(train), len(val), mean, std)


@register_dataset("digits", description="scikit-learn's 1,797 handwritten digit scans (8x8, bundled, offline); the default")
def digits(cfg: DataSection) -> DatasetSplits:
    return _from_folder_split(str(bundled.digits_root()), cfg, embed_bytes=True, mean=(0.305,) * 3, std=(0.376,) * 3)


@register_dataset("shapes", description="generated circles, squares and triangles (64 px), any number, seeded")
def shapes(cfg: DataSection) -> DatasetSplits:
    root = bundled.shapes_root(cfg.num_samples, cfg.seed)
    return _from_folder_split(str(root), cfg, embed_bytes=True, mean=(0.25,) * 3, std=(0.3,) * 3)


@register_dataset("image_folder", needs_root=True,
                  description="an ImageNet-style tree: <root>/{train,val}/<class>/<image>, or <root>/<class>/<image> split by data.val_fraction")
def image_folder(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    if not is_dir(root):
        raise UserError(f"data.root is not a folder: {root}")
    mean = tuple(cfg.mean or IMAGENET_MEAN)
    std = tuple(cfg.std or IMAGENET_STD)
    if is_dir(f"{root}/train") and is_dir(f"{root}/val"):
        classes, train = _folder_items(f"{root}/train")
        val_classes, val = _folder_items(f"{root}/val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"{root}/val has classes that train lacks: {', '.join(unknown)}")
        remap = {i: classes.index(c) for i, c in enumerate(val_classes)}
        val = [(p, remap[label]) for p, label in val]
        if not train or not val:
            raise UserError(f"no images found under {root}/train or {root}/val")
        return DatasetSplits(classes, _rows(train, embed_bytes=False), _rows(val, embed_bytes=False),
                             len(train), len(val), mean, std)
    return _from_folder_split(root, cfg, embed_bytes=False, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------
# CIFAR-10, as users download it: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
# ----------------------------------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR batches are pickles; load them without letting them name arbitrary callables."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def load_cifar_batch(data: bytes) -> dict:
    import io

    try:
        return _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise UserError(f"not a CIFAR-10 python batch: {e}") from None


def _cifar_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path = str(batch["file"][0])
    d = load_cifar_batch(read_bytes(path))
    images = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    name = path.rsplit("/", 1)[-1]
    return {"path": np.asarray([f"{name}#{i}" for i in range(len(labels))], dtype=object),
            "label": labels, "image": images}


@register_dataset("cifar10", needs_root=True, description="CIFAR-10 python batches (data.root=.../cifar-10-batches-py)")
def cifar10(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    train_files = [f"{root}/data_batch_{i}" for i in range(1, 6)]
    listed = set(list_files(root)) if is_dir(root) else set()
    present = [f for f in train_files if f in listed]
    if not present:
        raise UserError(f"{root} does not look like cifar-10-batches-py (no data_batch_* files)")
    meta = load_cifar_batch(read_bytes(f"{root}/batches.meta"))
    classes = [c.decode() for c in meta[b"label_names"]]
    counts = {f: len(load_cifar_batch(read_bytes(f))[b"labels"]) for f in present + [f"{root}/test_batch"]}

    def ds(files):
        return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).map_batches(
            _cifar_rows, batch_size=1, num_cpus=cfg.decode_cpus)

    return DatasetSplits(classes, ds(present), ds([f"{root}/test_batch"]),
                         sum(counts[f] for f in present), counts[f"{root}/test_batch"],
                         tuple(cfg.mean or (0.4914, 0.4822, 0.4465)), tuple(cfg.std or (0.2470, 0.2435, 0.2616)))


# ----------------------------------------------------------------------------------------------
# Parquet with encoded image bytes and a label column
# ----------------------------------------------------------------------------------------------


def _read_row_group(batch: dict[str, np.ndarray], *, columns: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq


    fs, p = resolve(str(batch["file"][0]))
    with fs.open_input_file(p) as f:
        table = pq.ParquetFile(f).read_row_group(int(batch["row_group"][0]), columns=columns)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


def read_parquet_rows(files: list[str], columns: list[str], *, num_cpus: float,
                      optional: tuple[str, ...] = (), hint: str = "") -> tuple[ray.data.Dataset, int]:
    """(Parquet files as a stream of row groups read in tasks that ask for `num_cpus` each, their row
    count). `columns` must be in every file (else one line naming the file); `optional` ones are read
    where the first file has them. The count comes from the footers read here: counting the dataset
    would read every image.

    Not `ray.data.read_parquet`: in Ray 2.58 it adds a file-listing task that always asks for a
    whole CPU, which waits forever beside a predictor actor or training workers holding the rest of
    a small machine."""
    import pyarrow.parquet as pq

    items, rows, first = [], 0, None
    for f in files:
        fs, p = resolve(f)
        with fs.open_input_file(p) as fh:
            pf = pq.ParquetFile(fh)
            meta, names = pf.metadata, pf.schema_arrow.names  # top-level columns (nested ones have leaf names)
        first = first or names
        for col in columns:
            if col not in names:
                raise UserError(f"parquet {f} has no column {col!r} (columns: {', '.join(names)}){hint}")
        items += [{"file": f, "row_group": i} for i in range(meta.num_row_groups) if meta.row_group(i).num_rows]
        rows += meta.num_rows
    wanted = list(columns) + [c for c in optional if c in (first or [])]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_read_row_group, fn_kwargs={"columns": wanted}, batch_size=1, num_cpus=num_cpus), rows


def _parquet_split(path: str, cfg: DataSection) -> tuple[ray.data.Dataset, int]:
    files = [f for f in list_files(path) if f.endswith(".parquet")]
    if not files:
        raise UserError(f"no .parquet files under {path}")
    return read_parquet_rows(files, [cfg.image_column, cfg.label_column], num_cpus=cfg.decode_cpus,
                             optional=("path",))


def subfolders_or_split(root: str, cfg: DataSection, read) -> tuple[ray.data.Dataset, int, ray.data.Dataset, int]:
    """(train, its rows, val, its rows): `<root>/train` and `<root>/val` when both exist, else all of
    `root` split by data.val_fraction with data.seed. `read(folder)` -> (dataset, rows)."""
    if is_dir(f"{root}/train") and is_dir(f"{root}/val"):
        (train, n_train), (val, n_val) = read(f"{root}/train"), read(f"{root}/val")
        return train, n_train, val, n_val
    whole, n = read(root)
    train, val = whole.materialize().train_test_split(test_size=cfg.val_fraction, shuffle=True, seed=cfg.seed)
    n_val = val.count()  # materialized: counted from block metadata
    return train, n - n_val, val, n_val


def _parquet_classes(dss: list[ray.data.Dataset], label_column: str) -> tuple[list[str], bool]:
    sample = dss[0].select_columns([label_column]).take(1)
    if sample and isinstance(sample[0][label_column], str):
        labels = set()
        for d in dss:
            labels |= set(d.unique(label_column))
        return sorted(labels), True
    top = max(int(d.max(label_column)) for d in dss)
    return [str(i) for i in range(top + 1)], False


def _parquet_rows(batch: dict[str, np.ndarray], *, image_column: str, label_column: str,
                  index: dict[str, int] | None, source: str) -> dict[str, np.ndarray]:
    labels = batch[label_column]
    n = len(labels)
    images = batch[image_column]
    paths = batch["path"] if "path" in batch else np.asarray([source] * n, dtype=object)
    if n and isinstance(images[0], dict):  # Hugging Face's Image feature: struct<bytes, path>
        paths = np.asarray([(v.get("path") or p) if v else p for v, p in zip(images, paths)], dtype=object)
        images = np.asarray([v.get("bytes") if v else None for v in images], dtype=object)
    return {"bytes": images, "path": paths,
            "label": np.asarray([index[str(v)] for v in labels] if index else labels, dtype=np.int64)}


HF_TRAIN = ("train",)
HF_VAL = ("validation", "valid", "val", "test")  # the first of these a Hugging Face export has


def _split_prefix(f: str) -> str:
    return f.rsplit("/", 1)[-1].split("-", 1)[0].split(".", 1)[0]


def hugging_face_splits(files: list[str]) -> tuple[list[str], list[str]] | None:
    """(train files, val files) of a Hugging Face Parquet export (`train-00000-of-00002.parquet`,
    `validation-...`, `test-...`, often under data/), or None."""
    train = [f for f in files if _split_prefix(f) in HF_TRAIN]
    for name in HF_VAL:
        val = [f for f in files if _split_prefix(f) == name]
        if train and val:
            return train, val
    return None


def hugging_face_class_names(file: str, label_column: str) -> list[str] | None:
    """The names of a `ClassLabel` column, from the `huggingface` metadata `datasets` writes into
    the Parquet schema."""
    import json

    import pyarrow.parquet as pq

    fs, p = resolve(file)
    with fs.open_input_file(p) as fh:
        meta = pq.read_schema(fh).metadata or {}
    try:
        feature = json.loads(meta[b"huggingface"])["info"]["features"][label_column]
    except (KeyError, ValueError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if names else None


@register_dataset("parquet", needs_root=True,
                  description="Parquet with encoded image bytes (data.image_column) and a label (data.label_column); train/ and val/ subfolders, a Hugging Face export (train-*/validation-* files, Image and ClassLabel features), or a split")
def parquet(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    files = [f for f in list_files(root) if f.endswith(".parquet")] if is_dir(root) else [root]
    hf = hugging_face_splits(files) if not (is_dir(f"{root}/train") and is_dir(f"{root}/val")) else None
    if hf:  # a Hugging Face export: train-*.parquet beside validation-* (or test-*)
        read = lambda fs: read_parquet_rows(fs, [cfg.image_column, cfg.label_column], num_cpus=cfg.decode_cpus,
                                            optional=("path",))
        (train, n_train), (val, n_val) = read(hf[0]), read(hf[1])
    else:
        train, n_train, val, n_val = subfolders_or_split(root, cfg, lambda folder: _parquet_split(folder, cfg))
    names = hugging_face_class_names(files[0], cfg.label_column) if files else None
    return labelled_splits(cfg, root, train, n_train, val, n_val, names)


def labelled_splits(cfg: DataSection, root: str, train: ray.data.Dataset, n_train: int, val: ray.data.Dataset,
                    n_val: int, names: list[str] | None) -> DatasetSplits:
    """Rows of an image column and a label column (an index or a class name) -> raycv's rows, the
    classes `names` (a ClassLabel's) or, without them, the labels found."""
    classes, by_name = (names, False) if names else _parquet_classes([train, val], cfg.label_column)
    fn_kwargs = dict(image_column=cfg.image_column, label_column=cfg.label_column,
                     index={c: i for i, c in enumerate(classes)} if by_name else None, source=root)
    train = train.map_batches(_parquet_rows, fn_kwargs=fn_kwargs, batch_format="numpy", num_cpus=cfg.decode_cpus)
    val = val.map_batches(_parquet_rows, fn_kwargs=fn_kwargs, batch_format="numpy", num_cpus=cfg.decode_cpus)
    return DatasetSplits(classes, train, val, n_train, n_val,
                         tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD))


def classes_file(root: str) -> list[str] | None:
    text = read_text(f"{root}/classes.txt")
    return [c.strip() for c in text.splitlines() if c.strip()] if text else None
