"""Object detection sources: COCO-format trees, the generated scenes' COCO files, Parquet with boxes."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np
import ray.data

from raycv.config import DataSection
from raycv.data import bundled
from raycv.data.io import IMAGE_EXTENSIONS, is_dir, list_files, read_bytes, read_text
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


# ----------------------------------------------------------------------------------------------
# Object detection, YOLO format (as Ultralytics lays it out): <root>/data.yaml with `names` (a list,
# or {index: name}) and `train` / `val` (a folder of images relative to the root or to `path`, a
# .txt list of images, or a list of either); each image's boxes in the file that replaces the last
# /images/ of its path with /labels/ and its extension with .txt: one `cls cx cy w h` line per
# object, normalised to the image's width and height, cls from 0. No label file: no objects.
# ----------------------------------------------------------------------------------------------


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as raycv decodes the image: the header only, EXIF rotation applied."""
    from PIL import Image

    from raycv.data.io import resolve

    fs, p = resolve(path)
    try:
        with fs.open_input_file(p) as f, Image.open(f) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return (h, w) if rotated else (w, h)


def _yolo_names(raw, data_yaml: str) -> list[str]:
    if isinstance(raw, dict):
        try:
            index = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            index = {}
        if sorted(index) != list(range(len(index))):
            raise UserError(f"{data_yaml}: `names` must map 0..K-1 to class names")
        return [index[i] for i in range(len(index))]
    if isinstance(raw, list) and raw:
        return [str(v) for v in raw]
    raise UserError(f"{data_yaml} has no class `names` (a list, or a mapping 0: name, 1: name, ...)")


def yolo_label_path(image: str) -> str:
    head, sep, tail = image.rpartition("/images/")
    stem = (tail if sep else image).rsplit(".", 1)[0]
    return f"{head}/labels/{stem}.txt" if sep else f"{stem}.txt"


