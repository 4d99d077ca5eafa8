"""WebDataset tar shards for classification, read by Ray Data's `read_webdataset`."""

from __future__ import annotations

import re

import numpy as np
import ray.data

from raycv.config import DataSection
from raycv.data.io import is_dir, list_files, resolve
from raycv.data.presets import IMAGENET_MEAN, IMAGENET_STD
from raycv.data.registry import DatasetSplits, register_dataset
from raycv.data.sources import HF_TRAIN, HF_VAL, _split_prefix, classes_file
from raycv.errors import UserError


# ----------------------------------------------------------------------------------------------
# WebDataset tar shards: each sample is the files of one key (`<key>.jpg` / `.png` / ... and
# `<key>.cls`, the class index as text), read by Ray Data's `read_webdataset`.
# ----------------------------------------------------------------------------------------------

WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's key / suffix split: up to the first dot
WDS_IMAGE = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")


def _tar_summary(shard: str) -> tuple[int, set[int]]:
    """(samples with an image, the class indices seen) of one shard: headers read, image data
    skipped (tarfile seeks past it), `.cls` members read."""
    import tarfile

    fs, p = resolve(shard)
    images, labels = set(), {}
    try:
        with fs.open_input_file(p) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                m = WDS_KEY.match(member.name)
                if not member.isreg() or not m:
                    continue
                key, suffix = m.group(1), m.group(2).lower()
                if suffix in WDS_IMAGE:
                    images.add(key)
                elif suffix == "cls":
                    text = tar.extractfile(member).read().decode().strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise UserError(f"{shard}: {member.name} holds {text!r}, not a class index") from None
    except tarfile.TarError as e:
        raise UserError(f"{shard} is not a tar file ({e})") from None
    unlabelled = sorted(images - set(labels))
    if unlabelled:
        raise UserError(f"{shard}: sample {unlabelled[0]!r} has an image but no .cls label "
                        f"({len(unlabelled)} such samples)")
    return len(images), {labels[k] for k in images}


def _wds_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["__key__"])
    images = np.empty(n, dtype=object)
    for i in range(n):
        images[i] = next((batch[s][i] for s in WDS_IMAGE if s in batch and batch[s][i] is not None), None)
    urls = batch["__url__"] if "__url__" in batch else [""] * n
    paths = np.asarray([f"{u}#{k}" for u, k in zip(urls, batch["__key__"])], dtype=object)
    labels = np.asarray([int(bytes(v).decode().strip()) for v in batch["cls"]], dtype=np.int64)
    return {"path": paths, "bytes": images, "label": labels}


def _webdataset_split(shards: list[str], cfg: DataSection) -> tuple[ray.data.Dataset, int, set[int]]:
    total, seen = 0, set()
    for shard in shards:
        n, labels = _tar_summary(shard)
        total, seen = total + n, seen | labels
    fs, _ = resolve(shards[0])
    ds = ray.data.read_webdataset([resolve(s)[1] for s in shards], filesystem=fs, decoder=None, include_paths=True,
                                  suffixes=[*WDS_IMAGE, "cls"], num_cpus=cfg.decode_cpus)
    return ds.map_batches(_wds_rows, batch_format="numpy", num_cpus=cfg.decode_cpus), total, seen


@register_dataset("webdataset", needs_root=True,
                  description="WebDataset tar shards: <key>.jpg/.png/... + <key>.cls (class index); train/ + val/ folders or train*/val* shards; data.classes or classes.txt")
def webdataset(cfg: DataSection) -> DatasetSplits:
    root = cfg.root.rstrip("/")
    if is_dir(f"{root}/train") and is_dir(f"{root}/val"):
        parts = {s: [f for f in list_files(f"{root}/{s}") if f.endswith(".tar")] for s in ("train", "val")}
    else:
        shards = [f for f in list_files(root) if f.endswith(".tar")]
        named = {s: [f for f in shards if _split_prefix(f) in names]
                 for s, names in (("train", HF_TRAIN), ("val", HF_VAL))}
        parts = named
    if not parts["train"] or not parts["val"]:
        raise UserError(f"{root}: WebDataset needs train and val shards (train/ and val/ folders of .tar files, "
                        f"or train-*.tar beside val-*.tar); found {len(parts['train'])} and {len(parts['val'])}")
    train, n_train, seen_train = _webdataset_split(parts["train"], cfg)
    val, n_val, seen_val = _webdataset_split(parts["val"], cfg)
    classes = cfg.classes or classes_file(root) or [str(i) for i in range(max(seen_train | seen_val) + 1)]
    out_of_range = sorted(c for c in seen_train | seen_val if not 0 <= c < len(classes))
    if out_of_range:
        raise UserError(f"{root}: class index {out_of_range[0]} is outside the {len(classes)} classes "
                        f"({', '.join(classes)})")
    return DatasetSplits(classes, train, val, n_train, n_val, tuple(cfg.mean or IMAGENET_MEAN),
                         tuple(cfg.std or IMAGENET_STD))
