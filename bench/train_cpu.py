"""Where the training gap goes: the same bare loop (bench/train_bench.py's: simple_cnn, 32 px digits,
tensors in memory) run in this process, as a Ray task, and as the training function of a 1-worker
TorchTrainer, then `raycv train` with 1 worker; each over its steady-state epochs, with what the
kernel counts for the process that runs the loop (from /proc, sampled every 0.25 s: CPU time and
minor page faults) and the CPU of every other process.

Contenders run interleaved, `--reps` times, all with the same local Ray instance up; each run's
ratio is against the in-process loop of the same round (the machine's speed drifts).

    python bench/train_cpu.py --epochs 6 --reps 3
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from _report import report
from train_bench import bare_loop, raycv_run

TICK = os.sysconf("SC_CLK_TCK")


def _counters(pid: int) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of a process, all its threads (exited ones included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / TICK, int(f[7])


class ProcSampler:
    """Samples this process and all its descendants (Ray's processes, when Ray was started here)."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.psutil, self.every = psutil, every
        self.samples: list[tuple[float, int, str, tuple]] = []  # (time, pid, title, counters)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            now, me = time.time(), self.psutil.Process()
            for p in [me, *me.children(recursive=True)]:
                try:
                    self.samples.append((now, p.pid, " ".join(p.cmdline()), _counters(p.pid)))
                except (self.psutil.Error, OSError, ValueError, IndexError):
                    continue

    def __enter__(self) -> "ProcSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, series: list[tuple[float, tuple]], t: float) -> list[float] | None:
        """A process's counters at time t, interpolated between the samples around it."""
        i = bisect.bisect_left(series, t, key=lambda sample: sample[0])  # samples are in time order
        if i == len(series) or (i == 0 and series[0][0] > t):
            return None
        (t1, b) = series[i]
        (t0, a) = series[i - 1] if t1 > t else series[i]
        w = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
        return [x + w * (y - x) for x, y in zip(a, b)]

    def spans(self, spans: list[tuple[float, float]], loop_title: str | None) -> dict:
        """Counter deltas summed over the (start, end) spans: of the loop's process (this one when
        `loop_title` is None, else the one whose title starts with it), and the CPU of all others."""
        by_pid: dict[int, list[tuple[float, tuple]]] = {}
        titles: dict[int, list[tuple[float, str]]] = {}
        for t, pid, title, c in self.samples:
            by_pid.setdefault(pid, []).append((t, c))
            titles.setdefault(pid, []).append((t, title))
        loop = {"cpu": 0.0, "faults": 0.0}
        others = 0.0
        for pid, series in by_pid.items():
            for start, end in spans:
                a, b = self._at(series, start), self._at(series, end)
                if a is None or b is None:
                    continue  # the process did not live through the span
                title = next(title for t, title in titles[pid] if t >= (start + end) / 2)  # what it ran then
                mine = (pid == os.getpid()) if loop_title is None else title.startswith(loop_title)
                d = [y - x for x, y in zip(a, b)]
                if mine:
                    for k, v in zip(loop, d):
                        loop[k] += v
                else:
                    others += d[0]
        return {**loop, "others_cpu": others}


def in_trainer(epochs: int, batch: int, out: Path, storage: Path) -> list:
    """The bare loop as a 1-worker TorchTrainer's training function, with the whole machine's CPUs."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        Path(config["out"]).write_text(json.dumps(bare_loop(config["epochs"], config["batch"])[2]))
        time.sleep(0.6)  # the worker exits with this function: live until the sampler has seen the end

    TorchTrainer(loop, train_loop_config={"epochs": epochs, "batch": batch, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count()}),
                 run_config=RunConfig(storage_path=str(storage), name=out.stem)).fit()
    return json.loads(out.read_text())


def raycv_one_worker(epochs: int, batch: int, storage: Path, name: str) -> tuple[list, int]:
    """-> (steady epochs' (start, end) times, images per epoch) of `raycv train` with 1 worker."""
    s = raycv_run(1, epochs, batch, storage, name)
    steps = [json.loads(ln) for ln in (Path(s.run_dir) / "steps.jsonl").read_text().splitlines()]
    epochs_log = [json.loads(ln) for ln in (Path(s.run_dir) / "metrics.jsonl").read_text().splitlines()]
    spans = []
    for m in epochs_log[1:]:
        end = max(st["time"] for st in steps if st["epoch"] == m["epoch"])
        spans.append((end - m["train_seconds"], end))
    return spans, epochs_log[1]["train_images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="bench/results/train_cpu.json")
    args = ap.parse_args()

    import ray
    from sklearn.datasets import load_digits

    storage = Path(tempfile.mkdtemp(prefix="raycv-bench-cpu-"))
    digits = len(load_digits().target)
    rows = []
    with ProcSampler() as sampler:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        task = ray.remote(num_cpus=os.cpu_count())(bare_loop)
        ray.get(task.remote(2, args.batch))  # warm: the task's process has imported torch
        for rep in range(1, args.reps + 1):
            runs = [("bare loop, in this process", lambda: (bare_loop(args.epochs, args.batch)[2], digits),
                     None),
                    ("bare loop, as a Ray task", lambda: (ray.get(task.remote(args.epochs, args.batch))[2], digits),
                     "ray::bare_loop"),
                    ("bare loop, in a 1-worker TorchTrainer",
                     lambda: (in_trainer(args.epochs, args.batch, storage / f"trainer{rep}.json", storage), digits),
                     "ray::RayTrainWorker"),
                    ("raycv train, 1 worker", lambda: raycv_one_worker(args.epochs, args.batch, storage, f"cpu{rep}"),
                     "ray::RayTrainWorker")]
            base = None
            for name, run, title in runs:
                spans, per_epoch = run()
                time.sleep(0.6)  # a sample after the last epoch
                images = per_epoch * len(spans)
                w = sampler.spans(spans, title)
                wall = sum(b - a for a, b in spans)  # training time only (raycv validates between epochs)
                ips = images / wall
                base = base or ips
                rows.append({"contender": name, "run": rep, "images_per_second": round(ips, 1),
                             "ratio_vs_bare": round(ips / base, 3), "loop_process_cpus": round(w["cpu"] / wall, 2),
                             "cpu_ms_per_image": round(1000 * w["cpu"] / images, 3),
                             "page_faults_per_image": round(w["faults"] / images, 1),
                             "other_processes_cpus": round(w["others_cpu"] / wall, 2)})
        ray.shutdown()
    report(f"simple_cnn, 32 px digits, batch {args.batch}, epochs 2-{args.epochs}, {os.cpu_count()} CPUs: the loop's "
           f"process as the kernel counts it (run k's ratio: against run k's in-process loop)", rows,
           ["contender", "run", "images_per_second", "ratio_vs_bare", "loop_process_cpus", "cpu_ms_per_image",
            "page_faults_per_image", "other_processes_cpus"],
           args.json, {"epochs": args.epochs, "batch": args.batch, "reps": args.reps, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
