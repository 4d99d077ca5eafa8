"""What the driver shows while Ray Train runs: one line per finished epoch (from rank 0's metrics
log) and, within an epoch, a live bar or periodic line (from rank 0's `progress.json`).

Both are files in the run directory, so the driver needs no extra Ray process and the same works
for a run on object storage (polled less often there)."""

from __future__ import annotations

import json
import threading
from typing import Callable

from raycv import tasks
from raycv.data import io as fsio
from raycv.progress import Live
from raycv.training.tracking import METRICS_LOG, PROGRESS


class TrainProgress(threading.Thread):
    def __init__(self, run_dir: str, echo: Callable[[str], None], since: float, stream=None):
        super().__init__(daemon=True)
        self.run_dir, self.echo, self.since, self.stop = run_dir, echo, since, threading.Event()
        self.printed: dict[int, dict] = {}  # epoch -> its metrics line
        self.every = 0.5 if "://" not in run_dir else 3.0  # object storage: fewer requests
        self.live = Live(unit="img", stream=stream, log_every_s=30.0)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()
        self.poll()
        self.live.close()

    def poll(self) -> None:
        try:
            text = fsio.read_text(fsio.join(self.run_dir, METRICS_LOG))
            now = fsio.read_text(fsio.join(self.run_dir, PROGRESS))
        except OSError:  # object storage hiccup: try again at the next tick
            return
        for line in (text or "").splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if m["time"] >= self.since and m["epoch"] not in self.printed:
                self.printed[m["epoch"]] = m
                self.live.close()
                self.echo(format_epoch(m))
        try:
            p = json.loads(now) if now else None
        except json.JSONDecodeError:
            p = None
        if p and p["time"] >= self.since and p["epoch"] not in self.printed:
            self.show(p)

    def show(self, p: dict) -> None:
        rate = p["images"] / p["seconds"] if p["seconds"] > 0 else 0.0
        epoch_left = (p["total"] - p["images"]) / rate if rate > 0 else None
        last = self.printed[max(self.printed)] if self.printed else None
        per_epoch = last["train_seconds"] + last.get("val_seconds", 0.0) if last else None
        run_left = None if epoch_left is None else epoch_left + (p["epochs"] - p["epoch"]) * (
            per_epoch if per_epoch is not None else p["seconds"] + epoch_left)
        run = f"run left ~{run_left:.0f}s" if run_left is not None else ""
        desc = f"epoch {p['epoch']}/{p['epochs']}"
        line = (f"{desc}: {p['images']:,}/{p['total']:,} images ({p['images'] / max(p['total'], 1):.0%}), "
                f"{rate:,.0f} img/s" + (f", epoch left ~{epoch_left:.0f}s, {run}" if epoch_left is not None else ""))
        self.live.update(n=p["images"], total=p["total"], desc=desc, postfix=run, line=line)


def format_epoch(m: dict) -> str:
    left = (m["epochs"] - m["epoch"]) * (m["train_seconds"] + m.get("val_seconds", 0.0))
    quality = "  ".join(f"{label} {value:.4f}" for label, value in tasks.shown(m))
    val_loss = f"val_loss {m['val_loss']:.4f}  " if "val_loss" in m else ""  # detection has none
    return (f"epoch {m['epoch']:>3}/{m['epochs']}  loss {m['train_loss']:.4f}  {val_loss}"
            f"{quality}  {m['images_per_second']:,.0f} img/s  left ~{left:.0f}s")
