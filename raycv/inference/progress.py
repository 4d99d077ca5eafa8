"""Inference progress on the driver: rows done, rows/s and time left.

Predictor actors add the rows of each finished batch to a tiny counter actor (no CPUs, fire and
forget); a driver thread polls it and shows it through `raycv.progress.Live`. Ray Data's own bars
stay off unless `run.verbose=true`: they describe Ray's operators, not the job.
"""

from __future__ import annotations

import threading
import time

import ray

from raycv.progress import Live


@ray.remote(num_cpus=0)
class RowCounter:
    def __init__(self):
        self.rows = self.total = self.units = 0
        self.actor = None  # wall times of the first predictor ready: its process started, __init__ began, ended

    def actor_ready(self, spawned: float, began: float, ended: float) -> None:
        if self.actor is None or ended < self.actor[2]:
            self.actor = (spawned, began, ended)

    def first_actor(self) -> tuple[float, float, float] | None:
        return self.actor

    def add(self, n: int) -> None:
        self.rows += n

    def add_total(self, n: int, units: int) -> None:
        """From the tasks that list the inputs: `n` more rows to predict, `units` more units listed."""
        self.total += n
        self.units += units

    def value(self) -> tuple[int, int, int]:
        return self.rows, self.total, self.units


def row_counter():
    """A RowCounter on the driver's own node: on any other node it dies with that node (a spot
    node, an autoscaler scaling down) and takes the run's progress and start-up figures with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return RowCounter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


class ProgressLine(threading.Thread):
    """Polls the row counter and shows it: a bar with rows/s and time left on a terminal, a line
    every 10 s in a log."""

    def __init__(self, counter, units: int, stream=None, every_s: float = 1.0, t_start: float | None = None):
        super().__init__(daemon=True)
        self.counter, self.units, self.stop = counter, units, threading.Event()
        self.total, self.listed = 1, 0  # rows to predict as far as listed, and the units listed so far
        self.live = Live(unit="row", stream=stream, log_every_s=10.0)
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.t_start = self.t0 if t_start is None else t_start  # the run's start (perf_counter)
        self.first_rows_s: float | None = None  # seconds from t_start to the first predicted rows

    def line(self, rows: int) -> str:
        dt = time.perf_counter() - self.t0
        rate = rows / dt if dt > 0 else 0.0
        listing = self.listed < self.units
        left = f"~{(self.total - rows) / rate:.0f}s left" if rate > 0 and rows < self.total and not listing else ""
        of = f"{self.total}+ listed so far" if listing else f"{self.total}"
        return f"infer: {rows}/{of} rows ({rows / self.total:.0%}), {rate:,.1f} rows/s {left}".rstrip()

    def show(self, final: bool = False, failed: bool = False) -> None:
        try:
            rows, total, self.listed = ray.get(self.counter.value.remote(), timeout=5)
        except Exception:  # a slow poll is not worth failing the job for
            return
        if failed and not rows:  # a run that failed before its first prediction: its error is the line
            return
        self.total = max(total, rows, 1)
        if rows and self.first_rows_s is None:
            self.first_rows_s = round(time.perf_counter() - self.t_start, 1)
        if final and not self.live.tty:
            self.live.stream.write(self.line(rows) + "\n")
            self.live.stream.flush()
            return
        self.live.update(n=rows, total=self.total, desc="infer", line=self.line(rows))

    def run(self) -> None:
        while not self.stop.wait(self.every_s if self.first_rows_s is not None else 0.2):
            self.show()

    def finish(self, failed: bool = False) -> None:
        self.stop.set()
        self.join()
        self.show(final=True, failed=failed)
        self.live.close()
