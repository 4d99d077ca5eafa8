"""A model's way in and out: the Python API, `raycv predict` (no Ray) and `raycv export`, each
checked against an independent run of the same model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycv.cli import main

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def checkpoint(digits_run) -> Path:
    return digits_run.checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """12 digit PNGs as user files: two of each of six digits, in <root>/<digit>/."""
    from raycv.data.bundled import digits_root

    root = tmp_path_factory.mktemp("api-images")
    out = []
    for digit in "012345":
        for src in sorted((digits_root() / digit).glob("*.png"))[:2]:
            dst = root / digit / src.name
            dst.parent.mkdir(exist_ok=True)
            dst.write_bytes(src.read_bytes())
            out.append(dst)
    return out


@pytest.mark.slow
def test_the_public_api_trains_loads_predicts_infers_and_evaluates(ray_session, tmp_path, images):
    """Only the names `import raycv` gives: the README's example."""
    import raycv

    summary = raycv.train(overrides={"run.storage_path": str(tmp_path), "run.name": "api", "train.epochs": 1,
                                     "scaling.num_workers": 1})
    assert summary.best_checkpoint and summary.epochs == 1
    p = raycv.load(tmp_path / "api")  # a run directory: its best checkpoint
    assert isinstance(p.model, torch.nn.Module) and p.classes == [str(i) for i in range(10)]
    assert p.task == "classification" and p.transform(Image.open(images[0])).shape == (3, 32, 32)
    rows = p([str(i) for i in images])
    infer = raycv.infer(tmp_path / "api", images[0].parents[1], tmp_path / "preds")
    assert infer.rows == len(images) and infer.errors == 0
    written = {r["path"]: r for r in pq.read_table(tmp_path / "preds").to_pylist()}
    for row in rows:  # the same fields and values as the Parquet rows, within float noise
        w = written[row["path"]]
        assert set(row) == set(w) and row["label"] == w["label"] and row["topk_labels"] == w["topk_labels"]
        assert row["score"] == pytest.approx(w["score"], abs=1e-5)
    metrics = raycv.evaluate(tmp_path / "preds")
    assert metrics["rows"] == len(images) and metrics["top1"] == pytest.approx(
        np.mean([r["label"] == Path(r["path"]).parent.name for r in rows]))


