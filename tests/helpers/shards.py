"""WebDataset tar shards written from the bundled digits, as `webdataset`'s ShardWriter lays them
out: one `<key>.png` and one `<key>.cls` (the class index as text) per sample, contiguous."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_digit_shards(root: Path, *, every: int = 6, per_shard: int = 120) -> dict[str, int]:
    """train-00000K.tar (several) and val-000000.tar under `root`; -> samples per split."""
    from raycv.data.bundled import digits_root

    root.mkdir(parents=True, exist_ok=True)
    files = sorted(digits_root().glob("*/*.png"))[::every]
    splits = {"train": [f for i, f in enumerate(files) if i % 5], "val": files[::5]}
    for split, chunk in splits.items():
        for k in range(0, len(chunk), per_shard if split == "train" else len(chunk)):
            with tarfile.open(root / f"{split}-{k // per_shard:06d}.tar", "w") as tar:
                for f in chunk[k:k + (per_shard if split == "train" else len(chunk))]:
                    for suffix, data in (("png", f.read_bytes()), ("cls", f.parent.name.encode())):
                        info = tarfile.TarInfo(f"{f.parent.name}_{f.stem}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return {s: len(v) for s, v in splits.items()}
