"""The presets' deterministic geometry in PIL and numpy alone, for Ray Data decode tasks.

A decode task that unpickles a torchvision transform imports torch and torchvision first: about
3 s of CPU in every worker process that decodes, which on a small machine runs beside the
predictor's or the training workers' own imports (measured: the first prediction of a warm
`raycv infer` came 6 s after Ray was up). These callables produce what the torchvision v2
transforms named on each produce on a PIL image (torchvision resizes a PIL image with PIL itself);
tests/test_data.py checks them against torchvision pixel for pixel. The presets
(raycv/data/presets.py) hand them to decode tasks as `preset.pixels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def _chw(img: Image.Image) -> np.ndarray:
    """PIL (RGB, or one channel) -> (C, H, W) uint8, as `v2.PILToTensor`."""
    a = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(a.transpose(2, 0, 1) if a.ndim == 3 else a[None])


def shorter_side_to(img: Image.Image, size: int) -> Image.Image:
    """`v2.Resize(size, antialias=True)` on a PIL image: the shorter side becomes `size` (the longer
    one int(size * long / short)), bilinear; an image already that size is returned as it is."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample=Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """`v2.CenterCrop(size)` on a PIL image: padded with black first where the image is smaller."""
    w, h = img.size
    if size > h or size > w:
        left, top = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
        padded = Image.new(img.mode, (w + left + ((size - w + 1) // 2 if size > w else 0),
                                      h + top + ((size - h + 1) // 2 if size > h else 0)))
        padded.paste(img, (left, top))
        img, (w, h) = padded, padded.size
        if (w, h) == (size, size):
            return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Classification: the shorter side to `resize_size`, the centre `crop_size` square, CHW uint8."""
    resize_size: int
    crop_size: int

    def __call__(self, img: Image.Image) -> np.ndarray:
        return _chw(center_crop(shorter_side_to(img, self.resize_size), self.crop_size))


@dataclass(frozen=True)
class Square:
    """Segmentation: `v2.Resize((size, size))`, bilinear for images (CHW uint8), nearest for class
    masks (HW uint8: indices never blend)."""
    size: int
    nearest: bool = False

    def __call__(self, img: Image.Image) -> np.ndarray:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample=Image.NEAREST if self.nearest else Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).copy() if self.nearest else _chw(img)


def letterbox_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) of an image letterboxed into a `side` square, before padding."""
    s = side / max(height, width)
    return max(1, min(side, round(height * s))), max(1, min(side, round(width * s)))


@dataclass(frozen=True)
class Letterbox:
    """Detection: the longer side to `side` (bilinear), black padding right and below, CHW uint8."""
    side: int

    def __call__(self, img: Image.Image) -> np.ndarray:
        h, w = letterbox_size(img.height, img.width, self.side)
        x = _chw(img.resize((w, h), resample=Image.BILINEAR) if (h, w) != (img.height, img.width) else img)
        if (h, w) == (self.side, self.side):
            return x
        out = np.zeros((x.shape[0], self.side, self.side), dtype=np.uint8)
        out[:, :h, :w] = x
        return out
