"""`ray job submit` against a real `ray start --head` on loopback: train, then infer, both SUCCEEDED.

The head gets its own temp dir and ports (other Ray instances may run on this host), is started
with --block in its own process group, and only that group is stopped afterwards: never `ray stop`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    ports = {name: _free_port() for name in ("gcs", "dashboard", "agent", "metrics", "runtime_env", "client")}
    temp = tempfile.mkdtemp(prefix="rcj-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--dashboard-agent-listen-port={ports['agent']}", f"--metrics-export-port={ports['metrics']}",
         f"--runtime-env-agent-port={ports['runtime_env']}", f"--ray-client-server-port={ports['client']}",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed: {(Path(temp) / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)  # our head and its children only
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _submit(address: str, job_id: str, *entrypoint: str) -> tuple[str, str]:
    """The real `ray job submit` CLI (it waits and streams the logs); -> (final status, output)."""
    from ray.job_submission import JobSubmissionClient

    r = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir",
                        str(REPO), "--", sys.executable, *entrypoint], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    status = JobSubmissionClient(address).get_job_status(job_id)
    return str(status.value), r.stdout + r.stderr


@pytest.mark.slow
def test_ray_job_submit_train_then_infer(head, tmp_path):
    status, out = _submit(head, "raycv-train", "jobs/train.py", "train.epochs=1", "scaling.num_workers=1",
                  f"run.storage_path={tmp_path / 'runs'}", "run.name=job")
    assert status == "SUCCEEDED", out[-3000:]
    summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert summary["epochs"] == 1 and Path(summary["best_checkpoint"], "model.pt").is_file()

    status, out = _submit(head, "raycv-infer", "jobs/infer.py", "--checkpoint", str(tmp_path / "runs" / "job"),
                  "--input", "registry:digits:val", "--output", str(tmp_path / "preds"))
    assert status == "SUCCEEDED", out[-3000:]
    manifest = json.loads((tmp_path / "preds" / "_raycv_manifest.json").read_text())
    assert manifest["rows"] == 359 and manifest["errors"] == 0


@pytest.mark.slow
def test_failing_job_reports_failed(head, tmp_path):
    status, out = _submit(head, "raycv-bad", "jobs/train.py", "train.epoch=1")
    assert status == "FAILED" and "unknown config key 'train.epoch'" in out
