"""Batch-inference throughput: raycv vs a bare one-process loop vs Ray's documented pattern.

Generates its own JPEGs, runs every contender on the same files in the same run, prints a table
and writes it as JSON. Each Ray contender runs twice, over N and over `--scale` x N images:
start-up (worker processes importing torch, the model loading) is the same in both, so the
steady-state rate is the marginal one, (scale*N - N) / (t_big - t_small), and start-up is what is
left of t_small. The bare loop has no start-up to speak of; its rate is over the N images.
raycv's peak memory (PSS summed over the driver and every Ray process, sampled every 0.25 s) is
recorded at both sizes: streaming should keep it flat.

    python bench/infer_bench.py --images 1000 --scale 10 --size 64   # decode-bound: small model input
    python bench/infer_bench.py --images 300 --scale 3 --size 224    # compute-bound: ResNet-18 at 224 px
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report import report


def make_jpegs(root: Path, n: int, side: int = 256) -> list[str]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        small = np.roll(base, i, axis=0) ^ np.uint8(i % 255)
        img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        p = root / f"{i:06d}.jpg"
        img.save(p, quality=90)
        paths.append(str(p))
    return paths


def make_checkpoint(directory: Path, size: int, model_name: str = "resnet18") -> Path:
    """An untrained 10-class classifier written as a raycv checkpoint (seeded weights)."""
    from raycv.data.presets import ClassificationEvalPreset
    from raycv.models import get_model
    from raycv.training.checkpoint import CheckpointInfo, write_checkpoint

    torch.manual_seed(0)
    model = get_model(model_name, num_classes=10)
    preset = ClassificationEvalPreset(input_size=size, resize_size=size)
    info = CheckpointInfo(task="classification", model_name=model_name, model_kwargs={},
                          classes=[str(i) for i in range(10)], preprocess=preset, epoch=0, metrics={}, config={})
    return write_checkpoint(directory, model, info)


def bare_loop(paths: list[str], checkpoint: Path, batch: int) -> float:
    """Decode, eval preset, forward in batches: one process, every core for torch."""
    from raycv.data.decode import open_rgb
    from raycv.training.checkpoint import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model, info = load_model(checkpoint)
    pre = info.preprocess
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([pre.geometry(open_rgb(Path(p).read_bytes())) for p in paths[i:i + batch]])
            model(pre.normalize(x)).softmax(1).max(1)
    return time.perf_counter() - t0


def ray_documented(folder: Path, checkpoint: Path, batch: int, out: Path, size: int) -> float:
    """Ray's batch-inference example: read_images -> map_batches preprocess -> map_batches model
    class (one actor) -> write_parquet."""
    import ray.data
    from torchvision.transforms import v2

    from raycv.training.checkpoint import load_model

    transform = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def preprocess(b):
        return {"image": np.stack([transform(img).numpy() for img in b["image"]]), "path": b["path"]}

    class Model:
        def __init__(self):
            self.model, _ = load_model(checkpoint)

        def __call__(self, b):
            with torch.inference_mode():
                p = self.model(torch.as_tensor(b["image"])).softmax(1)
            return {"path": b["path"], "label": p.argmax(1).numpy(), "score": p.max(1).values.numpy()}

    t0 = time.perf_counter()
    ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
    ds = ds.map_batches(preprocess).map_batches(Model, compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch)
    ds.write_parquet(str(out))
    return time.perf_counter() - t0


def raycv_infer(folder: Path, checkpoint: Path, batch: int, out: Path, *overrides: str) -> float:
    from raycv.config import load_config
    from raycv.inference.pipeline import run_inference

    t0 = time.perf_counter()
    run_inference(load_config("infer", None, [f"infer.checkpoint={checkpoint}", f"infer.input={folder}",
                                              f"infer.output={out}", f"infer.batch_size={batch}", *overrides]))
    return time.perf_counter() - t0


class PeakMemory:
    """Peak of the summed PSS of this process and all its descendants (a local Ray instance started
    here: GCS, raylet, object store, workers), sampled in a thread. PSS counts shared pages (the
    object store) once across processes, where RSS would count them in every process."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.psutil, self.every, self.peak = psutil, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = self.psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (self.psutil.Error, AttributeError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="N")
    ap.add_argument("--scale", type=int, default=10, help="the second run has scale x N images")
    ap.add_argument("--size", type=int, default=64, help="model input side, pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default="bench/results/infer.json")
    ap.add_argument("--only", default="documented,raycv,decode_in_actor",
                    help="comma-separated Ray contenders to run (documented, raycv, decode_in_actor)")
    args = ap.parse_args()

    import ray
    import ray.data

    work = Path(tempfile.mkdtemp(prefix="raycv-bench-"))
    n, big = args.images, args.images * args.scale
    paths = make_jpegs(work / "images-big", big)
    small = work / "images-small"
    small.mkdir()
    for p in paths[:n]:
        os.link(p, small / Path(p).name)
    folders = {n: small, big: work / "images-big"}
    ckpt = make_checkpoint(work / "ckpt", args.size)
    bare_s = bare_loop(paths[:n], ckpt, args.batch)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    keys = {"documented": "Ray documented pattern", "raycv": "raycv infer",
            "decode_in_actor": "raycv infer, infer.decode_in_actor=true"}
    unknown = set(args.only.split(",")) - set(keys)
    if unknown:
        ap.error(f"--only: unknown contender(s) {', '.join(sorted(unknown))} (valid: {', '.join(keys)})")
    names = tuple(v for k, v in keys.items() if k in args.only.split(","))
    times: dict[str, dict[int, float]] = {k: {} for k in names}
    memory: dict[str, dict[int, int]] = {k: {} for k in names}
    for count, folder in folders.items():
        for name in names:
            with PeakMemory() as mem:
                if name == "raycv infer":
                    times[name][count] = raycv_infer(folder, ckpt, args.batch, work / f"out-raycv-{count}")
                elif name.startswith("raycv infer, "):
                    times[name][count] = raycv_infer(folder, ckpt, args.batch, work / f"out-fused-{count}",
                                                     "infer.decode_in_actor=true")
                else:
                    times[name][count] = ray_documented(folder, ckpt, args.batch, work / f"out-ray-{count}", args.size)
            memory[name][count] = mem.peak
    ray.shutdown()

    gib = 1024 ** 3
    base = n / bare_s
    rows = [{"contender": "bare loop (1 process, all cores)", "start_up_s": 0.0,
             "steady_images_per_second": round(base, 1), "ratio_vs_bare": 1.0}]
    for name in names:
        t, m = times[name], memory[name]
        rate = (big - n) / max(t[big] - t[n], 1e-9)
        rows.append({"contender": name, "start_up_s": round(max(t[n] - n / rate, 0.0), 1),
                     "steady_images_per_second": round(rate, 1), "ratio_vs_bare": round(rate / base, 3),
                     "seconds_N": round(t[n], 2), "seconds_scaleN": round(t[big], 2),
                     "peak_GiB_N": round(m[n] / gib, 2), "peak_GiB_scaleN": round(m[big] / gib, 2),
                     "memory_ratio": round(m[big] / max(m[n], 1), 3)})
    report(f"ResNet-18 at {args.size} px, JPEGs 256x256, N={n} and {args.scale}N={big}, batch {args.batch}, "
           f"{os.cpu_count()} CPUs. Steady state: the marginal rate between the two runs; start-up: the rest of "
           f"the N run; memory: peak PSS of all Ray processes and the driver (GiB), ratio {args.scale}N / N", rows,
           ["contender", "start_up_s", "steady_images_per_second", "ratio_vs_bare", "seconds_N", "seconds_scaleN",
            "peak_GiB_N", "peak_GiB_scaleN", "memory_ratio"],
           args.json, {"images": n, "scale": args.scale, "size": args.size, "batch": args.batch,
                       "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
