"""Where the CPU goes during `raycv infer`: every process of the local Ray instance and the driver,
sampled every 0.5 s, its CPU time attributed to what the process was doing (Ray sets a worker's
title to `ray::<task or actor method>`). Answers: of the machine's CPU-seconds during a
compute-bound run, how many went to the model's forward pass and how many to everything beside it.

    python bench/infer_cpu.py --images 600 --size 224    # compute-bound: ResNet-18 at 224 px
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from _report import report
from infer_bench import bare_loop, make_checkpoint, make_jpegs, raycv_infer


def _category(name: str, cmdline: str) -> str:
    if "ModelActor" in cmdline:
        return "predictor actor (model forward)"
    if "decode_batch" in cmdline or "MapBatches" in cmdline or "ReadFiles" in cmdline:
        return "Ray Data tasks (decode)"
    if "Write" in cmdline or "write" in cmdline:
        return "Ray Data tasks (Parquet write)"
    if name == "raylet" or "raylet" in cmdline:
        return "raylet"
    if "gcs_server" in cmdline:
        return "GCS server"
    if "ray::IDLE" in cmdline or "default_worker" in cmdline:
        return "idle or starting Ray workers"
    if "ray::" in cmdline:
        return "other Ray tasks/actors (" + cmdline.split("ray::", 1)[1].split()[0][:40] + ")"
    return "other Ray processes (" + name + ")"


class CpuByRole:
    """CPU seconds per role, from per-process deltas between samples (a process that lived less
    than one interval is missed: the totals are a lower bound, compared with wall x CPUs)."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.psutil, self.every = psutil, every
        self.seconds: dict[str, float] = defaultdict(float)
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total = t.user + t.system
                role = "driver (this process: streaming executor, progress)" if p.pid == me.pid else \
                    _category(p.name(), " ".join(p.cmdline()))
            except self.psutil.Error:
                continue
            self.seconds[role] += total - self.last.get(p.pid, total)
            self.last[p.pid] = total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> "CpuByRole":
        self._sample()
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default="bench/results/infer_cpu.json")
    args = ap.parse_args()

    import ray
    import ray.data

    work = Path(tempfile.mkdtemp(prefix="raycv-bench-cpu-"))
    paths = make_jpegs(work / "images", args.images)
    ckpt = make_checkpoint(work / "ckpt", args.size)
    bare_s = bare_loop(paths, ckpt, args.batch)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    raycv_infer(work / "images", ckpt, args.batch, work / "warm")  # start-up paid here, not measured below
    with CpuByRole() as cpu:
        raycv_infer(work / "images", ckpt, args.batch, work / "out", "infer.mode=overwrite")
    ray.shutdown()
    cpus = os.cpu_count()
    available = cpu.wall * cpus
    rows = [{"role": role, "cpu_seconds": round(s, 1), "share_of_machine": round(s / available, 3)}
            for role, s in sorted(cpu.seconds.items(), key=lambda kv: -kv[1]) if s >= 0.05]
    rows.append({"role": "(not attributed: idle, or processes shorter than a sample)",
                 "cpu_seconds": round(available - sum(cpu.seconds.values()), 1),
                 "share_of_machine": round(1 - sum(cpu.seconds.values()) / available, 3)})
    report(f"raycv infer, ResNet-18 at {args.size} px over {args.images} JPEGs (256x256), second run (warm), "
           f"{cpus} CPUs: {cpu.wall:.1f} s wall = {available:.0f} CPU-s available; {args.images / cpu.wall:.1f} img/s "
           f"vs bare loop {args.images / bare_s:.1f} img/s ({bare_s / cpu.wall:.2f}x)", rows,
           ["role", "cpu_seconds", "share_of_machine"], args.json,
           {"images": args.images, "size": args.size, "batch": args.batch, "cpus": cpus, "wall_s": round(cpu.wall, 2),
            "images_per_second": round(args.images / cpu.wall, 1), "bare_images_per_second": round(args.images / bare_s, 1)})


if __name__ == "__main__":
    main()
