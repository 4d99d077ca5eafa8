"""Training throughput: raycv (1 and 2 workers) vs a bare one-process loop over tensors in memory.

The seed's CNN at 32 px, batch 64 per step, on the bundled digits. raycv's figure is its
steady-state images/s (epochs after the first) as its metrics log records it; the bare loop runs
the same model, optimizer and batch size over the same decoded images. Prints a table with ratios
and writes it as JSON.

    python bench/train_bench.py --epochs 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from _report import report


def bare_loop(epochs: int, batch: int) -> float:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from raycv.data.presets import ClassificationTrainPreset
    from raycv.models import get_model

    torch.set_num_threads(os.cpu_count() or 1)
    d = load_digits()
    pre = ClassificationTrainPreset(input_size=32, resize_size=32, augment="none", mean=(0.3,) * 3, std=(0.4,) * 3)
    x = torch.stack([pre.geometry(Image.fromarray(np.uint8(i * 15.9)).convert("RGB")) for i in d.images])
    x = pre.normalize(x)  # (N, 3, 32, 32) float, in memory
    y = torch.as_tensor(d.target)
    model = get_model("simple_cnn", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, t = 0, 0.0
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch:  # steady state, as for raycv
            t += time.perf_counter() - t0
            seen += len(x)
    return seen / t


def raycv_fit(workers: int, epochs: int, batch: int, storage: Path) -> tuple[float, float]:
    from raycv.config import load_config
    from raycv.train.driver import fit

    per_worker = batch // workers  # the same global batch as the bare loop
    t0 = time.perf_counter()
    s = fit(load_config("train", None, [f"scaling.num_workers={workers}", f"train.epochs={epochs}",
                                        f"data.batch_size={per_worker}", "data.augment=none",
                                        f"run.storage_path={storage}", f"run.name=bench-{workers}w"]),
            echo=lambda line: None)
    return s.images_per_second, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--json", default="bench/results/train.json")
    args = ap.parse_args()

    import ray

    storage = Path(tempfile.mkdtemp(prefix="raycv-bench-runs-"))
    rows = {"bare loop (tensors in memory)": (bare_loop(args.epochs, args.batch), None)}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    for w in (1, 2):
        rows[f"raycv train, {w} worker(s)"] = raycv_fit(w, args.epochs, args.batch, storage)
    ray.shutdown()
    base = rows["bare loop (tensors in memory)"][0]
    out = [{"contender": k, "images_per_second": round(v, 1), "ratio_vs_bare": round(v / base, 3),
            "wall_seconds": round(w, 1) if w else None} for k, (v, w) in rows.items()]
    report(f"simple_cnn, 32 px digits, global batch {args.batch}, {args.epochs} epochs (first excluded), "
           f"{os.cpu_count()} CPUs", out, ["contender", "images_per_second", "ratio_vs_bare", "wall_seconds"],
           args.json, {"epochs": args.epochs, "batch": args.batch, "cpus": os.cpu_count()})

if __name__ == "__main__":
    main()
