"""Training throughput: raycv (1 and 2 workers) vs a bare one-process loop over tensors in memory
vs Ray's documented TorchTrainer + Ray Data pattern; and the same bare loop run as a Ray task
(same code, same threads: what running inside a Ray worker process beside Ray's own processes
costs, before any of raycv's or Ray Train's machinery).

The seed's CNN at 32 px, global batch 64 per step, on the bundled digits. Each contender's figure
is its steady-state images/s (epochs after the first); the bare loop runs the same model, optimizer
and batch size over the same decoded images. Time to first step: from the call (fit, or the start
of the bare loop's data loading) to the end of the first optimizer step. Prints a table with
ratios and writes it as JSON.

    python bench/train_bench.py --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from _report import report


def bare_loop(epochs: int, batch: int) -> tuple[float, float, list[tuple[float, float]]]:
    """-> (steady images/s, time to first step, each steady epoch's (start, end) wall-clock times)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from raycv.data.presets import ClassificationTrainPreset
    from raycv.models import get_model

    t_call = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    d = load_digits()
    pre = ClassificationTrainPreset(input_size=32, resize_size=32, augment="none", mean=(0.3,) * 3, std=(0.4,) * 3)
    x = torch.stack([pre.geometry(Image.fromarray(np.uint8(i * 15.9)).convert("RGB")) for i in d.images])
    x = pre.normalize(x)  # (N, 3, 32, 32) float, in memory
    y = torch.as_tensor(d.target)
    model = get_model("simple_cnn", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, t, first, spans = 0, 0.0, None, []
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        t0, wall0 = time.perf_counter(), time.time()
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first or time.perf_counter() - t_call
        if epoch:  # steady state, as for raycv
            t += time.perf_counter() - t0
            seen += len(x)
            spans.append((wall0, time.time()))
    return seen / t, first, spans


def ray_documented(workers: int, epochs: int, batch: int, storage: Path) -> tuple[float, float]:
    """Ray Train's documented pattern: read_images -> map_batches preprocess into a Dataset passed to
    TorchTrainer; each worker iterates `get_dataset_shard("train").iter_torch_batches` and steps a
    `prepare_model` model; default sizes (one CPU per worker)."""
    import numpy as np
    import ray.data
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycv.data.bundled import digits_root

    def preprocess(b):
        x = np.stack([np.asarray(img, dtype=np.float32) for img in b["image"]]) / 255.0  # (B, 32, 32, 3)
        x = (x - 0.3) / 0.4
        y = np.array([int(Path(p).parent.name) for p in b["path"]])
        return {"x": x.transpose(0, 3, 1, 2).copy(), "y": y}

    def loop(config):
        from raycv.models import get_model

        model = ray.train.torch.prepare_model(get_model("simple_cnn", num_classes=10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        shard = ray.train.get_dataset_shard("train")
        first, seen, t = None, 0, 0.0
        for epoch in range(config["epochs"]):
            t0, n = time.perf_counter(), 0
            for b in shard.iter_torch_batches(batch_size=config["batch"]):
                loss = torch.nn.functional.cross_entropy(model(b["x"]), b["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                first = first or time.time()
                n += len(b["y"])
            if epoch:
                t += time.perf_counter() - t0
                seen += n
        if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps metrics only with checkpoints
            Path(config["out"]).write_text(json.dumps({"ips": seen * ray.train.get_context().get_world_size() / t,
                                                       "first": first}))

    root = digits_root()  # all 1,797 scans as <digit>/<i>.png
    t_call = time.time()
    ds = ray.data.read_images(str(root), mode="RGB", size=(32, 32), include_paths=True).map_batches(preprocess)
    out = storage / f"documented-{workers}w.json"
    trainer = TorchTrainer(loop, train_loop_config={"epochs": epochs, "batch": batch // workers, "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=workers), datasets={"train": ds},
                           run_config=RunConfig(storage_path=str(storage), name=f"documented-{workers}w"))
    trainer.fit()
    m = json.loads(out.read_text())
    return m["ips"], m["first"] - t_call


def raycv_run(workers: int, epochs: int, batch: int, storage: Path, name: str):
    """`raycv train` in the bench's configuration (global batch `batch`, no augmentation, every step
    logged) -> its TrainSummary."""
    from raycv.config import load_config
    from raycv.training.driver import fit

    per_worker = batch // workers  # the same global batch as the bare loop
    return fit(load_config("train", None, [f"scaling.num_workers={workers}", f"train.epochs={epochs}",
                                           f"data.batch_size={per_worker}", "data.augment=none",
                                           "train.log_every_steps=1", "train.tensorboard=false",
                                           f"run.storage_path={storage}", f"run.name={name}"]),
               echo=lambda line: None)


def raycv_fit(workers: int, epochs: int, batch: int, storage: Path) -> tuple[float, float]:
    t_call = time.time()
    s = raycv_run(workers, epochs, batch, storage, f"bench-{workers}w")
    first = json.loads((Path(s.run_dir) / "steps.jsonl").read_text().splitlines()[0])["time"]
    return s.images_per_second, first - t_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--json", default="bench/results/train.json")
    args = ap.parse_args()

    import ray

    storage = Path(tempfile.mkdtemp(prefix="raycv-bench-runs-"))
    rows = {"bare loop (tensors in memory)": bare_loop(args.epochs, args.batch)[:2]}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cpus = os.cpu_count() or 1
    in_task = ray.remote(num_cpus=cpus)(bare_loop)
    ray.get(in_task.remote(2, args.batch))  # warm: the worker process has imported torch and the data
    rows[f"bare loop as a Ray task ({cpus} CPUs)"] = ray.get(in_task.remote(args.epochs, args.batch))[:2]
    # Two workers of the documented pattern take one CPU each: on a 2-CPU machine Ray Data then gets
    # none and the run waits forever, so it runs only where there are spare CPUs.
    for w in (1, 2) if os.cpu_count() > 2 else (1,):
        rows[f"Ray documented TorchTrainer + Ray Data, {w} worker(s)"] = ray_documented(w, args.epochs, args.batch,
                                                                                        storage)
    for w in (1, 2):
        rows[f"raycv train, {w} worker(s)"] = raycv_fit(w, args.epochs, args.batch, storage)
    ray.shutdown()
    base = rows["bare loop (tensors in memory)"][0]
    out = [{"contender": k, "images_per_second": round(v, 1), "ratio_vs_bare": round(v / base, 3),
            "time_to_first_step_s": round(first, 1)} for k, (v, first) in rows.items()]
    report(f"simple_cnn, 32 px digits, global batch {args.batch}, {args.epochs} epochs (first excluded), "
           f"{os.cpu_count()} CPUs", out, ["contender", "images_per_second", "ratio_vs_bare", "time_to_first_step_s"],
           args.json, {"epochs": args.epochs, "batch": args.batch, "cpus": os.cpu_count()})

if __name__ == "__main__":
    main()