def test_load_predicts_paths_pil_and_arrays_alike(checkpoint, images, tmp_path):
    import raycv
    from raycv.training.checkpoint import load_model

    p = raycv.load(checkpoint, overrides={"infer.topk": 3})
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    pil = Image.open(images[1])
    rows = p([str(images[0]), pil, np.asarray(pil.convert("RGB")), str(bad), str(tmp_path / "missing.png")])
    assert [r["path"] for r in rows] == [str(images[0]), "<image 1>", "<image 2>", str(bad), str(tmp_path / "missing.png")]
    assert rows[1]["label"] == rows[2]["label"] and rows[1]["score"] == pytest.approx(rows[2]["score"], abs=1e-6)
    assert len(rows[0]["topk_labels"]) == 3 and rows[0]["error"] is None
    assert "not a decodable image" in rows[3]["error"] and rows[3]["label"] is None
    assert rows[4]["error"] and rows[4]["label"] is None
    # against the model loaded by hand with the checkpoint's own transform
    model, info = load_model(checkpoint)
    with torch.no_grad():
        probs = model(p.transform(Image.open(images[0]))[None]).softmax(1)[0]
    assert rows[0]["label"] == info.classes[int(probs.argmax())] and rows[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_the_model_runs_channels_last_with_the_same_predictions(checkpoint, images):
    """infer.channels_last (default on): NHWC weights and batches, rows equal to the NCHW model's."""
    import raycv

    on, off = raycv.load(checkpoint), raycv.load(checkpoint, overrides={"infer.channels_last": False})
    seen = []
    for p in (on, off):
        conv = next(m for m in p.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (p is on) != conv.weight.is_contiguous()
    a, b = on([str(i) for i in images]), off([str(i) for i in images])
    assert seen == [True, False]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def test_predict_prints_one_line_per_image_without_ray(checkpoint, images, tmp_path):
    """A subprocess with no Ray reachable: `raycv predict` must not start or join a cluster."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # joining this would fail
    cmd = [sys.executable, "-m", "raycv.cli", "predict", "--checkpoint", str(checkpoint), str(images[0].parents[1]),
           "--json", "infer.topk=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(row["path"] for row in rows) == sorted(str(i) for i in images)
    assert all(len(row["topk_scores"]) == 2 for row in rows)
    r = subprocess.run(cmd[:-2] + ["--limit", "5"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "12 images" in r.stderr and "raycv infer" in r.stderr and len(r.stderr.splitlines()) == 1


def test_predict_text_lines_and_a_missing_path(checkpoint, images, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), str(images[0]), str(images[0].parent / "*.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(images[0])) and "(top-5:" in lines[0]
    assert main(["predict", "--checkpoint", str(checkpoint), "/no/such/file.png"]) == 2
    assert capsys.readouterr().err.strip() == "raycv predict: error: no images at /no/such/file.png (no such file or folder)"


def _small_checkpoint(tmp_path: Path, name: str, task: str) -> Path:
    from raycv.data.presets import DetectionEvalPreset, SegmentationEvalPreset
    from raycv.models import get_model
    from raycv.training.checkpoint import CheckpointInfo, write_checkpoint

    torch.manual_seed(0)
    preset = SegmentationEvalPreset(input_size=64) if task == "segmentation" else DetectionEvalPreset(input_size=64)
    info = CheckpointInfo(task=task, model_name=name, model_kwargs={}, classes=["background", "a", "b"],
                          preprocess=preset, epoch=0, metrics={}, config={})
    return write_checkpoint(tmp_path / name, get_model(name, num_classes=3), info)


def _samples(preset) -> torch.Tensor:
    """Three preprocessed inputs: a random image, and it flipped left-right and upside down."""
    x = torch.randint(0, 256, (1, *preset.shape), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return preset.normalize(torch.cat([x, x.flip(-1), x.flip(-2)]))


@pytest.mark.parametrize("task,fmt", [
    ("classification", "onnx"), ("classification", "torchscript"), ("classification", "safetensors"),
    pytest.param("segmentation", "onnx", marks=pytest.mark.slow), ("segmentation", "torchscript"),
    ("detection", "torchscript"), ("detection", "safetensors")])
def test_export_runs_like_the_pytorch_model(checkpoint, tmp_path, task, fmt, capsys):
    """The export, loaded by its own runtime here (not by raycv's check), gives the PyTorch model's
    outputs on inputs it was not checked on, and carries the classes and preprocessing."""
    import raycv

    ckpt = checkpoint if task == "classification" else _small_checkpoint(
        tmp_path, "lraspp_small" if task == "segmentation" else "fcos_small", task)
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |difference| from the PyTorch model" in printed
    p = raycv.load(ckpt)
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["classes"] == p.classes and side["preprocess"] == p.preprocess.to_dict() and side["task"] == task
    x = _samples(p.preprocess)
    with torch.no_grad():
        ref = p.model(list(x)) if task == "detection" else p.model(x)
    ref = ref["out"] if task == "segmentation" else ref
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        meta = {m.key: m.value for m in onnx.load(str(out)).metadata_props}
        assert json.loads(meta["raycv.classes"]) == p.classes and json.loads(meta["raycv.preprocess"])["input_size"] > 0
        got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"image": x.numpy()})[0])
    elif fmt == "torchscript":
        extra = {"raycv.json": ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        assert json.loads(extra["raycv.json"])["classes"] == p.classes
        with torch.no_grad():
            got = loaded(list(x))[1] if task == "detection" else loaded(x)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from raycv.models import get_model

        with safe_open(str(out), "pt") as f:
            assert json.loads(f.metadata()["raycv.classes"]) == p.classes
        fresh = get_model(side["model"], num_classes=len(side["classes"]), **side["model_kwargs"]).eval()
        fresh.load_state_dict(load_file(str(out)))
        with torch.no_grad():
            got = fresh(list(x)) if task == "detection" else fresh(x)
    if task == "detection":
        for r, g in zip(ref, got):
            assert torch.equal(r["labels"], g["labels"]) and torch.allclose(r["boxes"], g["boxes"], atol=1e-3)
    else:
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4)


def test_export_refusals_are_one_line(checkpoint, tmp_path, capsys):
    det = _small_checkpoint(tmp_path, "fcos_small", "detection")
    assert main(["export", "--checkpoint", str(det), "--format", "onnx", "--output", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "use --format torchscript" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d.onnx").exists()
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "onnx"]) == 2
    assert "not a raycv checkpoint or run directory" in capsys.readouterr().err
