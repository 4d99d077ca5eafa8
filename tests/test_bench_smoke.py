"""Benchmarks are not tests; these tiny smokes only keep the inference benchmark scripts working."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_infer_bench_smoke(tmp_path):
    """The DataLoader script against `raycv infer` on a running head (`ray start --head`, then
    RAY_ADDRESS): both whole commands, labels compared on every image."""
    out = tmp_path / "infer.json"
    r = subprocess.run([sys.executable, "bench/infer_bench.py", "--images", "8", "--scale", "2", "--size", "32", "--json", str(out),
                        "--only", "warm"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [row["contender"] for row in rows] == ["DataLoader script (2 decode workers)", "raycv infer (Ray already running)"]
    assert [row["labels_differ"] for row in rows] == [0, 0] and rows[0]["end_to_end_ratio"] == 1.0
    assert all(row["end_to_end_s"] > 0 and row["first_prediction_s"] > 0 for row in rows)
    assert 0 < rows[1]["ray_up_s"] < rows[1]["model_loaded_s"] <= rows[1]["first_prediction_s"]


@pytest.mark.slow
def test_infer_cpu_bench_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    r = subprocess.run([sys.executable, "bench/infer_cpu.py", "--images", "8", "--size", "32", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["cpu_seconds"] > 0 and any(row["role"].startswith("predictor actor") for row in rows)


@pytest.mark.slow
def test_scale_bench_smoke(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, "bench/scale_bench.py", "--rows", "300", "--folder", "50", "--work",
                        str(tmp_path / "work"), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(row["input"], row["rows"]) for row in rows] == [("Parquet, 300 rows", 300), ("folder, 50 files", 50)]
    assert all(0 < row["first_prediction_s"] <= row["wall_s"] and row["driver_peak_rss_mib"] > 100 for row in rows)
