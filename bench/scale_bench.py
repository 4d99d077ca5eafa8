"""What the `raycv infer` driver costs as the input grows: its peak RSS, its RSS once the pipeline
is done, its own CPU seconds (the Ray processes' are not counted), and the time from the start of
the run to the first prediction, on Parquet inputs of tiny encoded images (N rows) and on a folder
of small image files.

Each size runs in a fresh driver process (`python bench/scale_bench.py --one ...`), with its own
local Ray instance, so its peak RSS is its own. The inputs are generated once into --work and
reused. The model is the seed's small CNN at 32 px: the point is the driver, not the forward pass.

    python bench/scale_bench.py --rows 20000,500000,2000000 --folder 200000
    python bench/scale_bench.py --rows 2000,20000 --folder 2000          # quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

TILES = 256  # distinct images; ids are unique, bytes repeat


def _tiles() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(TILES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_parquet(root: Path, rows: int, per_file: int = 250_000) -> Path:
    """`rows` tiny PNGs with unique ids, in files of at most `per_file` rows (row groups of 50,000)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / f"parquet-{rows}"
    if (folder / "_done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tiles = _tiles()
    for f, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        ids = pa.array([f"img-{i:010d}" for i in range(start, start + n)])
        images = pa.array([tiles[i % TILES] for i in range(start, start + n)], type=pa.binary())
        pq.write_table(pa.table({"path": ids, "image": images}), folder / f"in-{f:05d}.parquet", row_group_size=50_000)
    (folder / "_done").write_text("")
    return folder


def make_folder(root: Path, files: int, per_dir: int = 1000) -> Path:
    folder = root / f"folder-{files}"
    if (root / f"folder-{files}.done").exists():
        return folder
    tiles = _tiles()
    for i in range(files):
        d = folder / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:08d}.png").write_bytes(tiles[i % TILES])
    (root / f"folder-{files}.done").write_text("")
    return folder


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(checkpoint: str, input: str, output: str, extra: list[str]) -> None:
    """In a fresh process: one `raycv infer` run in this driver; prints one JSON line."""
    from raycv.config import load_config
    from raycv.inference.pipeline import run_inference

    import threading

    t0 = time.perf_counter()
    first_commit: list[float] = []

    def watch() -> None:  # the first committed part (a sidecar in _shards/): progress a crash keeps
        shards = Path(output) / "_shards"
        while not first_commit and not done.is_set():
            if shards.is_dir() and any(shards.glob("part-*.json")):
                first_commit.append(time.perf_counter() - t0)
            time.sleep(0.2)

    done = threading.Event()
    threading.Thread(target=watch, daemon=True).start()
    s = run_inference(load_config("infer", None, [f"infer.checkpoint={checkpoint}", f"infer.input={input}",
                                                  f"infer.output={output}", "infer.batch_size=1024", *extra]))
    wall = time.perf_counter() - t0
    done.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rows": s.rows, "wall_s": round(wall, 1), "first_prediction_s": s.first_prediction_s,
                      "first_commit_s": round(first_commit[0], 1) if first_commit else None,
                      "driver_peak_rss_mib": round(usage.ru_maxrss / 1024), "driver_rss_after_mib": round(_rss_mib()),
                      "driver_cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="20000,500000,2000000", help="Parquet input sizes (comma-separated)")
    ap.add_argument("--folder", type=int, default=200_000, help="files in the folder input (0: none)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "raycv-scale-bench"),
                    help="where the generated inputs are kept between runs")
    ap.add_argument("--json", default="bench/results/scale.json")
    ap.add_argument("--one", nargs=3, metavar=("CHECKPOINT", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra infer.* overrides for every run")
    args = ap.parse_args()
    if args.one:
        return one(*args.one, args.overrides)

    from _report import report

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from infer_bench import make_checkpoint

    ckpt = work / "ckpt"
    if not (ckpt / "raycv.json").exists():
        make_checkpoint(ckpt, 32, "simple_cnn")
    inputs = [(f"Parquet, {n:,} rows", make_parquet(work, n)) for n in map(int, args.rows.split(",")) if n]
    if args.folder:
        inputs.append((f"folder, {args.folder:,} files", make_folder(work, args.folder)))
    rows = []
    for name, path in inputs:
        out = Path(tempfile.mkdtemp(prefix="raycv-scale-out-")) / "preds"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([sys.executable, __file__, "--one", str(ckpt), str(path), str(out), *args.overrides],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{name}: raycv infer failed:\n{r.stderr[-3000:]}")
        rows.append({"input": name, **json.loads(r.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    report("raycv infer's driver as the input grows (simple_cnn, 32 px, batch 1,024)", rows,
           ["input", "rows", "wall_s", "first_prediction_s", "first_commit_s", "driver_peak_rss_mib", "driver_rss_after_mib", "driver_cpu_s"],
           args.json, {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
