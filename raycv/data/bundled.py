"""Datasets raycv makes itself, offline: scikit-learn's handwritten digits and generated shapes.

Both are written once as real PNG files into a cache folder (`$RAYCV_CACHE`, default
~/.cache/raycv), so the pipeline reads and decodes real image files like any user dataset.
Writing goes to a temporary folder that is renamed into place, so a half-written cache is never
used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle")


def cache_dir() -> Path:
    return Path(os.environ.get("RAYCV_CACHE", "~/.cache/raycv")).expanduser()


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # another process published first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def digits_root() -> Path:
    """sklearn's 1,797 8x8 digit scans as `<root>/<digit>/<index>.png` (grayscale, 0..255)."""
    root = cache_dir() / "digits-v1"
    if root.is_dir():
        return root
    from sklearn.datasets import load_digits

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        (tmp / str(label)).mkdir(exist_ok=True)
        pixels = np.clip(img * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)  # (8, 8), 0..16 -> 0..255
        Image.fromarray(pixels, mode="L").save(tmp / str(label) / f"{i:04d}.png")
    _publish(tmp, root)
    return root


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _draw_shape(rng: random.Random, size: int, kind: str) -> tuple[Image.Image, list[int]]:
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    fg = tuple(rng.randint(140, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    _draw(draw, kind, cx, cy, r, fg)
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]  # x1, y1, x2, y2
    return img, box


def shapes_root(num_samples: int, seed: int, size: int = 64) -> Path:
    """`num_samples` generated images of one shape each, `<root>/<shape>/<index>.png`, plus
    `boxes.json` (index -> [x1, y1, x2, y2]). The same seed and count give the same files."""
    root = cache_dir() / f"shapes-v1-n{num_samples}-s{seed}-px{size}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root.parent))
    rng = random.Random(seed)
    boxes = {}
    for i in range(num_samples):
        kind = SHAPE_CLASSES[i % len(SHAPE_CLASSES)]
        img, box = _draw_shape(rng, size, kind)
        (tmp / kind).mkdir(exist_ok=True)
        img.save(tmp / kind / f"{i:06d}.png")
        boxes[f"{kind}/{i:06d}.png"] = box
    (tmp / "boxes.json").write_text(json.dumps(boxes))
    _publish(tmp, root)
    return root


# ----------------------------------------------------------------------------------------------
# Scenes: several shapes per image, with exact per-pixel masks and boxes, written in the two
# formats users bring: VOC-style segmentation (images, palette PNG class masks, ImageSets lists)
# and COCO instances JSON (detection).
# ----------------------------------------------------------------------------------------------

SCENE_CLASSES = ("background",) + SHAPE_CLASSES


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (class i -> an RGB triple), flattened for PIL's putpalette."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _draw_scene(rng: random.Random, size: int, max_shapes: int) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """An RGB image with 1..max_shapes non-overlapping shapes, its class mask (0 = background) and
    one record per shape: class index, box [x1, y1, x2, y2] (pixel edges, exclusive end) and area."""
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(rng.randint(1, max_shapes)):
        for _attempt in range(20):  # rejection sampling: shapes never touch, so every mask is exact
            r = rng.uniform(0.1, 0.22) * size
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r * 1.42))  # a square's corner reaches r * sqrt(2)
        cls = rng.randint(1, len(SHAPE_CLASSES))
        fg = tuple(rng.randint(140, 255) for _ in range(3))
        kind = SCENE_CLASSES[cls]
        one = Image.new("L", (size, size), 0)
        odraw = ImageDraw.Draw(one)
        for d, fill in ((draw, fg), (mdraw, cls), (odraw, 1)):  # the image, the class mask, this object alone
            _draw(d, kind, cx, cy, r, fill)
        ys, xs = np.nonzero(np.asarray(one))
        objects.append({"class": cls, "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                        "area": int(len(xs))})
    return img, np.asarray(mask), objects


# Rough per-channel statistics of the generated scenes (dark backgrounds, brighter shapes), used by
# the segmentation and detection sources that read them when the config gives no mean/std.
SCENES_MEAN = (0.2, 0.2, 0.2)
SCENES_STD = (0.3, 0.3, 0.3)


def scenes_root(num_samples: int, seed: int, size: int = 64, max_shapes: int = 3, val_fraction: float = 0.2) -> Path:
    """`num_samples` generated scenes in both layouts, under one root:

        JPEGImages/<id>.png                 the images (PNG: exact pixels)
        SegmentationClass/<id>.png          palette PNG, pixel value = class index (0 = background)
        ImageSets/Segmentation/{train,val}.txt
        classes.txt                         background, circle, square, triangle
        annotations/instances_{train,val}.json   COCO instances: boxes [x, y, w, h], areas, categories 1..3

    The same arguments give the same files."""
    root = cache_dir() / f"scenes-v1-n{num_samples}-s{seed}-px{size}-k{max_shapes}-val{val_fraction:g}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".scenes-", dir=root.parent))
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "annotations"):
        (tmp / sub).mkdir(parents=True)
    rng = random.Random(seed)
    palette = voc_palette()
    n_val = max(1, round(num_samples * val_fraction))
    splits: dict[str, list[str]] = {"train": [], "val": []}
    coco = {s: {"images": [], "annotations": [], "categories": [
        {"id": i, "name": c, "supercategory": "shape"} for i, c in enumerate(SHAPE_CLASSES, start=1)]}
        for s in splits}
    for i in range(num_samples):
        stem = f"{i:06d}"
        split = "val" if i < n_val else "train"
        img, mask, objects = _draw_scene(rng, size, max_shapes)
        img.save(tmp / "JPEGImages" / f"{stem}.png")
        m = Image.fromarray(mask, mode="L")
        m.putpalette(palette)  # L -> P, keeping the values: the indices are the classes
        m.save(tmp / "SegmentationClass" / f"{stem}.png")
        splits[split].append(stem)
        c = coco[split]
        c["images"].append({"id": i + 1, "file_name": f"{stem}.png", "width": size, "height": size})
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            c["annotations"].append({"id": len(c["annotations"]) + 1, "image_id": i + 1, "category_id": o["class"],
                                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o["area"], "iscrowd": 0})
    for split, stems in splits.items():
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco[split]))
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in SCENE_CLASSES))
    _publish(tmp, root)
    return root
