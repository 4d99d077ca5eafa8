"""Printing a benchmark's table and saving it as JSON, the same way for every script."""

from __future__ import annotations

import json
from pathlib import Path


def _cell(r: dict, c: str) -> str:
    v = r.get(c)
    return "-" if v is None else str(v)


def report(title: str, rows: list[dict], columns: list[str], json_path: str, meta: dict) -> None:
    widths = {c: max(len(c), *(len(_cell(r, c)) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) if i == 0 else c.rjust(widths[c]) for i, c in enumerate(columns)))
    for r in rows:
        print("  ".join(_cell(r, c).ljust(widths[c]) if i == 0 else _cell(r, c).rjust(widths[c])
                        for i, c in enumerate(columns)))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({**meta, "title": title, "results": rows}, indent=1))
