"""What a search costs against running its trials by hand: `raycv tune` (one Ray instance for every
trial, ASHA stopping the trials that fall behind) against N separate `raycv train` commands with
the same sampled values, each run to the end, one after the other (what a user does without a
search tool). Both wall clocks whole, in one run; prints the ratio and writes results/tune.json.

    python bench/tune_bench.py [--config jobs/configs/digits_tune.yaml] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[1]


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "raycv.cli", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: raycv {' '.join(args)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "jobs" / "configs" / "digits_tune.yaml"))
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp folder, removed)")
    a = ap.parse_args()
    import pyarrow.parquet as pq

    out = Path(a.out or tempfile.mkdtemp(prefix="tune-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    search_s, printed = timed(["tune", "--config", a.config, f"run.storage_path={out}", "run.name=search"], out)
    trials = pq.read_table(out / "search" / "tune_results.parquet").to_pylist()
    import yaml

    recipe = yaml.safe_load(Path(a.config).read_text())
    recipe.pop("tune", None)  # the same training recipe, as `raycv train` takes it
    (out / "train.yaml").write_text(yaml.safe_dump(recipe))
    separate = []
    for t in trials:
        overrides = [f"{k.removeprefix('param.')}={v}" for k, v in t.items() if k.startswith("param.")]
        s, _ = timed(["train", "--config", str(out / "train.yaml"), *overrides, f"run.storage_path={out}/separate",
                      f"run.name={t['trial_id']}"], out)
        separate.append(s)
    result = {"trials": len(trials), "stopped_early": sum(t["stopped_early"] for t in trials),
              "search_s": round(search_s, 1), "separate_s": round(sum(separate), 1),
              "separate_each_s": [round(s, 1) for s in separate],
              "ratio_separate_over_search": round(sum(separate) / search_s, 2),
              "best": max(t[k] for t in trials for k in t if k.startswith("best_"))}
    print(printed)
    print(json.dumps(result))
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copy(out / "search" / "tune.png", REPO / "bench" / "results" / "tune.png")
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
