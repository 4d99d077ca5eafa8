"""Semantic segmentation sources: VOC-style trees, the generated scenes, Parquet with PNG masks."""

from __future__ import annotations

import random
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
# Semantic segmentation, VOC-style: JPEGImages/<id>.<ext>, SegmentationClass/<id>.png (pixel value =
# class index, 255 = void), ImageSets/Segmentation/{train,val}.txt; class names in classes.txt (one
# per line, background first), else PASCAL VOC 2012's 21.
# ----------------------------------------------------------------------------------------------

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")




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
    classes = classes_file(root) or list(VOC_CLASSES)
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
    return _voc_splits(str(root), cfg, embed_bytes=True, mean=tuple(cfg.mean or bundled.SCENES_MEAN),
                       std=tuple(cfg.std or bundled.SCENES_STD))


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
    classes = cfg.classes or classes_file(root)
    if not classes:
        raise UserError(f"parquet_segmentation needs class names: data.classes=[background,...] or {root}/classes.txt")
    train, n_train, val, n_val = subfolders_or_split(root, cfg, lambda folder: _parquet_pair_split(folder, cfg))
    return DatasetSplits(classes, train, val, n_train, n_val, tuple(cfg.mean or IMAGENET_MEAN),
                         tuple(cfg.std or IMAGENET_STD))
