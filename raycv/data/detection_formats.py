"""Object detection labels as other tools write them: YOLO (Ultralytics' data.yaml + labels/*.txt)
and Pascal VOC XML. Both read into the items COCO's reader gives (path, boxes as 4n pixel floats
x1 y1 x2 y2, labels 1..K), which `raycv evaluate` also takes as the true boxes."""

from __future__ import annotations

import random
from typing import Any

from raycv.config import DataSection
from raycv.data.detection_sources import _box_rows
from raycv.data.io import IMAGE_EXTENSIONS, is_dir, list_files, read_text
from raycv.data.presets import IMAGENET_MEAN, IMAGENET_STD
from raycv.data.registry import DatasetSplits, register_dataset
from raycv.errors import UserError


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
