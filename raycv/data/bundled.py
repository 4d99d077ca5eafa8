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


def _draw_shape(rng: random.Random, size: int, kind: str) -> tuple[Image.Image, list[int]]:
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    fg = tuple(rng.randint(140, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
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
