"""Inference progress on the driver: rows done, rows/s and time left.

Predictor actors add the rows of each finished batch to a tiny counter actor (no CPUs, fire and
forget); a driver thread polls it. Ray Data's own bars depend on the terminal and on optional
packages; this line is always there.
"""

from __future__ import annotations

import sys
import threading
import time

import ray


@ray.remote(num_cpus=0)
class RowCounter:
    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def value(self) -> int:
        return self.rows


class ProgressLine(threading.Thread):
    def __init__(self, counter, total: int, stream=None, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.counter, self.total, self.stop = counter, max(total, 1), threading.Event()
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else 10.0  # a log line every 10 s when not a terminal
        self.t0 = time.perf_counter()

    def line(self, rows: int) -> str:
        dt = time.perf_counter() - self.t0
        rate = rows / dt if dt > 0 else 0.0
        left = f"~{(self.total - rows) / rate:.0f}s left" if rate > 0 and rows < self.total else ""
        return f"infer: {rows}/{self.total} rows ({rows / self.total:.0%}), {rate:,.1f} rows/s {left}"

    def show(self) -> None:
        try:
            rows = ray.get(self.counter.value.remote(), timeout=5)
        except Exception:  # a slow poll is not worth failing the job for
            return
        self.stream.write(("\r" + self.line(rows) + "   ") if self.tty else self.line(rows) + "\n")
        self.stream.flush()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.show()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.show()
        if self.tty:
            self.stream.write("\n")
