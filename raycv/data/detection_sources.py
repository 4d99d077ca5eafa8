"""Object detection sources: COCO-format trees, the generated scenes' COCO files, Parquet with boxes."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np
import ray.data

from raycv.config import DataSection
from raycv.data import bundled
from raycv.data.io import is_dir, list_files, read_bytes, read_text
from raycv.data.presets import IMAGENET_MEAN, IMAGENET_STD
from raycv.data.registry import DatasetSplits, register_dataset
from raycv.data.sources import classes_file, num_blocks, read_parquet_rows, subfolders_or_split
from raycv.errors import UserError

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
    return _coco_splits(str(root), cfg, embed_bytes=True, mean=tuple(cfg.mean or bundled.SCENES_MEAN),
                        std=tuple(cfg.std or bundled.SCENES_STD))


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
    classes = cfg.classes or classes_file(root)
    if not classes:
        raise UserError(f"parquet_detection needs class names: data.classes=[background,...] or {root}/classes.txt")
    train, n_train, val, n_val = subfolders_or_split(root, cfg, lambda folder: _parquet_box_split(folder, cfg, classes))
    return DatasetSplits(classes, train, val, n_train, n_val, tuple(cfg.mean or IMAGENET_MEAN),
                         tuple(cfg.std or IMAGENET_STD))
