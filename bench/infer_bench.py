"""Batch inference end to end: `raycv infer` against the script a PyTorch user writes instead.

The baseline is `bench/dataloader_script.py`: a `Dataset` opening each file with PIL and
torchvision transforms, a `DataLoader` with 2 decode worker processes, the model in the main
process under `inference_mode`, one Parquet file written with pyarrow. Every contender is a whole
command run as a subprocess over the same JPEGs (wall clock from its start to its exit):

- the DataLoader script (the baseline, 1.00x);
- `raycv infer` starting its own local Ray instance (what a first command does);
- `raycv infer` with a Ray instance already running (`ray start --head` once, then
  `RAY_ADDRESS=...`: the everyday workflow);
- Ray's documented batch-inference pattern (read_images, map_batches, an actor pool, write_parquet).

Each runs over N and over `--scale` x N images: steady state is the marginal rate,
(scale*N - N) / (t_big - t_small); end to end is the scale*N run's wall clock. raycv's labels are
checked against the script's on every image. raycv's start-up is broken down from its `--json`
summary (process start -> run called -> Ray up -> first actor's model loaded -> first prediction).
The peak PSS of each command and its descendants is sampled too.

    python bench/infer_bench.py --images 600 --scale 10 --size 64    # decode-bound; 6,000 end to end
    python bench/infer_bench.py --images 200 --scale 10 --size 224   # compute-bound
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report import report

HERE = Path(__file__).parent


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
    """Peak of the summed PSS of a process tree (a command and everything it started: a local Ray
    instance, decode workers), sampled in a thread. PSS counts shared pages (the object store) once
    across processes, where RSS would count them in every process."""

    def __init__(self, root_pid: int | None = None, every: float = 0.25):
        import psutil

        self.psutil, self.every, self.peak = psutil, every, 0
        self.root = root_pid or os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            root = self.psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except self.psutil.Error:
            return 0
        total = 0
        for p in procs:
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


def run_command(cmd: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    """(wall seconds from start to exit, stdout, peak PSS bytes of the command's process tree)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, out, mem.peak


def labels_of(path: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["path", "label_index"])
    return dict(zip(t.column("path").to_pylist(), t.column("label_index").to_pylist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600, help="N")
    ap.add_argument("--scale", type=int, default=10, help="the second run has scale x N images")
    ap.add_argument("--size", type=int, default=64, help="model input side, pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default="bench/results/infer.json")
    ap.add_argument("--only", default="raycv,warm,documented",
                    help="comma-separated contenders beside the script (raycv, warm, documented)")
    ap.add_argument("--documented", nargs=5, metavar=("FOLDER", "CKPT", "OUT", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.documented:
        folder, ckpt, out, size, batch = args.documented
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_documented(Path(folder), Path(ckpt), int(batch), Path(out), int(size))
        return

    keys = {"raycv": "raycv infer (starts Ray)", "warm": "raycv infer (Ray already running)",
            "documented": "Ray documented pattern"}
    unknown = set(args.only.split(",")) - set(keys)
    if unknown:
        ap.error(f"--only: unknown contender(s) {', '.join(sorted(unknown))} (valid: {', '.join(keys)})")
    names = [k for k in keys if k in args.only.split(",")]

    import secrets
    import uuid

    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers.head import Head, clean_env

    work = Path(tempfile.mkdtemp(prefix="raycv-bench-"))
    n, big = args.images, args.images * args.scale
    paths = make_jpegs(work / "images-big", big)
    small = work / "images-small"
    small.mkdir()
    for p in paths[:n]:
        os.link(p, small / Path(p).name)
    folders = {n: small, big: work / "images-big"}
    ckpt = make_checkpoint(work / "ckpt", args.size)
    token = secrets.token_hex(16)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # nothing written to ~/.ray
    py, raycv = sys.executable, str(Path(sys.executable).parent / "raycv")
    head = None
    if "warm" in names:
        (work / "head").mkdir()
        head = Head(work / "head", env, token=token)
        head_env = {**env, "RAY_ADDRESS": head.gcs_address}
    times: dict[str, dict[int, float]] = {k: {} for k in ["script", *names]}
    memory: dict[str, dict[int, int]] = {k: {} for k in ["script", *names]}
    startup: dict[str, dict] = {}
    mismatches: dict[str, int] = {}
    try:
        for count, folder in folders.items():
            script_out = work / f"script-{count}.parquet"
            t, out, m = run_command([py, str(HERE / "dataloader_script.py"), "--images", str(folder), "--weights",
                                     str(ckpt / "model.pt"), "--size", str(args.size), "--batch", str(args.batch),
                                     "--out", str(script_out)], env)
            times["script"][count], memory["script"][count] = t, m
            if count == big:
                startup["script"] = {"first_prediction": json.loads(out.strip().splitlines()[-1])["first_prediction_s"]}
            expected = labels_of(script_out)
            for name in names:
                dest = work / f"out-{name}-{count}-{uuid.uuid4().hex[:6]}"
                if name == "documented":
                    cmd, e = [py, __file__, "--documented", str(folder), str(ckpt), str(dest), str(args.size),
                              str(args.batch)], env
                else:
                    cmd = [raycv, "infer", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(dest),
                           f"infer.batch_size={args.batch}", "--json"]
                    e = head_env if name == "warm" else env
                t, out, m = run_command(cmd, e)
                times[name][count], memory[name][count] = t, m
                if name != "documented":
                    summary = json.loads(out.strip().splitlines()[-1])
                    if count == big:
                        startup[name] = summary["startup"]
                    got = labels_of(dest)
                    mismatches[name] = mismatches.get(name, 0) + sum(got.get(p) != v for p, v in expected.items())
    finally:
        if head is not None:
            head.stop()

    gib = 1024 ** 3
    t = times["script"]
    base_rate = (big - n) / max(t[big] - t[n], 1e-9)
    rows = []
    for name in ["script", *names]:
        tt, m = times[name], memory[name]
        rate = (big - n) / max(tt[big] - tt[n], 1e-9)
        su = startup.get(name, {})
        rows.append({"contender": "DataLoader script (2 decode workers)" if name == "script" else keys[name],
                     "end_to_end_s": round(tt[big], 1), "end_to_end_ratio": round(t[big] / tt[big], 3),
                     "steady_images_per_second": round(rate, 1), "steady_ratio": round(rate / base_rate, 3),
                     "seconds_N": round(tt[n], 1), "first_prediction_s": su.get("first_prediction"),
                     "ray_up_s": su.get("ray"), "model_loaded_s": su.get("actor_ready"),
                     "peak_GiB": round(m[big] / gib, 2), "labels_differ": mismatches.get(name, 0 if name == "script" else None)})
    report(f"Batch inference end to end: ResNet-18 at {args.size} px, 256x256 JPEGs, N={n} and {args.scale}N={big}, "
           f"batch {args.batch}, {os.cpu_count()} CPUs. Ratios against the DataLoader script (higher is faster); "
           f"start-up columns: seconds from the command's start", rows,
           ["contender", "end_to_end_s", "end_to_end_ratio", "steady_images_per_second", "steady_ratio", "seconds_N",
            "first_prediction_s", "ray_up_s", "model_loaded_s", "peak_GiB", "labels_differ"],
           args.json, {"images": n, "scale": args.scale, "size": args.size, "batch": args.batch,
                       "cpus": os.cpu_count(), "startup": startup})


if __name__ == "__main__":
    main()
