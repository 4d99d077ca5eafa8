"""Jobs against a real `ray start --head` on loopback with Ray's token authentication on:
`ray job submit` and `raycv submit` / `raycv jobs` run train, infer and evaluate jobs (a segmentation
model trained as a job; detection inference and evaluation; classification's run through the same
entrypoints in other tests), follow and stop them; without the token every request is refused.

The head gets its own temp dir and ports (other Ray instances may run on this host), is started
with --block in its own process group, and only that group is stopped afterwards: never `ray stop`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.head import RAY, Head, clean_env

REPO = Path(__file__).parents[1]
# A line of Ray's own logging: the C++ core's "[2026-12-01 04:02:47,232 E 5871 5871] core_worker.cc:..."
# or Python's "... WARNING authentication_token_setup.py:85 -- ..."
RAY_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWEF] \d+ \d+\]|\b(WARNING|ERROR)\b.* -- ", re.M)


def _env(token_path: str | None) -> dict[str, str]:
    return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path) if token_path else clean_env()


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="rcj-"))
    token = uuid.uuid4().hex
    token_path = temp / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    h = Head(temp, _env(str(token_path)), "--node-ip-address=127.0.0.1", token=token)
    yield h
    h.stop()


def _ray_job_submit(head: Head, job_id: str, *entrypoint: str) -> tuple[str, str]:
    """The real `ray job submit` CLI (it waits and streams the logs); -> (final status, output)."""
    r = subprocess.run([RAY, "job", "submit", "--address", head.address, "--submission-id", job_id, "--working-dir",
                        str(REPO), "--", "python", *entrypoint], capture_output=True, text=True, timeout=300,
                       cwd=REPO, env=head.env)
    return str(head.client().get_job_status(job_id).value), r.stdout + r.stderr


def _raycv(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycv.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def trained(head, tmp_path_factory) -> Path:
    """One training job through `ray job submit` (semantic segmentation on generated scenes), shared
    by the tests below."""
    runs = tmp_path_factory.mktemp("job-runs")
    status, out = _ray_job_submit(head, "raycv-train", "jobs/train.py", "--config", "jobs/configs/shapes_segmentation.yaml",
                                  "train.epochs=1", "scaling.num_workers=1", "data.num_samples=200",
                                  "data.input_size=32", f"run.storage_path={runs}", "run.name=job")
    assert status == "SUCCEEDED", out[-3000:]
    logs = head.client().get_job_logs("raycv-train")
    assert "done: val mIoU" in logs and not RAY_LOG_LINE.search(logs), logs[-3000:]  # only raycv's own lines
    return runs / "job"


@pytest.mark.slow
def test_ray_job_submit_runs_the_training_entrypoint(trained):
    """`ray job submit ... -- python jobs/train.py ...` (the `trained` fixture) wrote a whole run;
    jobs/infer.py runs through `raycv submit` below, which submits that same entrypoint."""
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["epochs"] == 1 and Path(summary["best_checkpoint"], "model.pt").is_file()
    assert summary["task"] == "segmentation" and "val_miou" in summary["metrics"]
    assert (trained / "curves.png").is_file()


@pytest.mark.slow
def test_raycv_submit_wait_list_status_logs(head, trained, tmp_path):
    r = _raycv("submit", "--address", head.address, "--wait", "--submission-id", "rcv-infer-1",
               "--entrypoint-num-cpus", "0.25", "--env", "RAYCV_JOB_MARK=seen",
               "infer", "--checkpoint", str(trained), "--input", "registry:shapes_segmentation:val",
               "--output", str(tmp_path / "preds"), "data.num_samples=200", env=head.env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "job rcv-infer-1: SUCCEEDED" in r.stdout and "40 rows" in r.stdout  # the job's own log, streamed
    assert json.loads((tmp_path / "preds" / "_raycv_manifest.json").read_text())["rows"] == 40
    info = head.client().get_job_info("rcv-infer-1")
    assert info.entrypoint == (f"python jobs/infer.py --checkpoint {trained} --input registry:shapes_segmentation:val "
                               f"--output {tmp_path / 'preds'} data.num_samples=200")
    assert info.runtime_env["env_vars"] == {"RAYCV_JOB_MARK": "seen"} and info.metadata["raycv_verb"] == "infer"

    r = _raycv("submit", "--address", head.address, "--wait", "--entrypoint-num-cpus", "0.25", "evaluate",
               "--predictions", str(tmp_path / "preds"), "--output", str(tmp_path / "eval"), env=head.env)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, (r.stdout + r.stderr)[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # masks found by the VOC layout
    assert report["scored"] == 40 and 0.0 <= report["miou"] <= 1.0 and '"miou"' in r.stdout

    listed = _raycv("jobs", "list", "--address", head.address, env=head.env)
    assert listed.returncode == 0 and any(ln.startswith("rcv-infer-1") and "SUCCEEDED" in ln
                                          for ln in listed.stdout.splitlines()), listed.stdout
    status = _raycv("jobs", "status", "rcv-infer-1", "--address", head.address, env=head.env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = _raycv("jobs", "logs", "rcv-infer-1", "--address", head.address, env=head.env)
    assert logs.returncode == 0 and "predictions:" in logs.stdout
    followed = _raycv("jobs", "logs", "rcv-infer-1", "--follow", "--address", head.address, env=head.env)
    assert followed.returncode == 0 and "predictions:" in followed.stdout
    missing = _raycv("jobs", "logs", "no-such-job", "--follow", "--address", head.address, env=head.env)
    assert missing.returncode == 2 and missing.stderr.startswith("raycv jobs: error: no job no-such-job")


@pytest.mark.slow
def test_detection_infers_and_evaluates_as_jobs(head, tmp_path):
    """Detection through the same `raycv submit` entrypoints: infer, then evaluate against the true
    boxes found beside the generated images (COCO JSON). The checkpoint is an untrained fcos_small
    written directly (training through `ray job submit` is the `trained` fixture's; training
    detection is tests/test_detection.py's), so the rows are scored, not judged."""
    from raycv.data.presets import DetectionEvalPreset
    from raycv.models import get_model
    from raycv.training import checkpoint as ckpt

    classes = ["background", "circle", "square", "triangle"]
    ckpt.write_checkpoint(tmp_path / "det", get_model("fcos_small", num_classes=4), ckpt.CheckpointInfo(
        task="detection", model_name="fcos_small", model_kwargs={"min_size": 64, "max_size": 64}, classes=classes,
        preprocess=DetectionEvalPreset(input_size=64), epoch=1, metrics={}, config={}))
    r = _raycv("submit", "--address", head.address, "--wait", "--entrypoint-num-cpus", "0.25",
               "infer", "--checkpoint", str(tmp_path / "det"), "--input", "registry:shapes_detection:val",
               "--output", str(tmp_path / "preds"), "data.num_samples=60", env=head.env)
    assert r.returncode == 0 and "12 rows" in r.stdout, (r.stdout + r.stderr)[-3000:]
    r = _raycv("submit", "--address", head.address, "--wait", "--entrypoint-num-cpus", "0.25", "evaluate",
               "--predictions", str(tmp_path / "preds"), "--output", str(tmp_path / "eval"), env=head.env)
    assert r.returncode == 0 and '"map_50"' in r.stdout, (r.stdout + r.stderr)[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["task"] == "detection" and report["scored"] == 12 and 0.0 <= report["map_50"] <= 1.0


@pytest.mark.slow
def test_raycv_submit_then_stop(head, tmp_path):
    r = _raycv("submit", "--address", head.address, "--submission-id", "rcv-long", "train", "train.epochs=200",
               "scaling.num_workers=1", f"run.storage_path={tmp_path}", env=head.env)
    assert r.returncode == 0 and "submitted rcv-long" in r.stdout, r.stderr
    assert "follow it: raycv jobs logs rcv-long --follow" in r.stdout
    stop = _raycv("jobs", "stop", "rcv-long", "--address", head.address, env=head.env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.monotonic() + 60
    while (s := str(head.client().get_job_status("rcv-long").value)) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, s
        time.sleep(1)
    assert s == "STOPPED"


@pytest.mark.slow
def test_job_that_fails_on_the_cluster_exits_nonzero(head, tmp_path):
    """Valid config, missing checkpoint: only the cluster can tell. --wait exits 1 with the one-line error."""
    r = _raycv("submit", "--address", head.address, "--wait", "infer", "--checkpoint", str(tmp_path / "nope"),
               "--input", "registry:digits:val", "--output", str(tmp_path / "p"), env=head.env)
    assert r.returncode == 1 and "FAILED" in r.stdout and "checkpoint not found" in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_submit_passes_pip_and_the_drivers_resources_to_the_job(head, tmp_path):
    """--pip, --entrypoint-num-gpus and --entrypoint-resources reach the job as Ray records it. The
    head has no GPU and no `accel` resource, so the job waits (PENDING) and is stopped: nothing runs."""
    r = _raycv("submit", "--address", head.address, "--submission-id", "rcv-resources", "--pip", "raycv-test-req==1.0",
               "--pip", "another-req", "--entrypoint-num-gpus", "1", "--entrypoint-resources", '{"accel": 2}',
               "--entrypoint-num-cpus", "0.5", "train", "train.epochs=1", f"run.storage_path={tmp_path}",
               env=head.env, timeout=60)
    assert r.returncode == 0 and "submitted rcv-resources" in r.stdout, r.stdout + r.stderr
    try:
        info = head.client().get_job_info("rcv-resources")
        pip = info.runtime_env["pip"]
        assert (pip["packages"] if isinstance(pip, dict) else pip) == ["raycv-test-req==1.0", "another-req"]
        assert str(info.status.value) == "PENDING"
        # the job's driver waits in Ray's JobSupervisor actor, which asks for what --entrypoint-* said
        r = subprocess.run([RAY, "list", "actors", "--address", head.address, "--detail", "--format", "json",
                            "--filter", "class_name=JobSupervisor"], capture_output=True, text=True, env=head.env,
                           timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        wanted = [a["required_resources"] for a in json.loads(r.stdout) if a["state"] != "DEAD"]
        assert wanted == [{"CPU": 0.5, "GPU": 1.0, "accel": 2.0}], wanted
    finally:
        head.client().stop_job("rcv-resources")
    assert not list(tmp_path.iterdir())  # it never ran


def test_bad_config_is_refused_before_submission(head):
    r = _raycv("submit", "--address", head.address, "train", "train.epoch=1", env=head.env, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("raycv submit: error: unknown config key 'train.epoch' (valid keys here: epochs, ")
    assert not any(j.entrypoint.endswith("train.epoch=1") for j in head.client().list_jobs())


def test_token_auth_refuses_requests_without_the_token(head, tmp_path):
    # HOME without .ray/auth_token: a client that finds a token file there turns token auth on (Ray >= 2.59)
    no_token = _env(None) | {"HOME": str(tmp_path)}
    for env, word in ((no_token, "Authentication required"), (no_token | {
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}, "Authentication failed")):
        r = _raycv("submit", "--address", head.address, "train", "train.epochs=1", env=env, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
        r = _raycv("jobs", "list", "--address", head.address, env=env, timeout=60)
        assert r.returncode == 2 and word in r.stderr, r.stderr
    r = subprocess.run([RAY, "job", "list", "--address", head.address], capture_output=True, text=True,
                       env=no_token, timeout=60)
    assert r.returncode != 0
    assert not any(j.entrypoint.endswith("train.epochs=1") and j.submission_id.startswith("raycv-train")
                   for j in head.client().list_jobs())


def test_rayignore_keeps_the_upload_small():
    """The uploaded working dir leaves out runs, outputs, venvs and weights, even with .gitignore off."""
    from raycv.ray_internals import upload_excludes

    ignored = upload_excludes(REPO, include_gitignore=False)
    for rel in ("runs/x/model.pt", ".venv/lib/torch.so", "outputs/p.parquet", "bench/results/r.json", "data/cifar",
                ".git/objects", "raycv/__pycache__/cli.pyc", "w.pth", ".venv-ray258/bin/python",
                # secrets
                ".env", ".env.local", "deploy/tls.pem", "keys/server.key", "certs/c.p12", ".aws/credentials",
                "credentials.json", "gcp/service-account-prod.json", ".netrc", "id_rsa", "id_ed25519.pub", "auth_token"):
        assert ignored(REPO / rel), rel
    for rel in ("raycv/data/sources.py", "jobs/train.py", "jobs/configs/digits_cnn.yaml", "cluster.yaml"):
        assert not ignored(REPO / rel), rel


@pytest.mark.slow
def test_a_plugin_travels_with_the_jobs_working_directory(head, tmp_path, monkeypatch):
    """`raycv submit --working-dir tests/plugins ... --import raycv_example_plugin`: the module is
    nowhere on the cluster's path but in the uploaded working directory, and the job's driver and
    its inference actor both import it. The checkpoint is an untrained plugin model written here."""
    from raycv.data.presets import ClassificationEvalPreset
    from raycv.models import get_model
    from raycv.training import checkpoint as ckpt

    monkeypatch.syspath_prepend(str(REPO / "tests" / "plugins"))
    import raycv_example_plugin  # noqa: F401  (registers example_tinynet here, to write the checkpoint)

    classes = ["horizontal", "vertical"]
    ckpt.write_checkpoint(tmp_path / "plug", get_model("example_tinynet", num_classes=2), ckpt.CheckpointInfo(
        task="classification", model_name="example_tinynet", model_kwargs={}, classes=classes,
        preprocess=ClassificationEvalPreset(input_size=32, resize_size=32), epoch=1, metrics={}, config={}))
    r = _raycv("submit", "--address", head.address, "--wait", "--entrypoint-num-cpus", "0.25",
               "--working-dir", str(REPO / "tests" / "plugins"), "infer", "--import", "raycv_example_plugin",
               "--checkpoint", str(tmp_path / "plug"), "--input", "registry:example_stripes:val",
               "--output", str(tmp_path / "preds"), env=head.env)
    assert r.returncode == 0 and "40 rows (40 ok, 0 errors)" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert json.loads((tmp_path / "preds" / "_raycv_manifest.json").read_text())["rows"] == 40


@pytest.mark.slow
def test_a_search_runs_as_a_job(head, tmp_path):
    """`raycv submit tune` on the head: jobs/tune.py runs the search on the cluster the job is given
    (two 1-epoch trials, one at a time, their values chosen by Optuna) and writes its results where
    the recipe says."""
    r = _raycv("submit", "--address", head.address, "--wait", "--submission-id", "rcv-tune-1",
               "--entrypoint-num-cpus", "0.25", "tune", "--config", "jobs/configs/digits_tune.yaml",
               "tune.num_samples=2", "train.epochs=1", "tune.search=optuna", f"run.storage_path={tmp_path}",
               "run.name=search", env=head.env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "job rcv-tune-1: SUCCEEDED" in r.stdout and "best: trial" in r.stdout, r.stdout[-3000:]
    assert "search optuna" in r.stdout and list((tmp_path / "search" / "tune").glob("searcher-state-*.pkl"))  # Optuna's
    assert not list((tmp_path / "search" / "tune").glob("basic-variant-state-*"))  # not the random search's
    table = pq.read_table(tmp_path / "search" / "tune_results.parquet").to_pylist()
    assert len(table) == 2 and all(t["status"] == "done" and t["epochs"] == 1 for t in table), table
    assert all(1e-5 <= t["param.optim.lr"] <= 0.1 and t["param.data.augment"] in ("none", "light") for t in table)
    assert (tmp_path / "search" / "best_config.yaml").is_file()
    assert head.client().get_job_info("rcv-tune-1").metadata["raycv_verb"] == "tune"
