"""Run several `raycv` invocations one after another in this one process, as a long-lived driver
would: they share one local Ray instance (started by the first), so later ones find warm worker
processes. Invocations are separated by a lone `--`; one JSON line is printed at the end:
[{"rc", "stdout", "stderr"}, ...]. Stops at the first invocation that fails."""

from __future__ import annotations

import contextlib
import io
import json
import sys


def main(argv: list[str]) -> None:
    from raycv.cli import main as raycv

    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    results = []
    for args in groups:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = raycv(args)
            except SystemExit as e:
                rc = e.code
        results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
        if rc != 0:
            break
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
