"""Training as whole commands, against the script a PyTorch user writes instead
(`bench/train_script.py`): the default job (`raycv train`: the seed's CNN on the bundled digits,
10 epochs, 2 workers) starting its own Ray, and with a Ray instance already running (`ray start
--head` once, then `RAY_ADDRESS`: the everyday workflow). Wall clock from the command's start to
its exit, and to the end of its first optimizer step; for raycv, where those seconds go: when it
printed its first line, and the start-up marks in its summary.json (the driver's: fit called, Ray
joined, TorchTrainer.fit called; rank 0's: its process started, its training function entered,
model ready, first batch, first step). Rounds alternate the contenders.

    python bench/train_startup.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _report import report  # noqa: E402


# raycv's start-up marks (raycv/training/tracking.py `startup_marks`): the driver called fit (imports and the
# CLI done), joined or started Ray, called TorchTrainer.fit; rank 0's process started, entered the
# training function (its imports done), had its model ready, got its first batch, ended its first step.
STAGES = ("fit", "ray", "trainer_fit", "worker_process", "loop_entered", "model_ready", "first_batch", "first_step")


def run_script(epochs: int, work: Path, env: dict[str, str]) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, str(HERE / "train_script.py"), "--epochs", str(epochs),
                        "--out", str(work / "script.pt")], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode:
        sys.exit(f"train_script.py failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "first_step_s": out["first_step_time"] - t0, "val_accuracy": out["val_accuracy"]}


def run_raycv(epochs: int, run_dir: Path, env: dict[str, str]) -> dict:
    """`raycv train` as a command: its wall clock, when it printed its first line, and the start-up
    marks its summary.json holds (seconds from the command's process start)."""
    raycv = str(Path(sys.executable).parent / "raycv")
    cmd = [raycv, "train", f"train.epochs={epochs}", f"run.storage_path={run_dir.parent}", f"run.name={run_dir.name}"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[float] = []
    reader = threading.Thread(target=lambda: [lines.append(time.time()) for _ in proc.stdout])
    reader.start()
    err = proc.stderr.read()
    proc.wait()
    wall = time.time() - t0
    reader.join()
    if proc.returncode:
        sys.exit(f"raycv train failed:\n{err[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": wall, "first_line_s": lines[0] - t0 if lines else None, "val_accuracy": summary["val_accuracy"],
            **{f"{k}_s": v for k, v in summary["startup"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="bench/results/train_startup.json")
    args = ap.parse_args()

    from helpers.head import Head, clean_env

    work = Path(tempfile.mkdtemp(prefix="raycv-train-startup-"))
    token = secrets.token_hex(16)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # nothing written to ~/.ray
    # The generated digits cache is shared by every contender, made before the first timed run.
    env["RAYCV_CACHE"] = str(work / "cache")
    (work / "head").mkdir()
    t_head = time.time()
    head = Head(work / "head", env, token=token)
    head_s = time.time() - t_head
    warm_env = {**env, "RAY_ADDRESS": head.gcs_address}
    results: dict[str, list[dict]] = {"script": [], "cold": [], "warm": []}
    try:
        run_raycv(1, work / "runs" / "prime", warm_env)  # writes the digits cache once
        for i in range(args.rounds):
            results["script"].append(run_script(args.epochs, work, env))
            results["cold"].append(run_raycv(args.epochs, work / "runs" / f"cold-{i}", env))
            results["warm"].append(run_raycv(args.epochs, work / "runs" / f"warm-{i}", warm_env))
            print(json.dumps({k: v[-1] for k, v in results.items()}), flush=True)
    finally:
        head.stop()

    def mean(name: str, key: str) -> float | None:
        vals = [r[key] for r in results[name] if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    script_wall = mean("script", "wall_s")
    names = {"script": "PyTorch script (train_script.py)", "cold": "raycv train (starts Ray)",
             "warm": "raycv train (Ray already running)"}
    rows = [{"contender": names[k], "wall_s": round(mean(k, "wall_s"), 1),
             "ratio": round(script_wall / mean(k, "wall_s"), 2),
             "first_step_s": round(mean(k, "first_step_s"), 1), "val_accuracy": round(mean(k, "val_accuracy"), 4),
             **{f"{stage}_s": None if mean(k, f"{stage}_s") is None else round(mean(k, f"{stage}_s"), 1)
                for stage in ("first_line", *STAGES)}}
            for k in results]
    meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "head_start_s": round(head_s, 1), "rounds": results}
    report(f"training {args.epochs} epochs of the digits as whole commands (mean of {args.rounds} rounds)", rows,
           ["contender", "wall_s", "ratio", "first_step_s", "val_accuracy"], args.json, meta)
    report("where raycv's seconds to its first step go (seconds from the command's start: its first printed "
           "line, then summary.json's `startup`)", rows[1:], ["contender", *(f"{s}_s" for s in ("first_line", *STAGES))],
           args.json.replace(".json", "_stages.json"), meta)


if __name__ == "__main__":
    main()
