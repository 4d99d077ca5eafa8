"""What inference does when things go wrong: a predictor actor or the driver killed mid-run, an
output location that cannot be written, Parquet inputs with missing or wrong-typed columns, ids
that try to climb out of the output folder. Each guarantee is checked on real files and real Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import N_MANY, ray_processes, untrained_checkpoint

from raycv.cli import main
from raycv.config import load_config
from raycv.inference.output import read_output
from raycv.inference.pipeline import run_inference

N_IMAGES = N_MANY


def _all_inputs(images: Path) -> set[str]:
    return {str(p) for p in images.rglob("*.png")}


@pytest.mark.slow
def test_killed_predictor_actor_every_input_exactly_once(ray_session, many_images, tmp_path):
    ckpt, images = many_images
    cfg = load_config("infer", None, [f"infer.checkpoint={ckpt}", f"infer.input={images}",
                                      f"infer.output={tmp_path / 'out'}", "infer.batch_size=16"])
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(s=run_inference(cfg)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (actors := ray_processes("ModelActor")):
        assert time.monotonic() < deadline and thread.is_alive(), "no predictor actor appeared"
        time.sleep(0.1)
    time.sleep(3)  # let it load the model and predict some batches
    assert thread.is_alive(), "inference ended before the kill: make the input larger"
    victim = actors[0]
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert "s" in result, "inference did not finish after the actor was killed"
    assert not victim.is_running()
    table = read_output(str(tmp_path / "out"))
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N_IMAGES and set(paths) == _all_inputs(images)
    assert table.column("error").null_count == N_IMAGES


@pytest.mark.slow
def test_killed_driver_then_resume_processes_only_the_uncommitted_inputs(many_images, tmp_path):
    """SIGKILL `raycv infer` and its local Ray at about half of a run (shards of 500 inputs, parts
    committed every 100 rows), then re-run with infer.mode=resume: the parts committed before the
    kill are reused (shards in flight included: their committed ids are read back), the resumed run
    predicts exactly the inputs they lack, and the output holds each input once, debris gone."""
    import psutil

    ckpt, images = many_images
    out = tmp_path / "out"
    args = [sys.executable, "-m", "raycv.cli", "infer", "--checkpoint", str(ckpt), "--input", str(images),
            "--output", str(out), "infer.batch_size=16", "infer.rows_per_file=500", "infer.commit_rows=100"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}  # a user's shell
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = out / "_shards"
    deadline = time.monotonic() + 180
    while len(list(shards.glob("part-*.json"))) < 6:  # parts of about 100 rows, of 3 shards
        assert time.monotonic() < deadline and proc.poll() is None, "the first run never got going"
        time.sleep(0.05)
    family = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-write
    _, alive = psutil.wait_procs([p if isinstance(p, psutil.Process) else psutil.Process(p.pid) for p in family],
                                 timeout=30)
    assert not alive, alive
    assert not (out / "_raycv_manifest.json").exists()  # nothing was passed off as complete
    with pytest.raises(Exception, match="not a complete raycv output"):
        read_output(str(out))
    sidecars = [json.loads(f.read_text()) for f in shards.glob("part-*.json")]
    committed = sum(side["rows"] for side in sidecars)
    assert 0 < committed < N_IMAGES and all((shards / side["name"]).exists() for side in sidecars)
    assert max(side["rows"] for side in sidecars) < 500  # committed before a shard was whole

    r = subprocess.run([*args, "infer.mode=resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # Quiet: raycv's progress lines only (Ray's token-auth warning and its core worker's error-level
    # line about actor constructor arguments stay in Ray's log folder)
    assert r.stderr and all(ln.startswith("infer: ") for ln in r.stderr.splitlines()), r.stderr[-2000:]
    manifest = json.loads((out / "_raycv_manifest.json").read_text())
    assert manifest["runs"][-1] | {"run": ""} == {"run": "", "mode": "resume", "rows": N_IMAGES - committed,
                                                 "reused": committed}
    table = read_output(str(out))
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N_IMAGES and set(paths) == _all_inputs(images)
    assert not shards.exists() and not list(out.glob("_tmp-*"))
    assert sorted(manifest["files"]) == sorted(p.name for p in out.glob("*.parquet"))
    assert len(manifest["shards"]) == 3 and all(e["rows"] == 500 for e in manifest["shards"].values())
    kept = {side["name"] for side in sidecars}
    assert kept <= set(manifest["files"])  # the committed parts were published as they were


def test_unwritable_output_is_one_line_and_nothing_is_written(ray_session, many_images, tmp_path, capsys):
    ckpt, images = many_images
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["infer", "--checkpoint", str(ckpt), "--input", str(images / "d0"), "--output", str(blocker / "preds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write to output" in err[0] and str(blocker / "preds") in err[0]
    assert blocker.read_text() == "not a folder"


def _parquet(file: Path, **columns) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), file)
    return file


def test_parquet_inputs_with_missing_or_wrong_typed_columns(ray_session, many_images, tmp_path, capsys):
    ckpt, images = many_images
    png = (images / "d0" / "0.png").read_bytes()
    cases = {
        "missing": (_parquet(tmp_path / "m" / "x.parquet", path=["a"], data=[png]), "has no column 'image'"),
        "image as text": (_parquet(tmp_path / "t" / "x.parquet", path=["a"], image=["not bytes"]),
                          "column 'image' is string, expected binary"),
        "path as float": (_parquet(tmp_path / "f" / "x.parquet", path=[1.5], image=[png]),
                          "column 'path' is double, expected string or integer ids"),
    }
    for name, (file, message) in cases.items():
        rc = main(["infer", "--checkpoint", str(ckpt), "--input", str(file.parent), "--output", str(tmp_path / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (name, err)
        assert not (tmp_path / name).exists()


def test_ids_cannot_write_outside_the_output(ray_session, many_images, tmp_path):
    """Ids are data, never file names: `../` and absolute ids stay in the `path` column."""
    ckpt, images = many_images
    png = (images / "d0" / "0.png").read_bytes()
    evil = ["../../escape", "/etc/passwd", "..", "a/../../b", "x\x00y"]
    src = _parquet(tmp_path / "in" / "x.parquet", path=evil, image=[png] * len(evil))
    work = tmp_path / "work"
    out = work / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    s = run_inference(load_config("infer", None, [f"infer.checkpoint={ckpt}", f"infer.input={src.parent}",
                                                  f"infer.output={out}"]))
    assert s.rows == len(evil) and s.errors == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == work or p == out.parent or out in (p, *p.parents) for p in created), created
    assert sorted(read_output(str(out)).column("path").to_pylist()) == sorted(evil)


def _private_mount_prefix() -> list[str] | None:
    """`unshare` arguments that give a child its own mount namespace (root, or a user namespace)."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_full_disk_is_one_line_and_nothing_is_published(many_images, tmp_path):
    """The output folder lies on a 64 KiB tmpfs mounted in a private mount namespace, and the
    output (with 512-float embeddings) needs far more. `raycv infer` runs inside that namespace
    with its own local Ray, so the Parquet writers hit ENOSPC for real: the run must end with one
    line naming the output and the cause, exit 2, and leave neither a manifest nor partial files."""
    prefix = _private_mount_prefix()
    if prefix is None:
        pytest.skip("no way to make a private mount namespace here (unshare missing or not permitted)")
    ckpt, images = many_images
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    listing = tmp_path / "listing.txt"
    out = mnt / "preds"
    script = (f'mount -t tmpfs -o size=64k tmpfs "{mnt}" || exit 97\n'
              f'"{sys.executable}" -m raycv.cli infer --checkpoint "{ckpt}" --input "{images / "d0"}" '
              f'--output "{out}" infer.embedding=true infer.batch_size=16\n'
              f'rc=$?\nfind "{mnt}" > "{listing}"\nexit $rc\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([*prefix, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 97, f"could not mount a tmpfs: {r.stderr[-500:]}"
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and f"cannot write to output {out}: no space left on device" in errors[0], errors
    assert listing.read_text().split() == [str(mnt)], listing.read_text()  # no manifest, no part files, no folder


def test_gpu_or_custom_resources_the_cluster_lacks_are_refused(ray_session, many_images, tmp_path, capsys):
    """The session cluster has 2 CPUs, no GPU, no `accel`, and no autoscaler: each request below
    would wait forever in Ray; raycv refuses it in one line before any work."""
    ckpt, images = many_images
    runs = tmp_path / "runs"
    cases = [
        (["train", "data.name=digits", "scaling.use_gpu=true", f"run.storage_path={runs}"],
         "training with 2 worker(s) x {'CPU': 1.0, 'GPU': 1.0} needs 2 GPU (it has 0)"),
        (["infer", "--checkpoint", str(ckpt), "--input", str(images / "d0"), "--output", str(tmp_path / "o1"),
          "infer.use_gpu=true"], "needs 1 GPU (it has 0)"),
        (["infer", "--checkpoint", str(ckpt), "--input", str(images / "d0"), "--output", str(tmp_path / "o2"),
          "infer.actor_resources={accel: 1}", "infer.min_actors=2", "infer.max_actors=2"],
         "needs 2 accel (it has 0)"),
    ]
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (argv, err)
        assert message in err[0] and "no autoscaler that could add them" in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not runs.exists() or not any(runs.iterdir())  # the refused training left no run directory


# -- outputs raycv did not write: refused before Ray starts, nothing touched --------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting or joining Ray."""
    from raycv import runtime

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_manifest_naming_files_outside_the_output_is_refused(no_ray, image_tree, tmp_path, capsys):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", classes=2)
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("mine")
    (out / "_raycv_manifest.json").write_text(json.dumps({"complete": True, "files": ["../victim.txt"], "rows": 1,
                                                          "errors": 0}))
    for argv in (["infer", "--checkpoint", str(ckpt), "--input", str(image_tree / "val"), "--output", str(out),
                  "infer.mode=overwrite"],
                 ["evaluate", "--predictions", str(out)],
                 ["draw", "--predictions", str(out), "--output", str(tmp_path / "drawn")]):
        assert main(argv) == 2
        assert "is not a raycv manifest: it lists '../victim.txt'" in _one_line(capsys)
    assert victim.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["_raycv_manifest.json"]


@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_an_output_holding_files_raycv_did_not_write_is_refused(no_ray, image_tree, tmp_path, capsys, mode):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", classes=2)
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), out / "mine.parquet")
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(image_tree / "val"), "--output", str(out),
                 f"infer.mode={mode}"]) == 2
    assert "holds 'mine.parquet', which raycv did not write; nothing was changed" in _one_line(capsys)
    assert [p.name for p in out.iterdir()] == ["mine.parquet"] and pq.read_table(out / "mine.parquet").num_rows == 2


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_output_overlapping_the_input_is_refused(no_ray, image_tree, tmp_path, capsys, where):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", classes=2)
    inp = image_tree / "val"
    out = {"same": inp, "inside": inp / "preds", "around": image_tree}[where]
    before = sorted(p.relative_to(image_tree) for p in image_tree.rglob("*"))
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                 "infer.mode=overwrite"]) == 2
    assert f"--output {out} overlaps --input {inp}" in _one_line(capsys)
    assert sorted(p.relative_to(image_tree) for p in image_tree.rglob("*")) == before


