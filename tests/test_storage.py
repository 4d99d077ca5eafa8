"""Shared storage: training, resume and inference with every path on an S3-compatible server
(moto in server mode on loopback), credentials from the environment. The CLI runs in a child
process that starts its own local Ray (one for the three verbs, tests/helpers/cli_session.py), so
the Ray workers inherit the endpoint and keys as they would from a cluster's environment. The fake
keys must never reach run files or Parquet metadata."""

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


SESSION = Path(__file__).parent / "helpers" / "cli_session.py"


def _cli_session(env, cwd, *invocations: list[str]) -> list[dict]:
    """Each invocation's {"rc", "stdout", "stderr"}, run in order in one child process (one local Ray)."""
    argv = [a for inv in invocations for a in ("--", *inv)][1:]
    r = subprocess.run([sys.executable, str(SESSION), *argv], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for res in results:
        assert res["rc"] == 0, (res["stdout"] + res["stderr"])[-3000:]
    assert len(results) == len(invocations)
    return results


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def test_a_checkpoint_on_object_storage_is_described_without_copying_it(s3, tmp_path, monkeypatch):
    """`read_info` (what a driver joining a running instance reads: the actors load the weights)
    reads raycv.json where it is, and still says in one line what is missing."""
    from conftest import untrained_checkpoint

    from raycv.errors import UserError
    from raycv.training import checkpoint as ckpt

    fs, env = s3
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.setenv(k, env[k])
    local = untrained_checkpoint(tmp_path / "ckpt")
    for f in local.iterdir():
        with fs.open_output_stream(f"raycv/ckpts/c1/{f.name}") as out:
            out.write(f.read_bytes())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))  # where a copy of the folder would go

    info = ckpt.read_info("s3://raycv/ckpts/c1")
    assert (info.model_name, info.classes, info.preprocess.input_size) == ("resnet18_cifar", ["a", "b", "c"], 32)
    assert list(scratch.iterdir()) == []  # nothing copied

    with pytest.raises(UserError, match=r"^checkpoint not found: s3://raycv/ckpts/none$"):
        ckpt.read_info("s3://raycv/ckpts/none")
    fs.delete_file("raycv/ckpts/c1/model.pt")
    with pytest.raises(UserError, match=r"^not a raycv checkpoint: s3://raycv/ckpts/c1 lacks model.pt$"):
        ckpt.read_info("s3://raycv/ckpts/c1")
    with fs.open_output_stream("raycv/ckpts/c1/raycv.json") as out:
        out.write(b'{"task": "classification", "classes": 3}')
    with pytest.raises(UserError, match=r"^not a raycv checkpoint: s3://raycv/ckpts/c1/raycv.json: .+"):
        ckpt.read_info("s3://raycv/ckpts/c1")
    fs.delete_file("raycv/ckpts/c1/raycv.json")
    with pytest.raises(UserError, match=r"^not a raycv checkpoint: s3://raycv/ckpts/c1 lacks raycv.json$"):
        ckpt.read_info("s3://raycv/ckpts/c1")
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_train_resume_and_infer_on_object_storage(s3, image_tree, tmp_path):
    fs, env = s3
    pafs.copy_files(str(image_tree), "raycv/data/tree", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    common = ["data.name=image_folder", "data.root=s3://raycv/data/tree", "scaling.num_workers=1",
              "run.storage_path=s3://raycv/runs", "run.name=s3run", "data.batch_size=8"]
    first, resumed, inferred, evaluated, drawn = _cli_session(
        env, tmp_path, ["train", *common, "train.epochs=1"],
        ["train", *common, "train.epochs=2"],  # the same run.name resumes from storage
        ["infer", "--checkpoint", "s3://raycv/runs/s3run", "--input", "s3://raycv/data/tree/val",
         "--output", "s3://raycv/preds"],
        ["evaluate", "--predictions", "s3://raycv/preds", "--output", "s3://raycv/eval"],
        ["draw", "--predictions", "s3://raycv/preds", "--output", "s3://raycv/drawn", "--limit", "3"])
    assert "run directory:   s3://raycv/runs/s3run" in first["stdout"] and not (tmp_path / "runs").exists()
    assert ", 1 epochs," in first["stdout"]  # the first run's `done:` line; summary.json is the resumed run's now
    summary = json.loads(_read(fs, "raycv/runs/s3run/summary.json"))
    assert summary["best_checkpoint"].startswith("s3://raycv/runs/s3run/checkpoint_epoch_")
    assert fs.get_file_info("raycv/runs/s3run/checkpoint_epoch_0001/model.pt").type == pafs.FileType.File

    assert "resumed from the epoch-1 checkpoint" in resumed["stdout"]
    log = [json.loads(ln) for ln in _read(fs, "raycv/runs/s3run/metrics.jsonl").splitlines()]
    assert [m["epoch"] for m in log] == [1, 2]
    assert json.loads(_read(fs, "raycv/runs/s3run/summary.json"))["epochs"] == 2
    events = fs.get_file_info(pafs.FileSelector("raycv/runs/s3run/tensorboard"))  # uploaded after each epoch
    assert any("tfevents" in e.base_name and e.size > 0 for e in events)

    manifest = json.loads(_read(fs, "raycv/preds/_raycv_manifest.json"))
    table = pq.read_table("raycv/preds", filesystem=fs)
    assert manifest["rows"] == table.num_rows == 8 and manifest["errors"] == 0
    assert sorted(table.column("path").to_pylist()) == sorted(
        f"s3://raycv/data/tree/val/{c}/{i}.{'png' if i % 2 else 'jpg'}" for c in ("cat", "dog") for i in range(4))
    assert table.schema.metadata[b"raycv.checkpoint"].decode().startswith("s3://raycv/runs/s3run/checkpoint_epoch_")

    # evaluate and draw write to the object store too, not to a local folder named "s3:"
    report = json.loads(_read(fs, "raycv/eval/metrics.json"))
    assert report["scored"] == 8 and json.loads(evaluated["stdout"].splitlines()[0])["top1"] == report["top1"]
    with fs.open_input_stream("raycv/eval/confusion_matrix.png") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pngs = [i for i in fs.get_file_info(pafs.FileSelector("raycv/drawn")) if i.base_name.endswith(".png")]
    assert len(pngs) == 3 and all(i.size > 1000 for i in pngs) and "drew 3 image(s)" in drawn["stdout"]
    assert not list(tmp_path.glob("s3*"))

    # The keys were in every process's environment; none of them may be written down.
    for info in fs.get_file_info(pafs.FileSelector("raycv", recursive=True)):
        if info.type == pafs.FileType.File and not info.path.startswith("raycv/data/"):
            with fs.open_input_stream(info.path) as f:
                blob = f.read()
            assert SECRET.encode() not in blob and KEY_ID.encode() not in blob, info.path
    assert all(SECRET not in res["stdout"] + res["stderr"] for res in (first, resumed, inferred, evaluated, drawn))


@pytest.mark.slow
def test_training_streams_webdataset_shards_from_object_storage(s3, tmp_path):
    """Shards on S3: read by Ray Data's WebDataset reader in the workers, counted from their headers."""
    from helpers.shards import write_digit_shards

    fs, env = s3
    counts = write_digit_shards(tmp_path / "wds")
    pafs.copy_files(str(tmp_path / "wds"), "raycv/wds", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    (trained,) = _cli_session(env, tmp_path, ["train", "data.name=webdataset", "data.root=s3://raycv/wds",
                                              "scaling.num_workers=1", "train.epochs=1", f"run.storage_path={tmp_path}",
                                              "run.name=wds-run"])
    log = [json.loads(ln) for ln in (tmp_path / "wds-run" / "metrics.jsonl").read_text().splitlines()]
    assert "done: val top-1" in trained["stdout"] and len(log) == 1
    assert log[0]["val_count"] == counts["val"] and log[0]["train_images"] == counts["train"]


@pytest.mark.slow
def test_an_fsdp_run_writes_its_shards_to_object_storage_resumes_and_is_consolidated(s3, tmp_path):
    """scaling.strategy=fsdp with run.storage_path on S3: each rank uploads its own shard into the
    one checkpoint folder, rank 0 the metadata; the run resumes from there on 1 worker; the
    checkpoint is consolidated and inferred with straight from S3."""
    fs, env = s3
    common = ["data.name=digits", "model.name=vit_b_16", "data.input_size=32", "scaling.strategy=fsdp",
              "model.kwargs={image_size: 32, patch_size: 8, num_layers: 2, num_heads: 2, hidden_dim: 32, mlp_dim: 64}",
              "optim.lr=0.003", "run.storage_path=s3://raycv/runs", "run.name=fsdp"]
    c1 = "s3://raycv/runs/fsdp/checkpoint_epoch_0001"
    _, _, consolidated, _ = _cli_session(
        env, tmp_path, ["train", *common, "train.epochs=1", "scaling.num_workers=2"],
        ["train", *common, "train.epochs=2", "scaling.num_workers=1"],
        ["consolidate", "--checkpoint", c1, "--output", str(tmp_path / "plain")],
        ["infer", "--checkpoint", c1, "--input", "registry:digits:val", "--output", "s3://raycv/fsdp-preds"])
    meta = json.loads(_read(fs, "raycv/runs/fsdp/checkpoint_epoch_0001/raycv.json"))
    assert meta["sharded"]["world_size"] == 2
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
    for name, recorded in meta["files"].items():  # every rank's file arrived whole
        assert fs.get_file_info(f"raycv/runs/fsdp/checkpoint_epoch_0001/{name}").size == recorded["bytes"], name
    log = [json.loads(ln) for ln in _read(fs, "raycv/runs/fsdp/metrics.jsonl").splitlines()]
    assert [m["epoch"] for m in log] == [1, 2] and [m["started_at_epoch"] for m in log] == [1, 2]
    assert "consolidated vit_b_16 (epoch 1, 2 shards)" in consolidated["stdout"]
    assert (tmp_path / "plain" / "model.pt").is_file()
    rows = pq.read_table("raycv/fsdp-preds", filesystem=fs).to_pylist()
    top1 = sum(r["label"] == r["path"].rsplit("/", 2)[-2] for r in rows) / len(rows)
    assert len(rows) == 359 and top1 == pytest.approx(log[0]["val_accuracy"], abs=1e-12)
