"""Live progress on the driver: a tqdm bar on a terminal, a plain line every so often otherwise.

A job's log (not a terminal) would fill with a bar's carriage returns; it gets one readable line
every `log_every_s` seconds instead. Training and inference both report through `Live`.
"""

from __future__ import annotations

import sys
import time


class Live:
    def __init__(self, *, unit: str, stream=None, log_every_s: float = 30.0):
        self.unit, self.stream = unit, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every_s = log_every_s
        self.bar = None
        self._desc = None
        self._last_log = time.monotonic()

    def update(self, *, n: int, total: int, desc: str, postfix: str = "", line: str) -> None:
        """Show `n` of `total` done. `line` is the whole plain-text report for a log."""
        if not self.tty:
            if time.monotonic() - self._last_log >= self.log_every_s:
                self._last_log = time.monotonic()
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        if self.bar is None or self._desc != desc or self.bar.total != total:
            from tqdm import tqdm

            self.close()
            # `initial`: what was done before the bar existed does not count towards its rate
            self.bar = tqdm(total=total, initial=min(n, total), desc=desc, unit=self.unit, unit_scale=total >= 10_000,
                            file=self.stream, leave=False, dynamic_ncols=True, smoothing=0.1)
            self._desc = desc
        self.bar.update(max(0, min(n, total) - self.bar.n))  # tqdm measures the rate and time left
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        """Remove the bar (before printing a line of its own, or at the end)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
