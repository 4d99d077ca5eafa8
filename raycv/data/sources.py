"""The dataset sources. Each lists its inputs on the driver and hands Ray Data undecoded rows;
decoding happens later, in Ray Data tasks (`raycv.data.decode`)."""

from __future__ import annotations

import pickle
import random
from collections import defaultdict
from pathlib import Path
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


def _subfolders_or_split(root: str, cfg: DataSection, read) -> tuple[ray.data.Dataset, int, ray.data.Dataset, int]:
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
    out = {"bytes": batch[image_column],
           "label": np.asarray([index[str(v)] for v in labels] if index else labels, dtype=np.int64)}
    out["path"] = batch["path"] if "path" in batch else np.asarray([source] * n, dtype=object)
    return out


@register_dataset("parquet", needs_root=True,
                  description="Parquet with encoded image bytes (data.image_column) and a label (data.label_column); train/ and val/ subfolders or a split")
def parquet(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    train, n_train, val, n_val = _subfolders_or_split(root, cfg, lambda folder: _parquet_split(folder, cfg))
    classes, by_name = _parquet_classes([train, val], cfg.label_column)
    fn_kwargs = dict(image_column=cfg.image_column, label_column=cfg.label_column,
                     index={c: i for i, c in enumerate(classes)} if by_name else None, source=root)
    train = train.map_batches(_parquet_rows, fn_kwargs=fn_kwargs, batch_format="numpy", num_cpus=cfg.decode_cpus)
    val = val.map_batches(_parquet_rows, fn_kwargs=fn_kwargs, batch_format="numpy", num_cpus=cfg.decode_cpus)
    return DatasetSplits(classes, train, val, n_train, n_val,
                         tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD))


# ----------------------------------------------------------------------------------------------
# Semantic segmentation, VOC-style: JPEGImages/<id>.<ext>, SegmentationClass/<id>.png (pixel value =
# class index, 255 = void), ImageSets/Segmentation/{train,val}.txt; class names in classes.txt (one
# per line, background first), else PASCAL VOC 2012's 21.
# ----------------------------------------------------------------------------------------------

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _classes_file(root: str) -> list[str] | None:
    text = read_text(f"{root}/classes.txt")
    return [c.strip() for c in text.splitlines() if c.strip()] if text else None


def _voc_pairs(root: str, stems: list[str], images: dict[str, str], masks: dict[str, str], listed_in: str):
    missing = [s for s in stems if s not in images or s not in masks]
    if missing:
        what = "image" if missing[0] not in images else "mask"
        raise UserError(f"{listed_in} lists {missing[0]!r} but {root} has no {what} for it "
                        f"({len(missing)} listed ids lack files)")
    return [(images[s], masks[s]) for s in stems]


def voc_items(root: str, val_fraction: float, seed: int) -> tuple[list[str], list, list]:
    """(classes, train pairs, val pairs) of a VOC-style tree; pairs are (image path, mask path)."""
    root = root.rstrip("/")
    for sub in ("JPEGImages", "SegmentationClass"):
        if not is_dir(f"{root}/{sub}"):
            raise UserError(f"{root} is not a VOC-style segmentation tree: no {sub}/ folder")
    stem = lambda p: p.rsplit("/", 1)[-1].rsplit(".", 1)[0]  # noqa: E731
    images = {stem(p): p for p in list_files(f"{root}/JPEGImages", IMAGE_EXTENSIONS)}
    masks = {stem(p): p for p in list_files(f"{root}/SegmentationClass", (".png",))}
    classes = _classes_file(root) or list(VOC_CLASSES)
    lists = f"{root}/ImageSets/Segmentation"
    train_txt, val_txt = read_text(f"{lists}/train.txt"), read_text(f"{lists}/val.txt")
    if train_txt is not None and val_txt is not None:
        train = _voc_pairs(root, train_txt.split(), images, masks, f"{lists}/train.txt")
        val = _voc_pairs(root, val_txt.split(), images, masks, f"{lists}/val.txt")
    else:  # no split lists: every image with a mask, split by data.val_fraction
        both = sorted(set(images) & set(masks))
        random.Random(seed).shuffle(both)
        k = max(1, round(len(both) * val_fraction))
        train, val = [(images[s], masks[s]) for s in both[k:]], [(images[s], masks[s]) for s in both[:k]]
    if not train or not val:
        raise UserError(f"no image/mask pairs found under {root} (train: {len(train)}, val: {len(val)})")
    return classes, train, val


