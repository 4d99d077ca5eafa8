"""Batch inference end to end: real local Ray, real image files, real Parquet."""

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycv.cli import main
from raycv.config import load_config
from raycv.data.decode import open_rgb
from raycv.errors import UserError
from raycv.inference.evaluate import evaluate_predictions
from raycv.inference.output import MANIFEST, read_output
from raycv.inference.pipeline import plan_actors, run_inference
from raycv.training.checkpoint import load_model

HERE = Path(__file__).parent  # an input folder that exists (the checkpoint is refused first)


@pytest.fixture(scope="module")
def checkpoint(digits_run) -> Path:
    """A short real training run's best checkpoint (2 epochs of digits: the session's shared run)."""
    return digits_run.checkpoint


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, checkpoint) -> Path:
    """60 digit PNGs in <root>/<digit>/ (copied from the bundled cache), as a user folder."""
    from raycv.data.bundled import digits_root

    root = tmp_path_factory.mktemp("digits-in")
    for src in sorted(digits_root().rglob("*.png"))[::30]:
        dst = root / src.parent.name / src.name
        dst.parent.mkdir(exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return root


def _infer(checkpoint, input, output, *extra):
    return run_inference(load_config("infer", None, [f"infer.checkpoint={checkpoint}", f"infer.input={input}",
                                                     f"infer.output={output}", *extra]))


def _plain_loop(checkpoint: Path, paths: list[str]) -> dict[str, tuple[str, float]]:
    model, info = load_model(checkpoint)
    pre = info.preprocess
    x = torch.stack([pre.geometry(open_rgb(Path(p).read_bytes())) for p in paths])
    with torch.no_grad():
        probs = torch.softmax(model(pre.normalize(x)), dim=1)
    top = probs.max(dim=1)
    return {p: (info.classes[int(i)], float(v)) for p, i, v in zip(paths, top.indices, top.values)}


@pytest.mark.parametrize("decode_in_actor", [False, True], ids=["decode-tasks", "decode-in-actor"])
def test_predictions_match_a_plain_pytorch_loop(ray_session, checkpoint, digit_folder, tmp_path, capsys,
                                                decode_in_actor):
    s = _infer(checkpoint, digit_folder, tmp_path / "out", "infer.batch_size=16",
               f"infer.decode_in_actor={str(decode_in_actor).lower()}")
    assert "infer: 60/60 rows (100%)" in capsys.readouterr().err  # the progress line saw every batch
    inputs = sorted(str(p) for p in digit_folder.rglob("*.png"))
    assert (s.rows, s.errors) == (len(inputs), 0)
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("path").to_pylist()) == inputs  # every input exactly once
    expected = _plain_loop(checkpoint, inputs)
    for row in table.to_pylist():
        label, score = expected[row["path"]]
        assert row["label"] == label and abs(row["score"] - score) < 1e-4
        assert row["topk_labels"][0] == label and len(row["topk_scores"]) == 5 and row["error"] is None
        assert row["label_index"] == int(label)