def read_yolo_labels(image: str, num_classes: int) -> dict[str, Any]:
    """One image's item (path, boxes as 4n pixel floats x1 y1 x2 y2, labels 1..K)."""
    text = read_text(yolo_label_path(image))
    boxes: list[float] = []
    labels: list[int] = []
    if text:
        width, height = image_size(image)
        for n, line in enumerate(text.splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
                if len(parts) != 5:
                    raise ValueError
            except ValueError:
                raise UserError(f"{yolo_label_path(image)} line {n}: expected `cls cx cy w h`, got {line.strip()!r} "
                                "(segment polygons are not read)") from None
            if not 0 <= cls < num_classes:
                raise UserError(f"{yolo_label_path(image)} line {n}: class {cls} is outside data.yaml's "
                                f"0..{num_classes - 1}")
            if w <= 0 or h <= 0:
                continue
            boxes += [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            labels.append(cls + 1)  # 0 is the background
    return {"path": image, "boxes": boxes, "labels": labels}


def yolo_items(root: str) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """(["background", names...], {"train": items, "val": items}) of a YOLO tree."""
    import yaml

    root = root.rstrip("/")
    data_yaml = f"{root}/data.yaml"
    text = read_text(data_yaml)
    if text is None:
        raise UserError(f"{root} is not a YOLO dataset: no data.yaml")
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{data_yaml} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{data_yaml} must be a mapping (names, train, val)")
    names = _yolo_names(spec.get("names"), data_yaml)
    base = root
    if isinstance(spec.get("path"), str) and spec["path"]:  # Ultralytics: the root the splits are relative to
        p = spec["path"]
        base = p.rstrip("/") if p.startswith("/") or "://" in p else f"{root}/{p}".rstrip("/")

    def images_of(entry) -> list[str]:
        out = []
        for item in entry if isinstance(entry, list) else [entry]:
            if not isinstance(item, str):
                raise UserError(f"{data_yaml}: a split is a folder, a .txt list of images, or a list of them")
            where = item if item.startswith("/") or "://" in item else f"{base}/{item.removeprefix('./')}"
            if where.endswith(".txt"):
                listed = read_text(where)
                if listed is None:
                    raise UserError(f"{data_yaml}: {where} does not exist")
                folder = where.rsplit("/", 1)[0]
                out += [ln.strip() if ln.strip().startswith("/") else f"{folder}/{ln.strip().removeprefix('./')}"
                        for ln in listed.splitlines() if ln.strip()]
            elif is_dir(where):
                out += list_files(where, IMAGE_EXTENSIONS)
            else:
                raise UserError(f"{data_yaml}: {where} does not exist")
        return out

    splits = {}
    for split in ("train", "val"):
        if not spec.get(split):
            raise UserError(f"{data_yaml} has no `{split}` split")
        splits[split] = [read_yolo_labels(image, len(names)) for image in images_of(spec[split])]
    return ["background", *names], splits


@register_dataset("yolo", needs_root=True, task="detection",
                  description="YOLO-format detection: <root>/data.yaml (names, train, val), images/ + labels/*.txt (cls cx cy w h, normalised)")
def yolo(cfg: DataSection) -> DatasetSplits:
    classes, splits = yolo_items(cfg.root)
    return _detection_splits(cfg.root, classes, splits["train"], splits["val"], cfg)


def _detection_splits(root: str, classes: list[str], train: list[dict[str, Any]], val: list[dict[str, Any]],
                      cfg: DataSection) -> DatasetSplits:
    """Training drops images without objects (as torchvision's reference does); validation keeps them."""
    train = [t for t in train if t["labels"]]
    if not train or not val:
        raise UserError(f"no annotated images under {root} (train: {len(train)}, val: {len(val)})")
    random.Random(cfg.seed).shuffle(train)
    return DatasetSplits(cfg.classes or classes, _box_rows(train, embed_bytes=False), _box_rows(val, embed_bytes=False),
                         len(train), len(val), tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD))


# ----------------------------------------------------------------------------------------------
# Object detection, Pascal VOC XML: <root>/Annotations/<id>.xml (size, and per object its name,
# `difficult` flag and bndbox xmin ymin xmax ymax, 1-based pixels), the images in <root>/JPEGImages/
# (the XML's filename), splits in ImageSets/Main/{train,val}.txt, else a seeded split. Classes:
# data.classes or <root>/classes.txt (background first), else VOC's 20 when every name is one of
# them, else the names found, sorted. Difficult objects are left out of training and scoring, as
# VOC's evaluation does.
# ----------------------------------------------------------------------------------------------


def _voc_objects(xml_file: str) -> tuple[str, list[tuple[str, list[float]]]]:
    """(image file name, [(class name, [x1, y1, x2, y2])]) of one VOC annotation."""
    import xml.etree.ElementTree as ET

    text = read_text(xml_file)
    try:
        tree = ET.fromstring(text)
        filename = (tree.findtext("filename") or "").strip()
        objects = []
        for obj in tree.iter("object"):
            if (obj.findtext("difficult") or "0").strip() == "1":
                continue
            bb = obj.find("bndbox")
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            objects.append(((obj.findtext("name") or "").strip(), [x1 - 1, y1 - 1, x2, y2]))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{xml_file} is not a VOC annotation ({type(e).__name__}: {e})") from None
    return filename, objects


def voc_detection_items(root: str, classes: list[str] | None, val_fraction: float = 0.2,
                        seed: int = 0) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """(["background", classes...], {"train": items, "val": items}) of a VOC detection tree."""
    from raycv.data.segmentation_sources import VOC_CLASSES
    from raycv.data.sources import classes_file

    root = root.rstrip("/")
    xmls = list_files(f"{root}/Annotations", (".xml",)) if is_dir(f"{root}/Annotations") else []
    if not xmls:
        raise UserError(f"{root} is not a VOC detection tree: no Annotations/*.xml")
    parsed = {}
    for f in xmls:
        filename, objects = _voc_objects(f)
        stem = f.rsplit("/", 1)[-1][:-len(".xml")]
        parsed[stem] = (f"{root}/JPEGImages/{filename or stem + '.jpg'}", objects)
    found = sorted({name for _, objs in parsed.values() for name, _ in objs})
    classes = classes or classes_file(root)
    if not classes:
        classes = list(VOC_CLASSES) if set(found) <= set(VOC_CLASSES[1:]) else ["background", *found]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(found) - set(classes[1:]))
    if unknown:
        raise UserError(f"{root}: objects named {', '.join(unknown)} are not among the classes ({', '.join(classes[1:])})")

    def item(stem: str) -> dict[str, Any]:
        if stem not in parsed:
            raise UserError(f"{root}/ImageSets/Main lists {stem!r}, which has no Annotations/{stem}.xml")
        path, objects = parsed[stem]
        return {"path": path, "boxes": [v for _, b in objects for v in b], "labels": [index[n] for n, _ in objects]}

    lists = {s: read_text(f"{root}/ImageSets/Main/{s}.txt") for s in ("train", "val")}
    if lists["train"] is not None and lists["val"] is not None:
        stems = {s: [ln.split()[0] for ln in text.splitlines() if ln.strip()] for s, text in lists.items()}
    else:
        order = sorted(parsed)
        random.Random(seed).shuffle(order)
        k = max(1, round(len(order) * val_fraction))
        stems = {"val": sorted(order[:k]), "train": sorted(order[k:])}
    return classes, {s: [item(stem) for stem in stems[s]] for s in ("train", "val")}


@register_dataset("voc_detection", needs_root=True, task="detection",
                  description="Pascal VOC XML detection: <root>/Annotations/*.xml + JPEGImages/, ImageSets/Main/{train,val}.txt or a seeded split")
def voc_detection(cfg: DataSection) -> DatasetSplits:
    classes, splits = voc_detection_items(cfg.root, cfg.classes, cfg.val_fraction, cfg.seed)
    return _detection_splits(cfg.root, classes, splits["train"], splits["val"], cfg.model_copy(update={"classes": None}))
