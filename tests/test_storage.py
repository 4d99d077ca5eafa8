"""Shared storage: training, resume and inference with every path on an S3-compatible server
(moto in server mode on loopback), credentials from the environment. The CLI runs in child
processes that start their own local Ray, so the Ray workers inherit the endpoint and keys as they
would from a cluster's environment. The fake keys must never reach run files or Parquet metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

SECRET = "raycvFakeSecretKey0123456789abcdefghijkl"
KEY_ID = "AKIARAYCVFAKEKEY0001"


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://127.0.0.1:%d" % server._server.server_address[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key=KEY_ID, secret_key=SECRET, region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("raycv")
    yield fs, env
    server.stop()


def _cli(env, cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycv.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=400)


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@pytest.mark.slow
def test_train_resume_and_infer_on_object_storage(s3, image_tree, tmp_path):
    fs, env = s3
    pafs.copy_files(str(image_tree), "raycv/data/tree", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    common = ["data.name=image_folder", "data.root=s3://raycv/data/tree", "scaling.num_workers=1",
              "run.storage_path=s3://raycv/runs", "run.name=s3run", "data.batch_size=8"]
    r = _cli(env, tmp_path, "train", *common, "train.epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run directory:   s3://raycv/runs/s3run" in r.stdout and not (tmp_path / "runs").exists()
    summary = json.loads(_read(fs, "raycv/runs/s3run/summary.json"))
    assert summary["epochs"] == 1 and summary["best_checkpoint"].startswith("s3://raycv/runs/s3run/checkpoint_epoch_")
    assert fs.get_file_info("raycv/runs/s3run/checkpoint_epoch_0001/model.pt").type == pafs.FileType.File

    r = _cli(env, tmp_path, "train", *common, "train.epochs=2")  # the same run.name resumes from storage
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from the epoch-1 checkpoint" in r.stdout
    log = [json.loads(ln) for ln in _read(fs, "raycv/runs/s3run/metrics.jsonl").splitlines()]
    assert [m["epoch"] for m in log] == [1, 2]
    assert json.loads(_read(fs, "raycv/runs/s3run/summary.json"))["epochs"] == 2
    events = fs.get_file_info(pafs.FileSelector("raycv/runs/s3run/tensorboard"))  # uploaded after each epoch
    assert any("tfevents" in e.base_name and e.size > 0 for e in events)

    r = _cli(env, tmp_path, "infer", "--checkpoint", "s3://raycv/runs/s3run", "--input", "s3://raycv/data/tree/val",
             "--output", "s3://raycv/preds")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads(_read(fs, "raycv/preds/_raycv_manifest.json"))
    table = pq.read_table("raycv/preds", filesystem=fs)
    assert manifest["rows"] == table.num_rows == 8 and manifest["errors"] == 0
    assert sorted(table.column("path").to_pylist()) == sorted(
        f"s3://raycv/data/tree/val/{c}/{i}.{'png' if i % 2 else 'jpg'}" for c in ("cat", "dog") for i in range(4))
    assert table.schema.metadata[b"raycv.checkpoint"].decode().startswith("s3://raycv/runs/s3run/checkpoint_epoch_")

    # The keys were in every process's environment; none of them may be written down.
    for info in fs.get_file_info(pafs.FileSelector("raycv", recursive=True)):
        if info.type == pafs.FileType.File and not info.path.startswith("raycv/data/"):
            with fs.open_input_stream(info.path) as f:
                blob = f.read()
            assert SECRET.encode() not in blob and KEY_ID.encode() not in blob, info.path
    assert SECRET not in r.stdout + r.stderr
