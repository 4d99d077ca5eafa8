"""Decoding image bytes into RGB pixels, in Ray Data tasks.

Every input mode becomes 8-bit RGB: grayscale, RGBA / LA (alpha composited on black is what
`convert` does; we flatten on white like a viewer would), palette, 16-bit and CMYK; the EXIF
orientation is applied. A file that cannot be decoded either raises (training: bad data must stop
the run, naming the file) or becomes an error row (inference: every input is accounted for).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from raycv.errors import UserError

# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we raise at the limit itself so
# a decompression bomb is an error row, never an out-of-memory kill.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def open_rgb(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, orientation applied. Raises ValueError naming what is wrong."""
    if not data:
        raise ValueError("empty file")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large: {e}") from None
    except Exception as e:
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    geometry: Callable[[Image.Image], Any],
    shape: tuple[int, int, int],
    errors: str = "raise",
    keep: tuple[str, ...] = ("label",),
    with_path: bool = True,
    with_size: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn: rows with `bytes` (or `image` HWC uint8, or a `path` or `uri` to read) ->
    `image` (N, C, H, W) uint8 after the preset's geometry (each of `shape`), plus the `keep` columns
    (and `path` unless `with_path=False`: dropping columns here, not in a `select_columns` stage,
    avoids a separate whole-CPU task that cannot run beside training workers on a small machine).

    errors="raise" stops on the first bad file; errors="row" returns an `error` column (None on
    success) and a zero image for failed rows. `with_size` adds the original `height` and `width`
    (segmentation predictions are resized back to them).
    """
    from raycv.data.io import read_bytes

    paths = batch["path"]
    images: list[np.ndarray | None] = []
    messages: list[str | None] = []
    sizes: list[tuple[int, int]] = []
    for i, path in enumerate(paths):
        try:
            array = batch["image"][i] if "image" in batch else None  # None: this row is read from its path
            if array is not None:
                img = Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")
            else:
                data = batch["bytes"][i] if "bytes" in batch else None
                img = open_rgb(data if data is not None else read_bytes(str(batch["uri"][i] if "uri" in batch else path)))
            sizes.append((img.height, img.width))
            images.append(np.asarray(geometry(img)))
            messages.append(None)
        except Exception as e:
            if errors == "raise":
                raise UserError(f"cannot decode {path}: {e}") from None
            sizes.append((0, 0))
            images.append(None)
            messages.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    stacked = np.stack([a if a is not None else np.zeros(shape, np.uint8) for a in images])
    out = {"path": np.asarray(paths, dtype=object), "image": stacked} if with_path else {"image": stacked}
    for col in keep:
        if col in batch:
            out[col] = batch[col]
    if errors != "raise":
        out["error"] = np.asarray(messages, dtype=object)
    if with_size:
        out["height"] = np.asarray([h for h, _ in sizes], dtype=np.int32)
        out["width"] = np.asarray([w for _, w in sizes], dtype=np.int32)
    return out


def open_mask(data: bytes) -> Image.Image:
    """A class mask (a palette or grayscale PNG whose pixel values are class indices, as VOC's
    SegmentationClass) -> a PIL image of mode L with those values."""
    try:
        m = Image.open(io.BytesIO(data))
        m.load()
    except Exception as e:
        raise ValueError(f"not a decodable mask ({type(e).__name__}: {e})") from None
    if m.mode not in ("P", "L"):
        raise ValueError(f"a class mask must be a palette (P) or grayscale (L) PNG of class indices, not mode {m.mode}")
    return Image.frombytes("L", m.size, m.tobytes()) if m.mode == "P" else m  # P: keep the indices, drop the palette


def check_mask_classes(mask: np.ndarray, num_classes: int, where: str) -> None:
    """Every pixel is a class index below num_classes, or 255 (void): else one line naming the file."""
    bad = mask[(mask >= num_classes) & (mask != 255)]
    if bad.size:
        raise UserError(f"mask {where} has class index {int(bad.max())} but there are {num_classes} classes "
                        f"(0-{num_classes - 1}, 255 = void); check data.classes / classes.txt")


def decode_pairs(batch: dict[str, np.ndarray], *, preset, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn for segmentation training: rows with `path`/`bytes` (the image) and
    `mask_path`/`mask_bytes` -> `image` (N, C, S, S) uint8 and `mask` (N, S, S) uint8 at the preset's
    size. A bad image or mask, one whose size differs from its image, or (given `num_classes`) one
    with a class index out of range stops the run naming it."""
    from raycv.data.io import read_bytes

    images, masks = [], []
    for i, path in enumerate(batch["path"]):
        mask_path = batch["mask_path"][i]
        try:
            data = batch["bytes"][i] if "bytes" in batch else read_bytes(str(path))
            img = open_rgb(data)
        except Exception as e:
            raise UserError(f"cannot decode {path}: {e}") from None
        try:
            mdata = batch["mask_bytes"][i] if "mask_bytes" in batch else read_bytes(str(mask_path))
            mask = open_mask(mdata)
        except Exception as e:
            raise UserError(f"cannot decode mask {mask_path}: {e}") from None
        if mask.size != img.size:
            raise UserError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {path} is "
                            f"{img.size[0]}x{img.size[1]}")
        if num_classes is not None:
            check_mask_classes(np.asarray(mask), num_classes, str(mask_path))
        images.append(np.asarray(preset.geometry(img)))
        masks.append(np.asarray(preset.mask_geometry(mask)))
    return {"image": np.stack(images), "mask": np.stack(masks)}


def decode_boxes(batch: dict[str, np.ndarray], *, preset, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn for detection training: rows with `path`/`bytes`, `boxes` (4n
    floats: x1, y1, x2, y2 per object, original pixels) and `labels` (n class indices, 1.., 0 is
    the background) -> `image` (N, 3, S, S) uint8 letterboxed at the preset's size, `boxes` (4n
    float32, in those pixels) and `labels` (n int64). A bad image, or a label outside the classes,
    stops the run naming the file."""
    from raycv.data.io import read_bytes

    images, boxes, labels = [], [], []
    for i, path in enumerate(batch["path"]):
        try:
            img = open_rgb(batch["bytes"][i] if "bytes" in batch else read_bytes(str(path)))
        except Exception as e:
            raise UserError(f"cannot decode {path}: {e}") from None
        b = np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4)
        lbl = np.asarray(batch["labels"][i], dtype=np.int64).reshape(-1)
        if len(b) != len(lbl):
            raise UserError(f"{path} has {len(b)} boxes but {len(lbl)} labels")
        if num_classes is not None and len(lbl) and (lbl.min() < 1 or lbl.max() >= num_classes):
            raise UserError(f"{path} has an object of class index {int(lbl.max() if lbl.max() >= num_classes else lbl.min())} "
                            f"but the classes are 1-{num_classes - 1} (0 is the background)")
        sx, sy = preset.box_scale(img.height, img.width)
        images.append(np.asarray(preset.geometry(img)))
        boxes.append((b * np.asarray([sx, sy, sx, sy], dtype=np.float32)).reshape(-1))
        labels.append(lbl)
    out = {"image": np.stack(images), "boxes": np.empty(len(boxes), dtype=object),
           "labels": np.empty(len(labels), dtype=object)}
    out["boxes"][:], out["labels"][:] = boxes, labels  # ragged: one array per image
    return out