def _crafted(meta: dict, case: str):
    if case == "a list":
        return []
    if case == "kwargs as a list":
        meta["model"]["kwargs"] = [1, 2]
    elif case == "a huge input size":
        meta["preprocess"]["input_size"] = meta["preprocess"]["resize_size"] = 10_000_000
    elif case == "an input size the model cannot take":
        meta["preprocess"]["input_size"] = meta["preprocess"]["resize_size"] = 28  # built for 32: fc1 mismatch
    elif case == "kwargs the model refuses":
        meta["model"]["kwargs"] = {"input_size": 30}
    elif case == "no classes":
        meta["classes"] = []
    return meta


@pytest.mark.parametrize("case, message", [
    ("a list", "raycv.json: the file: Input should be a valid dictionary"),
    ("kwargs as a list", "raycv.json: model.kwargs: Input should be a valid dictionary"),
    ("a huge input size", "raycv.json: preprocess.input_size: Input should be less than or equal to 4096"),
    ("an input size the model cannot take", "'simple_cnn' cannot run on its preprocess (input_size=28)"),
    ("kwargs the model refuses", "cannot build 'simple_cnn' from its raycv.json: simple_cnn needs an input size"),
    ("no classes", "raycv.json: classes: List should have at least 1 item"),
])
def test_a_crafted_checkpoint_is_one_line(no_ray, image_tree, tmp_path, capsys, case, message):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", model="simple_cnn", classes=2)
    meta = json.loads((ckpt / "raycv.json").read_text())
    (ckpt / "raycv.json").write_text(json.dumps(_crafted(meta, case)))
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(image_tree / "val"),
                 "--output", str(tmp_path / "out")]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_summary_is_one_line(no_ray, image_tree, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{not json")
    assert main(["infer", "--checkpoint", str(run), "--input", str(image_tree / "val"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "not a raycv run directory" in _one_line(capsys)


def _existing_run(storage: Path, name: str = "r") -> Path:
    """A run directory as training leaves it: its config.yaml and an epoch-1 checkpoint."""
    from raycv.config import to_yaml

    run = storage / name
    (run / "checkpoint_epoch_0001").mkdir(parents=True)
    (run / "checkpoint_epoch_0001" / "raycv.json").write_text(json.dumps({"epoch": 1}))
    cfg = load_config("train", None, [f"run.storage_path={storage}", f"run.name={name}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


@pytest.mark.parametrize("change, message", [
    ("model.name=resnet18_cifar", "model.name='simple_cnn' (now 'resnet18_cifar')"),
    ("data.name=shapes", "data.name='digits' (now 'shapes')"),
    ("data.seed=7", "data.seed=0 (now 7)"),
])
def test_a_rerun_with_another_model_or_data_is_not_resumed(no_ray, tmp_path, capsys, change, message):
    run = _existing_run(tmp_path)
    before = (run / "config.yaml").read_text()
    assert main(["train", f"run.storage_path={tmp_path}", "run.name=r", change]) == 2
    line = _one_line(capsys)
    assert f"run r exists with {message}" in line and "run.resume=never" in line
    assert (run / "config.yaml").read_text() == before  # nothing rewritten


def test_resume_never_sets_the_old_run_aside(monkeypatch, tmp_path, capsys):
    from raycv import runtime
    from raycv.errors import UserError

    def stop(*a, **k):
        raise UserError("stopped where Ray would start")

    monkeypatch.setattr(runtime, "connect", stop)
    run = _existing_run(tmp_path)
    assert main(["train", f"run.storage_path={tmp_path}", "run.name=r", "model.name=resnet18_cifar",
                 "run.resume=never"]) == 2
    (aside,) = tmp_path.glob("r.set-aside-*")
    assert (aside / "checkpoint_epoch_0001" / "raycv.json").is_file() and not run.exists()
    out = capsys.readouterr()
    assert "the existing run was moved to" in out.out and "stopped where Ray would start" in out.err
