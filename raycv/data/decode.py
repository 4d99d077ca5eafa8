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
) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn: rows with `bytes` (or `image` HWC uint8, or only `path`) ->
    `image` (N, C, H, W) uint8 after the preset's geometry (each of `shape`), plus the `keep` columns
    (and `path` unless `with_path=False`: dropping columns here, not in a `select_columns` stage,
    avoids a separate whole-CPU task that cannot run beside training workers on a small machine).

    errors="raise" stops on the first bad file; errors="row" returns an `error` column (None on
    success) and a zero image for failed rows.
    """
    from raycv.data.io import read_bytes

    paths = batch["path"]
    images: list[np.ndarray | None] = []
    messages: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            if "image" in batch:
                img = Image.fromarray(np.asarray(batch["image"][i], dtype=np.uint8)).convert("RGB")
            else:
                data = batch["bytes"][i] if "bytes" in batch else None
                img = open_rgb(data if data is not None else read_bytes(str(path)))
            images.append(np.asarray(geometry(img)))
            messages.append(None)
        except Exception as e:
            if errors == "raise":
                raise UserError(f"cannot decode {path}: {e}") from None
            images.append(None)
            messages.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    stacked = np.stack([a if a is not None else np.zeros(shape, np.uint8) for a in images])
    out = {"path": np.asarray(paths, dtype=object), "image": stacked} if with_path else {"image": stacked}
    for col in keep:
        if col in batch:
            out[col] = batch[col]
    if errors != "raise":
        out["error"] = np.asarray(messages, dtype=object)
    return out