def _pair_rows(pairs: list[tuple[str, str]], *, embed_bytes: bool) -> ray.data.Dataset:
    rows = []
    for image, mask in pairs:
        row: dict[str, Any] = {"path": image, "mask_path": mask}
        if embed_bytes:
            row["bytes"], row["mask_bytes"] = read_bytes(image), read_bytes(mask)
        rows.append(row)
    return ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows)))


def _voc_splits(root: str, cfg: DataSection, *, embed_bytes: bool, mean, std) -> DatasetSplits:
    classes, train, val = voc_items(root, cfg.val_fraction, cfg.seed)
    classes = cfg.classes or classes
    return DatasetSplits(classes, _pair_rows(train, embed_bytes=embed_bytes), _pair_rows(val, embed_bytes=embed_bytes),
                         len(train), len(val), mean, std)


@register_dataset("voc_segmentation", needs_root=True, task="segmentation",
                  description="VOC-style segmentation: <root>/JPEGImages, SegmentationClass (PNG class masks), ImageSets/Segmentation/{train,val}.txt")
def voc_segmentation(cfg: DataSection) -> DatasetSplits:
    return _voc_splits(cfg.root, cfg, embed_bytes=False, mean=tuple(cfg.mean or IMAGENET_MEAN),
                       std=tuple(cfg.std or IMAGENET_STD))


@register_dataset("shapes_segmentation", task="segmentation",
                  description="generated scenes of 1-3 shapes (64 px) with exact class masks, VOC layout, seeded")
def shapes_segmentation(cfg: DataSection) -> DatasetSplits:
    root = bundled.scenes_root(cfg.num_samples, cfg.seed, val_fraction=cfg.val_fraction)
    return _voc_splits(str(root), cfg, embed_bytes=True, mean=tuple(cfg.mean or (0.2,) * 3),
                       std=tuple(cfg.std or (0.3,) * 3))


# ----------------------------------------------------------------------------------------------
# Semantic segmentation from Parquet: encoded image bytes (data.image_column) and a PNG class mask
# (data.mask_column) per row, an optional `path` id; train/ + val/ subfolders or a seeded split.
# Class names: data.classes, else <root>/classes.txt.
# ----------------------------------------------------------------------------------------------


def _parquet_pairs(batch: dict[str, np.ndarray], *, image_column: str, mask_column: str, source: str):
    n = len(batch[image_column])
    paths = batch["path"] if "path" in batch else np.asarray([f"{source}#{i}" for i in range(n)], dtype=object)
    return {"path": paths, "mask_path": np.asarray([f"{p} ({mask_column})" for p in paths], dtype=object),
            "bytes": batch[image_column], "mask_bytes": batch[mask_column]}


def _parquet_pair_split(path: str, cfg: DataSection) -> tuple[ray.data.Dataset, int]:
    files = [f for f in list_files(path) if f.endswith(".parquet")]
    if not files:
        raise UserError(f"no .parquet files under {path}")
    ds, rows = read_parquet_rows(files, [cfg.image_column, cfg.mask_column], num_cpus=cfg.decode_cpus,
                                 optional=("path",), hint="; set data.image_column / data.mask_column")
    return ds.map_batches(_parquet_pairs, fn_kwargs=dict(image_column=cfg.image_column, mask_column=cfg.mask_column,
                                                         source=path), batch_format="numpy",
                          num_cpus=cfg.decode_cpus), rows


@register_dataset("parquet_segmentation", needs_root=True, task="segmentation",
                  description="segmentation from Parquet: image bytes (data.image_column) + PNG class mask (data.mask_column); train/ and val/ subfolders or a split; data.classes or classes.txt")