def test_schema_metadata_and_a_second_reader(ray_session, checkpoint, digit_folder, tmp_path):
    out = tmp_path / "out"
    _infer(checkpoint, digit_folder, out, "infer.embedding=true", "infer.topk=3")
    files = sorted(out.glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert str(schema.field("label_index").type) == "int32" and str(schema.field("score").type) == "float"
    assert str(schema.field("topk_labels").type) == "list<element: string>"
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[128]"
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["raycv.checkpoint"] == str(checkpoint) and meta["raycv.model"] == "simple_cnn"
    assert json.loads(meta["raycv.classes"]) == [str(i) for i in range(10)] and meta["raycv.version"]
    ours = read_output(str(out)).to_pandas().sort_values("path").reset_index(drop=True)
    by_pandas = pd.read_parquet(out).sort_values("path").reset_index(drop=True)  # skips _ names
    by_duckdb = duckdb.sql(f"SELECT path, label, score FROM read_parquet('{out}/*.parquet') ORDER BY path").df()
    assert len(by_duckdb) == len(ours) == len(by_pandas) == 60
    assert list(by_duckdb["path"]) == list(ours["path"]) == list(by_pandas["path"])
    assert list(by_duckdb["label"]) == list(ours["label"])
    assert np.allclose(by_duckdb["score"], ours["score"])


def test_rows_per_file_and_readers_beside_a_live_run(ray_session, checkpoint, digit_folder, tmp_path):
    """infer.rows_per_file sets how many rows a file holds; while a run is writing, its parts sit in
    <output>/_shards/, and pandas and DuckDB read the published files only (here a real part
    file in the folder a new run on this output writes into)."""
    from raycv.inference.output import OutputLocation

    out = tmp_path / "one"
    _infer(checkpoint, digit_folder, out, "infer.batch_size=16")
    assert [pq.read_metadata(f).num_rows for f in out.glob("*.parquet")] == [60]
    _infer(checkpoint, digit_folder, tmp_path / "small", "infer.batch_size=16", "infer.rows_per_file=20")
    # 60 inputs in shards of 20 (sorted paths): each part holds the rows of one shard
    counts = sorted(pq.read_metadata(f).num_rows for f in (tmp_path / "small").glob("*.parquet"))
    shards = json.loads((tmp_path / "small" / MANIFEST).read_text())["shards"]
    assert sum(counts) == 60 and max(counts) <= 20 and sorted(e["rows"] for e in shards.values()) == [20, 20, 20]
    order = sorted(str(p) for p in digit_folder.rglob("*.png"))
    for sid, entry in shards.items():
        held = sorted(p for f in entry["files"] for p in pq.read_table(tmp_path / "small" / f["name"])["path"].to_pylist())
        assert held == order[int(sid[-6:]) * 20:(int(sid[-6:]) + 1) * 20]

    live = Path(OutputLocation(str(out)).shards_path)
    live.mkdir()
    part = sorted(out.glob("part-*.parquet"))[0]
    (live / part.name.replace("part-", "part-live-")).write_bytes(part.read_bytes())
    assert len(pd.read_parquet(live)) == 60  # a readable Parquet file, skipped by its folder's name
    assert len(pd.read_parquet(out)) == 60
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/*.parquet')").fetchall() == [(60,)]


def test_bad_files_become_error_rows(ray_session, checkpoint, digit_folder, tmp_path):
    """(With infer.decode_in_actor=true, so that path's error rows are covered too.)"""
    folder = tmp_path / "mixed"
    good = sorted(digit_folder.rglob("*.png"))[:10]
    for p in good:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / p.parent.name / p.name).write_bytes(p.read_bytes())
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("definitely not a jpeg")
    (folder / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    jpg = folder / "whole.jpg"
    Image.new("RGB", (40, 40), (9, 99, 199)).save(jpg)
    (folder / "truncated.jpg").write_bytes(jpg.read_bytes()[:200])
    s = _infer(checkpoint, folder, tmp_path / "out", "infer.decode_in_actor=true")
    assert (s.rows, s.errors, s.ok) == (15, 4, 11)
    rows = {Path(r["path"]).name: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    for bad in ("zero.png", "text.jpg", "random.png", "truncated.jpg"):
        assert rows[bad]["error"] and rows[bad]["label"] is None and rows[bad]["score"] is None
    assert rows["whole.jpg"]["error"] is None and all(rows[p.name]["error"] is None for p in good)


@pytest.mark.parametrize("limit", [0.79, 0.8])
def test_max_error_fraction_at_the_threshold(ray_session, checkpoint, tmp_path, limit):
    """4 of 5 inputs are bad (0.8): just below the limit fails and publishes nothing, keeping the
    committed predictions, which a resume at the limit publishes without predicting again; at it,
    publishes."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"nope")
    (folder / "ok.png").write_bytes(_one_png(tmp_path).read_bytes())
    if limit < 0.8:
        with pytest.raises(UserError, match=f"4 of 5 inputs failed to decode \\(80.0%\\), above infer.max_error_fraction={limit}"):
            _infer(checkpoint, folder, tmp_path / "out", f"infer.max_error_fraction={limit}")
        assert not (tmp_path / "out" / MANIFEST).exists() and list((tmp_path / "out").glob("*.parquet")) == []
        s = _infer(checkpoint, folder, tmp_path / "out", "infer.mode=resume", "infer.max_error_fraction=0.8")
        assert (s.rows, s.skipped_done, s.total_rows) == (0, 5, 5)
        assert json.loads((tmp_path / "out" / MANIFEST).read_text())["errors"] == 4
    else:
        s = _infer(checkpoint, folder, tmp_path / "out", f"infer.max_error_fraction={limit}")
        assert (s.rows, s.errors) == (5, 4) and json.loads((tmp_path / "out" / MANIFEST).read_text())["errors"] == 4


def _one_png(tmp_path) -> Path:
    p = tmp_path / "one.png"
    Image.new("L", (8, 8), 200).save(p)
    return p


@pytest.mark.slow  # 30 s of four runs: in the whole suite, out of the everyday tier
def test_error_overwrite_and_resume_modes(ray_session, checkpoint, digit_folder, tmp_path):
    folder = tmp_path / "grow"
    pngs = sorted(digit_folder.rglob("*.png"))
    for p in pngs[:20]:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / p.parent.name / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    _infer(checkpoint, folder, out, "infer.rows_per_file=10")  # shards of 10 inputs
    with pytest.raises(UserError, match="already exists; pass infer.mode=overwrite"):
        _infer(checkpoint, folder, out)

    for p in pngs[20:35]:  # 15 new inputs arrive, in a top-level folder that sorts last: new shards
        (folder / "zz_new").mkdir(exist_ok=True)
        (folder / "zz_new" / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    (out / "part-20260101000000-dead00-00000.parquet").write_bytes(b"debris: a killed run moved it in, unlisted")
    s = _infer(checkpoint, folder, out, "infer.mode=resume", "infer.rows_per_file=10")
    assert (s.rows, s.skipped_done) == (15, 20)  # only the new inputs were processed
    paths = read_output(str(out)).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in folder.rglob("*.png")) and len(set(paths)) == 35
    assert not (out / "part-20260101000000-dead00-00000.parquet").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == 35 and [r["mode"] for r in manifest["runs"]] == ["error", "resume"]

    # One more input that sorts last joins the last shard (5 inputs, now 6): its 5 predictions are
    # read back and kept, and only the new input is predicted.
    (folder / "zz_new" / "zzz.png").write_bytes(pngs[0].read_bytes())
    s = _infer(checkpoint, folder, out, "infer.mode=resume", "infer.rows_per_file=10")
    assert (s.rows, s.skipped_done) == (1, 35)
    # One inserted near the front (sorted order) moves every later boundary by one: shards 0-2 (10
    # each) lose an input and are predicted again; shard 3 only gains one (6 kept, 1 predicted).
    (folder / pngs[0].parent.name / ("0" + pngs[0].name)).write_bytes(pngs[0].read_bytes())
    s = _infer(checkpoint, folder, out, "infer.mode=resume", "infer.rows_per_file=10")
    assert (s.rows, s.skipped_done) == (31, 6)
    table = read_output(str(out))
    assert len(table) == len(set(table.column("path").to_pylist())) == 37
    assert json.loads((out / MANIFEST).read_text())["files"] == sorted(p.name for p in out.glob("*.parquet"))

    s = _infer(checkpoint, folder, out, "infer.mode=resume", "infer.rows_per_file=10")  # nothing left to do
    assert (s.rows, s.skipped_done) == (0, 37) and len(read_output(str(out))) == 37

    s = _infer(checkpoint, folder, out, "infer.mode=overwrite")
    assert s.rows == 37
    table = read_output(str(out))
    assert len(table) == 37 and len(set(table.column("path").to_pylist())) == 37
    assert len(json.loads((out / MANIFEST).read_text())["files"]) == len(list(out.glob("*.parquet")))


def test_parquet_and_registry_inputs(ray_session, checkpoint, digit_folder, tmp_path):
    import pyarrow as pa

    pngs = sorted(digit_folder.rglob("*.png"))[:12]
    pq.write_table(pa.table({"id": [f"img-{i}" for i in range(12)], "img": [p.read_bytes() for p in pngs]}),
                   tmp_path / "in.parquet")
    s = _infer(checkpoint, tmp_path / "in.parquet", tmp_path / "o1", "infer.path_column=id", "infer.image_column=img")
    assert s.rows == 12 and sorted(read_output(str(tmp_path / "o1")).column("path").to_pylist()) == sorted(
        f"img-{i}" for i in range(12))
    with pytest.raises(UserError, match="has no column 'path'"):
        _infer(checkpoint, tmp_path / "in.parquet", tmp_path / "o2")
    s = _infer(checkpoint, "registry:digits:val", tmp_path / "o3")
    assert s.rows == 359 and s.errors == 0


def test_a_manifest_of_paths_is_read_in_ray(ray_session, checkpoint, digit_folder, tmp_path):
    """`infer.image_column=null`: a Parquet manifest whose path column names the images (absolute,
    or relative to the manifest's folder, which is not the decode tasks' working directory). The
    rows keep the manifest's ids and match the folder input's predictions; a missing file is an
    error row."""
    import pyarrow as pa

    pngs = sorted(digit_folder.rglob("*.png"))[:10]
    (tmp_path / "m" / "rel").mkdir(parents=True)
    for p in pngs[5:]:
        (tmp_path / "m" / "rel" / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    ids = [str(p) for p in pngs[:5]] + [f"rel/{p.parent.name}-{p.name}" for p in pngs[5:]] + ["rel/missing.png"]
    pq.write_table(pa.table({"path": ids}), tmp_path / "m" / "manifest.parquet")
    s = _infer(checkpoint, tmp_path / "m" / "manifest.parquet", tmp_path / "out", "infer.image_column=null",
               "infer.max_error_fraction=0.5")
    assert (s.rows, s.errors) == (11, 1)
    got = read_output(str(tmp_path / "out")).to_pandas().set_index("path")
    assert sorted(got.index) == sorted(ids)
    assert "No such file" in got.loc["rel/missing.png", "error"] or "not found" in got.loc["rel/missing.png", "error"]
    expected = _plain_loop(checkpoint, [str(p) for p in pngs])
    for i, p in zip(ids, pngs):
        assert got.loc[i, "label"] == expected[str(p)][0] and got.loc[i, "score"] == pytest.approx(expected[str(p)][1], abs=1e-5)
    with pytest.raises(UserError, match="expected string"):  # a manifest's path column holds paths, not bytes
        pq.write_table(pa.table({"path": [b"x"]}), tmp_path / "bad.parquet")
        _infer(checkpoint, tmp_path / "bad.parquet", tmp_path / "o2", "infer.image_column=null")


def test_evaluate_reports_json_and_png(ray_session, checkpoint, digit_folder, tmp_path):
    _infer(checkpoint, digit_folder, tmp_path / "out")
    report = evaluate_predictions(str(tmp_path / "out"), output=str(tmp_path / "eval"))
    table = read_output(str(tmp_path / "out")).to_pylist()
    expected = np.mean([Path(r["path"]).parent.name == r["label"] for r in table])
    assert report["scored"] == 60 and abs(report["top1"] - expected) < 1e-9
    assert np.array(report["confusion_matrix"]).sum() == 60 and set(report["per_class"]) == set(map(str, range(10)))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["top1"] == report["top1"]
    png = Image.open(tmp_path / "eval" / "confusion_matrix.png")
    assert png.size[0] > 200 and len(set(np.asarray(png.convert("L")).flatten().tolist())) > 10
    # --labels: a Parquet of path + label says what is true (here: every image is a "3")
    import pyarrow as pa

    pq.write_table(pa.table({"path": [r["path"] for r in table], "label": ["3"] * len(table)}), tmp_path / "truth.parquet")
    other = evaluate_predictions(str(tmp_path / "out"), labels=str(tmp_path / "truth.parquet"))
    assert other["scored"] == 60 and other["top1"] == pytest.approx(np.mean([r["label"] == "3" for r in table]))
    assert other["per_class"]["3"]["support"] == 60

    # `raycv draw`: the first rows by path, enlarged to be legible, the predicted label written on them.
    from raycv.inference.draw import draw_predictions

    drawn = draw_predictions(str(tmp_path / "out"), str(tmp_path / "drawn"), limit=2)
    first = sorted(table, key=lambda r: r["path"])[0]
    assert len(drawn) == 2 and Path(drawn[0]).name.endswith(Path(first["path"]).stem + ".png")
    img = np.asarray(Image.open(drawn[0]).convert("RGB"))
    plain = np.asarray(Image.open(first["path"]).convert("RGB"))
    factor = img.shape[0] // plain.shape[0]
    assert factor >= 2 and img.shape[:2] == (plain.shape[0] * factor, plain.shape[1] * factor)
    assert (img[:12] != plain.repeat(factor, 0).repeat(factor, 1)[:12]).any()  # the caption is drawn on top


def test_actor_sizing_refuses_a_silent_hang():
    cfg = load_config("infer", None, ["infer.cpus_per_actor=2"])
    with pytest.raises(UserError, match="would wait forever"):
        plan_actors(cfg, total_cpus=2, decode_cpus=0.5)
    cpus, threads = plan_actors(load_config("infer", None, []), total_cpus=2, decode_cpus=0.5)
    assert cpus == 1.5 and threads == 2


def test_cli_bad_checkpoint_is_one_line(ray_session, tmp_path, capsys):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "model.pt").write_bytes(b"not torch")
    rc = main(["infer", "--checkpoint", str(tmp_path / "fake"), "--input", str(HERE / "helpers"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a raycv checkpoint or run directory" in err[0]


def test_pretrained_torchvision_model_by_name(ray_session, digit_folder, tmp_path, monkeypatch, stand_in_weights):
    """No checkpoint: a torchvision model and its weights (here planted in the local torch cache)."""
    from torchvision.models import ResNet18_Weights

    from raycv.models import get_model

    torch.hub.set_dir(str(tmp_path / "hub"))
    reference = get_model("resnet18", num_classes=1000).eval()
    target = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(digit_folder.rglob("*.png"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    s = run_inference(load_config("infer", None, ["model.name=resnet18", "model.weights=IMAGENET1K_V1",
                                                  f"infer.input={folder}", f"infer.output={tmp_path / 'out'}"]))
    assert (s.rows, s.errors) == (4, 0)
    rows = read_output(str(tmp_path / "out")).to_pylist()
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    preset = ResNet18_Weights.IMAGENET1K_V1.transforms()
    for r in rows:  # the same numbers as torchvision's own preset + the same weights
        x = preset(Image.open(r["path"]).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            probs = torch.softmax(reference(x), dim=1)[0]
        assert r["label"] == categories[int(probs.argmax())]
        assert abs(r["score"] - float(probs.max())) < 1e-4


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_code_pickle_is_refused_and_nothing_runs(checkpoint, tmp_path, capsys):
    import shutil

    evil = tmp_path / "evil-ckpt"
    shutil.copytree(checkpoint, evil)
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Payload(str(marker))}, evil / "model.pt")
    _record_digests(evil)  # whoever plants the file can rewrite raycv.json too: weights_only must hold alone
    with pytest.raises(UserError, match="refusing to load .*model.pt: not a tensors-only raycv file"):
        load_model(evil)
    rc = main(["infer", "--checkpoint", str(evil), "--input", str(HERE / "helpers"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()  # the payload never ran


def _record_digests(directory: Path) -> None:
    import hashlib

    meta = json.loads((directory / "raycv.json").read_text())
    for name in meta["files"]:
        data = (directory / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "raycv.json").write_text(json.dumps(meta))


def test_torn_checkpoints_are_refused_instead_of_loading_wrong_weights(checkpoint, tmp_path, capsys):
    """What a crash while a checkpoint is written or copied (Ray copies each file of it into the
    run folder) can leave: model.pt from another write of the same model (same size, other
    weights), a truncated model.pt, a truncated train_state.pt. raycv.json records each file's
    size and SHA-256, so each is refused by name; the intact checkpoint loads."""
    import shutil

    from raycv.training import checkpoint as ckpt

    a, b = sorted(checkpoint.parent.glob("checkpoint_epoch_*"))[-2:]
    assert (a / "model.pt").stat().st_size == (b / "model.pt").stat().st_size
    cases = {}
    cases["mixed"] = shutil.copytree(b, tmp_path / "mixed")
    shutil.copy(a / "model.pt", cases["mixed"] / "model.pt")
    for name, file in (("truncated", "model.pt"), ("state", "train_state.pt")):
        cases[name] = shutil.copytree(b, tmp_path / name)
        data = (b / file).read_bytes()
        (cases[name] / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is torn: model.pt .*SHA-256 differs"):
        load_model(cases["mixed"])
    with pytest.raises(UserError, match="is torn: model.pt .*bytes, .* recorded"):
        load_model(cases["truncated"])
    with pytest.raises(UserError, match="is torn: train_state.pt"):
        ckpt.load_train_state(cases["state"])
    model, info = load_model(b)  # the intact one: its own weights
    assert all(torch.equal(v, w) for v, w in zip(model.state_dict().values(),
                                                  torch.load(b / "model.pt", weights_only=True).values()))
    rc = main(["infer", "--checkpoint", str(cases["mixed"]), "--input", str(HERE / "helpers"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is torn" in err[0] and not (tmp_path / "o").exists()


def test_checkpoint_killed_mid_write_is_never_taken_for_a_whole_one(tmp_path):
    """SIGKILL a process while write_checkpoint is saving a large model: raycv.json is written last
    (atomically), so what is left is refused as not a checkpoint, never loaded."""
    import signal
    import subprocess
    import sys
    import time

    from raycv.training.checkpoint import read_info

    target = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from conftest import untrained_checkpoint
untrained_checkpoint(Path({str(target)!r}), model="resnet152", classes=1000)
"""])
    deadline = time.monotonic() + 120
    while not ((target / "model.pt").is_file() and (target / "model.pt").stat().st_size > 0):
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before it wrote model.pt"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (target / "raycv.json").exists()
    with pytest.raises(UserError, match="not a raycv checkpoint"):
        read_info(target)


def _record_training_config(ckpt: Path, data: dict) -> None:
    """Give an untrained checkpoint the config a training run records in raycv.json."""
    meta = json.loads((ckpt / "raycv.json").read_text())
    meta["config"] = {"data": data}
    (ckpt / "raycv.json").write_text(json.dumps(meta))


def test_a_registry_input_reproduces_the_checkpoints_own_split(ray_session, tmp_path):
    """`--input registry:shapes:val` with a checkpoint trained on 60 scenes (seed 5, a quarter for
    validation) reads exactly that run's validation scenes, whatever the infer config's data section
    says (its default is 2,000 scenes: read that way, "val" mixed in the checkpoint's training images)."""
    from conftest import untrained_checkpoint

    from raycv.config import DataSection
    from raycv.data import build_dataset
    from raycv.data.io import sha256_file

    ckpt = untrained_checkpoint(tmp_path / "ckpt", classes=3)
    trained = DataSection(name="shapes", num_samples=60, seed=5, val_fraction=0.25)
    _record_training_config(ckpt, trained.model_dump(mode="json"))
    s = run_inference(load_config("infer", None, [f"infer.checkpoint={ckpt}", "infer.input=registry:shapes:val",
                                                  f"infer.output={tmp_path / 'out'}"]))
    splits = build_dataset(trained)
    val = sorted(r["path"] for r in splits.val.take_all())
    train = {sha256_file(r["path"]) for r in splits.train.take_all()}
    paths = sorted(read_output(str(tmp_path / "out")).column("path").to_pylist())
    assert s.rows == splits.num_val == 15 and paths == val
    assert not {sha256_file(p) for p in paths} & train  # no image the checkpoint trained on


def test_a_registry_input_without_a_recorded_split_is_refused(tmp_path, capsys, monkeypatch):
    from conftest import untrained_checkpoint

    from raycv import runtime

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    ckpt = untrained_checkpoint(tmp_path / "ckpt", classes=3)
    _record_training_config(ckpt, {"name": "shapes"})
    assert main(["infer", "--checkpoint", str(ckpt), "--input", "registry:shapes:val",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no data.root for shapes, so the split it was validated on cannot be" in err[0]


@pytest.mark.parametrize("by_ray", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ids-in-driver", "ids-by-ray"])
def test_the_exactly_once_check_refuses_to_publish_duplicate_ids(ray_session, checkpoint, digit_folder, tmp_path,
                                                                 monkeypatch, by_ray):
    """The count-and-distinct check before publishing, triggered for real: a Parquet input whose id
    column repeats one id. Every row is written, but the output could not say which input each is.
    Both ways of counting the distinct ids: in the driver (small outputs) and by a Ray groupby (above
    LOCAL_ID_CHECK_ROWS, here 0, where rows and errors come from the footers); the second also
    publishes an output whose ids are distinct."""
    import pyarrow as pa

    from raycv.inference import output

    if by_ray:
        monkeypatch.setattr(output, "LOCAL_ID_CHECK_ROWS", 0)
    pngs = sorted(digit_folder.rglob("*.png"))[:6]
    ids = ["a", "b", "c", "d", "e", "a"]
    pq.write_table(pa.table({"path": ids, "image": [p.read_bytes() for p in pngs]}), tmp_path / "in.parquet")
    with pytest.raises(UserError, match=r"inference wrote 6 rows \(5 distinct ids\) for 6 inputs.*nothing was published"):
        _infer(checkpoint, tmp_path / "in.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if by_ray:  # distinct ids, one of them not an image: published, its error row counted from the footers
        images = [p.read_bytes() for p in pngs[:4]] + [b"not an image"]
        pq.write_table(pa.table({"path": ids[:5], "image": images}), tmp_path / "ok.parquet")
        s = _infer(checkpoint, tmp_path / "ok.parquet", tmp_path / "out")
        assert (s.rows, s.errors) == (5, 1)


@pytest.mark.slow
def test_a_command_joining_a_running_instance_leaves_the_weights_to_the_actors(ray_session, checkpoint, digit_folder,
                                                                              tmp_path):
    """With $RAY_ADDRESS the driver reads the checkpoint's raycv.json only and never imports torch
    (a separate command joins the test run's Ray instance, as a user's joins theirs): the actors load
    the weights. Its predictions are the in-process run's, and a checkpoint whose weights are damaged
    is still one line naming the problem, with nothing left in the output."""
    import os
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    code = "import sys, raycv.cli; rc = raycv.cli.main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)"

    def command(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, "infer", "--checkpoint", str(ckpt), "--input",
                               str(digit_folder), "--output", str(out)], env=env, capture_output=True, text=True,
                              timeout=300)

    ok = command(checkpoint, tmp_path / "joined")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().splitlines()[-1] == "False"  # torch never imported in the driver
    _infer(checkpoint, digit_folder, tmp_path / "here")  # in this process: the model loaded in the driver first
    joined, here = read_output(str(tmp_path / "joined")), read_output(str(tmp_path / "here"))
    assert dict(zip(joined["path"].to_pylist(), joined["label"].to_pylist())) == \
        dict(zip(here["path"].to_pylist(), here["label"].to_pylist())) and joined.num_rows == 60
    torn = tmp_path / "torn"
    shutil.copytree(checkpoint, torn)
    weights = (torn / "model.pt").read_bytes()
    (torn / "model.pt").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # same size, one bit off
    bad = command(torn, tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"raycv infer: error: checkpoint {torn} is torn: model.pt is not the file its raycv.json records (its "
        f"SHA-256 differs from the recorded one); was it written or copied by a run that crashed? use another "
        f"checkpoint")
    assert not (tmp_path / "bad").exists()
    small = tmp_path / "small"  # raycv.json says 28 px; the model was built for 32: the actor's check refuses it
    shutil.copytree(checkpoint, small)
    meta = json.loads((small / "raycv.json").read_text())
    meta["preprocess"]["input_size"] = meta["preprocess"]["resize_size"] = 28
    (small / "raycv.json").write_text(json.dumps(meta))
    bad = command(small, tmp_path / "bad")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
    assert f"checkpoint {small}: 'simple_cnn' cannot run on its preprocess (input_size=28)" in bad.stderr
    assert not (tmp_path / "bad").exists()