def parquet_segmentation(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    classes = cfg.classes or _classes_file(root)
    if not classes:
        raise UserError(f"parquet_segmentation needs class names: data.classes=[background,...] or {root}/classes.txt")
    train, n_train, val, n_val = _subfolders_or_split(root, cfg, lambda folder: _parquet_pair_split(folder, cfg))
    return DatasetSplits(classes, train, val, n_train, n_val, tuple(cfg.mean or IMAGENET_MEAN),
                         tuple(cfg.std or IMAGENET_STD))


# ----------------------------------------------------------------------------------------------
# Object detection, COCO format: <root>/annotations/instances_<split>*.json (boxes [x, y, w, h] in
# pixels, categories by id) and the images, in <root>/<split...>/ as COCO ships them (train2017/),
# or <root>/images/, <root>/JPEGImages/ or <root> itself. Classes: "background", then the
# categories in id order (index 1..K). Crowd regions and boxes without area are skipped; training
# drops images without objects (as torchvision's reference does), validation keeps them.
# ----------------------------------------------------------------------------------------------


def _coco_file(root: str, split: str) -> str:
    found = sorted(f for f in list_files(f"{root}/annotations", (".json",))
                   if f.rsplit("/", 1)[-1].startswith(f"instances_{split}"))
    if not found:
        raise UserError(f"{root} is not a COCO-style detection tree: no annotations/instances_{split}*.json")
    if len(found) > 1:
        raise UserError(f"{root}/annotations has {len(found)} instances_{split}*.json files "
                        f"({', '.join(f.rsplit('/', 1)[-1] for f in found)}); keep one per split")
    return found[0]


def coco_image_dir(root: str, annotation_file: str) -> str:
    """Where the images of `annotations/instances_<name>.json` live."""
    name = annotation_file.rsplit("/", 1)[-1][len("instances_"):-len(".json")]
    for d in (f"{root}/{name}", f"{root}/images/{name}", f"{root}/images", f"{root}/JPEGImages"):
        if is_dir(d):
            return d
    return root


def coco_items(root: str, split: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(class names, background first; one item per image: path, boxes (4n floats, xyxy), labels)."""
    root = root.rstrip("/")
    ann_file = _coco_file(root, split)
    return read_coco(ann_file, coco_image_dir(root, ann_file))


def read_coco(ann_file: str, image_dir: str) -> tuple[list[str], list[dict[str, Any]]]:
    """A COCO instances JSON -> (["background", categories in id order], one item per image:
    `path` (image_dir/file_name), `boxes` (4n floats, x1 y1 x2 y2), `labels` (n indices 1..K))."""
    import json

    text = read_text(ann_file)
    if text is None:
        raise UserError(f"COCO annotations not found: {ann_file}")
    try:
        coco = json.loads(text)
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        images, annotations = coco["images"], coco.get("annotations", [])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ann_file} is not COCO instances JSON ({type(e).__name__}: {e})") from None
    index = {c["id"]: i for i, c in enumerate(cats, start=1)}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in annotations:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        if w < 1 or h < 1:
            continue
        if a["category_id"] not in index:
            raise UserError(f"{ann_file}: annotation {a.get('id')} has category_id {a['category_id']}, "
                            f"which is not among its categories")
        by_image[a["image_id"]].append({"box": [x, y, x + w, y + h], "label": index[a["category_id"]]})
    items = []
    for im in sorted(images, key=lambda im: im["id"]):
        objs = by_image.get(im["id"], [])
        items.append({"path": f"{image_dir.rstrip('/')}/{im['file_name']}", "boxes": [v for o in objs for v in o["box"]],
                      "labels": [o["label"] for o in objs]})
    return ["background"] + [c["name"] for c in cats], items


def _box_rows(items: list[dict[str, Any]], *, embed_bytes: bool) -> ray.data.Dataset:
    rows = []
    for item in items:
        row = {"path": item["path"], "boxes": [float(v) for v in item["boxes"]], "labels": [int(v) for v in item["labels"]]}
        if embed_bytes:
            row["bytes"] = read_bytes(item["path"])
        rows.append(row)
    return ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows)))


def _coco_splits(root: str, cfg: DataSection, *, embed_bytes: bool, mean, std) -> DatasetSplits:
    classes, train = coco_items(root, "train")
    val_classes, val = coco_items(root, "val")
    if val_classes != classes:
        raise UserError(f"{root}: the train and val annotations have different categories "
                        f"({', '.join(classes[1:])} / {', '.join(val_classes[1:])})")
    train = [t for t in train if t["labels"]]
    if not train or not val:
        raise UserError(f"no annotated images under {root} (train: {len(train)}, val: {len(val)})")
    rng = random.Random(cfg.seed)
    rng.shuffle(train)
    return DatasetSplits(cfg.classes or classes, _box_rows(train, embed_bytes=embed_bytes),
                         _box_rows(val, embed_bytes=embed_bytes), len(train), len(val), mean, std)


@register_dataset("coco", needs_root=True, task="detection",
                  description="COCO-format detection: <root>/annotations/instances_{train,val}*.json + images (<root>/train2017/ ..., images/ or JPEGImages/)")
def coco(cfg: DataSection) -> DatasetSplits:
    return _coco_splits(cfg.root, cfg, embed_bytes=False, mean=tuple(cfg.mean or IMAGENET_MEAN),
                        std=tuple(cfg.std or IMAGENET_STD))


@register_dataset("shapes_detection", task="detection",
                  description="generated scenes of 1-3 shapes (64 px) with exact boxes, COCO format, seeded")
def shapes_detection(cfg: DataSection) -> DatasetSplits:
    root = bundled.scenes_root(cfg.num_samples, cfg.seed, val_fraction=cfg.val_fraction)
    return _coco_splits(str(root), cfg, embed_bytes=True, mean=tuple(cfg.mean or (0.2,) * 3),
                        std=tuple(cfg.std or (0.3,) * 3))


# ----------------------------------------------------------------------------------------------
# Object detection from Parquet: encoded image bytes (data.image_column), boxes (data.boxes_column:
# a list of [x1, y1, x2, y2] in pixels, or the same flattened) and labels (data.labels_column: class
# indices 1..K, or class names) per row, an optional `path`; train/ + val/ subfolders or a split.
# Class names: data.classes or <root>/classes.txt, background first.
# ----------------------------------------------------------------------------------------------


def _flat_boxes(value) -> list[float]:
    if value is None:
        return []
    out = []
    for v in value:
        if isinstance(v, (list, tuple, np.ndarray)):
            out.extend(float(x) for x in v)
        else:
            out.append(float(v))
    return out


def _parquet_boxes(batch: dict[str, np.ndarray], *, image_column: str, boxes_column: str, labels_column: str,
                   classes: list[str], source: str) -> dict[str, np.ndarray]:
    n = len(batch[image_column])
    paths = batch["path"] if "path" in batch else np.asarray([f"{source}#{i}" for i in range(n)], dtype=object)
    index = {c: i for i, c in enumerate(classes)}
    boxes, labels = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i in range(n):
        b = _flat_boxes(batch[boxes_column][i])
        raw = [] if batch[labels_column][i] is None else list(batch[labels_column][i])
        try:
            lbl = [index[v] if isinstance(v, str) else int(v) for v in raw]
        except KeyError as e:
            raise UserError(f"{paths[i]}: label {e.args[0]!r} is not a class ({', '.join(classes[1:])})") from None
        if len(b) != 4 * len(lbl):
            raise UserError(f"{paths[i]}: {boxes_column} holds {len(b)} numbers for {len(lbl)} labels "
                            f"(expected 4 per object: x1, y1, x2, y2)")
        boxes[i], labels[i] = np.asarray(b, dtype=np.float32), np.asarray(lbl, dtype=np.int64)
    return {"path": paths, "bytes": batch[image_column], "boxes": boxes, "labels": labels}


def _parquet_box_split(path: str, cfg: DataSection, classes: list[str]) -> tuple[ray.data.Dataset, int]:
    files = [f for f in list_files(path) if f.endswith(".parquet")]
    if not files:
        raise UserError(f"no .parquet files under {path}")
    ds, rows = read_parquet_rows(files, [cfg.image_column, cfg.boxes_column, cfg.labels_column],
                                 num_cpus=cfg.decode_cpus, optional=("path",),
                                 hint="; set data.image_column / data.boxes_column / data.labels_column")
    return ds.map_batches(_parquet_boxes, fn_kwargs=dict(image_column=cfg.image_column, boxes_column=cfg.boxes_column,
                                                         labels_column=cfg.labels_column, classes=classes, source=path),
                          batch_format="numpy", num_cpus=cfg.decode_cpus), rows


@register_dataset("parquet_detection", needs_root=True, task="detection",
                  description="detection from Parquet: image bytes (data.image_column), boxes [[x1,y1,x2,y2],...] (data.boxes_column), labels (data.labels_column); data.classes or classes.txt")
def parquet_detection(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    classes = cfg.classes or _classes_file(root)
    if not classes:
        raise UserError(f"parquet_detection needs class names: data.classes=[background,...] or {root}/classes.txt")
    train, n_train, val, n_val = _subfolders_or_split(root, cfg, lambda folder: _parquet_box_split(folder, cfg, classes))
    return DatasetSplits(classes, train, val, n_train, n_val, tuple(cfg.mean or IMAGENET_MEAN),
                         tuple(cfg.std or IMAGENET_STD))
