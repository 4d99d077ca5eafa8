"""raycv quantize: an int8 checkpoint that is smaller, holds int8 weights, loads back to the model
that was measured, predicts through raycv.load / predict / infer, keeps the float model's accuracy on
the digits, and is refused where it cannot go."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycv.cli import main
from raycv.errors import UserError
from raycv.training import checkpoint as ckpt

from conftest import untrained_checkpoint


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def test_a_static_int8_checkpoint_is_smaller_loads_back_as_measured_and_predicts(tmp_path, calibration, capsys):
    from raycv.quantize import calibration_batches

    import raycv

    torch.manual_seed(0)  # one fixed float model: the int8 outputs below are the same on every run
    fp32 = untrained_checkpoint(tmp_path / "fp32", "simple_cnn", classes=10)
    assert main(["quantize", "--checkpoint", str(fp32), "--output", str(tmp_path / "int8"),
                 "--calibration", str(calibration), "--images", "32", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1])
    assert summary["method"] == "static" and summary["calibration_images"] == 32
    assert summary["size_mb_int8"] < 0.3 * summary["size_mb_fp32"]  # int8 weights: about a quarter
    meta = json.loads((tmp_path / "int8" / "raycv.json").read_text())
    assert meta["quantization"]["method"] == "static" and meta["quantization"]["source"] == str(fp32)
    state = ckpt.load_state_dict(tmp_path / "int8")  # tensors only, as every checkpoint
    assert state["conv1.weight"].dtype == torch.qint8 and state["fc2._packed_params._packed_params"][0].dtype == torch.qint8
    # the model rebuilt from disk is the one the command measured against the float model
    model, info = ckpt.load_model(tmp_path / "int8")
    reference, _ = ckpt.load_model(fp32)
    x, n = calibration_batches(info, [str(calibration)], 32)
    with torch.inference_mode():
        diff = float((model(x) - reference(x)).abs().max())
    assert n == 32 and diff == pytest.approx(summary["max_abs_diff"], abs=1e-5) and 0 < diff < 0.5
    # raycv.load and raycv predict take it, embeddings included
    files = [str(calibration / f"{i:02d}.png") for i in range(3)]
    rows = raycv.load(tmp_path / "int8", overrides={"infer.embedding": True})(files)
    x3, _ = calibration_batches(info, files, 3)
    with torch.inference_mode():
        probs = torch.softmax(model(x3), 1)
    # int8 logits are quantized, so two classes can tie exactly: the label raycv picks must be one
    # holding the top probability of the direct forward, and its score that probability
    picked = [r["label_index"] for r in rows]
    assert probs[torch.arange(3), picked].tolist() == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)
    assert [r["score"] for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)
    assert all(r["error"] is None and len(r["embedding"]) == 128 for r in rows)
    assert main(["predict", "--checkpoint", str(tmp_path / "int8"), str(calibration / "00.png")]) == 0


def test_int8_refusals_are_one_line(tmp_path, calibration, capsys):
    from raycv.export import export_checkpoint
    from raycv.quantize import quantize_checkpoint

    fp32 = untrained_checkpoint(tmp_path / "fp32", "simple_cnn", classes=10)
    s = quantize_checkpoint(str(fp32), tmp_path / "int8", calibration=[str(calibration)], images=8, method="dynamic")
    assert s.method == "dynamic" and s.calibration_images == 0
    assert ckpt.load_state_dict(tmp_path / "int8")["fc1._packed_params._packed_params"][0].dtype == torch.qint8
    with pytest.raises(UserError, match="is already quantized"):
        quantize_checkpoint(str(tmp_path / "int8"), tmp_path / "again", calibration=[str(calibration)])
    with pytest.raises(UserError, match="exists and is not empty"):
        quantize_checkpoint(str(fp32), tmp_path / "int8", calibration=[str(calibration)])
    with pytest.raises(UserError, match="is an int8 checkpoint .*export the float checkpoint"):
        export_checkpoint(str(tmp_path / "int8"), "onnx", tmp_path / "m.onnx")
    from raycv.models import get_model

    with pytest.raises(UserError, match="is an int8 checkpoint .*start from the float one"):
        ckpt.init_from_checkpoint(get_model("simple_cnn", num_classes=10), str(tmp_path / "int8"))
    assert main(["infer", "--checkpoint", str(tmp_path / "int8"), "--input", str(calibration),
                 "--output", str(tmp_path / "out"), "infer.use_gpu=true"]) == 2
    assert "int8 checkpoint (raycv quantize), which runs on CPUs" in capsys.readouterr().err
    # a detection model FX cannot trace, without linear layers: nothing to quantize
    from raycv.data.presets import DetectionEvalPreset

    info = ckpt.CheckpointInfo(task="detection", model_name="fcos_small", model_kwargs={}, classes=["background", "a"],
                               preprocess=DetectionEvalPreset(input_size=64), epoch=0, metrics={}, config={})
    ckpt.write_checkpoint(tmp_path / "det", get_model("fcos_small", num_classes=2), info)
    with pytest.raises(UserError, match="fcos_small has no linear layers for dynamic quantization and cannot be "
                                        "traced for static quantization: nothing to quantize"):
        quantize_checkpoint(str(tmp_path / "det"), tmp_path / "det-int8", calibration=[str(calibration)])
    assert not (tmp_path / "det-int8").exists()


def test_segmentation_quantizes_statically(tmp_path, calibration):
    from raycv.data.presets import SegmentationEvalPreset
    from raycv.models import get_model
    from raycv.quantize import quantize_checkpoint

    import raycv

    torch.manual_seed(0)
    info = ckpt.CheckpointInfo(task="segmentation", model_name="lraspp_small", model_kwargs={},
                               classes=["background", "a", "b"], preprocess=SegmentationEvalPreset(input_size=64),
                               epoch=0, metrics={}, config={})
    ckpt.write_checkpoint(tmp_path / "seg", get_model("lraspp_small", num_classes=3), info)
    s = quantize_checkpoint(str(tmp_path / "seg"), tmp_path / "seg-int8", calibration=[str(calibration)], images=16)
    assert s.method == "static" and s.size_mb_int8 < 0.35 * s.size_mb_fp32 and s.top1_agreement > 0.9
    rows = raycv.load(tmp_path / "seg-int8")([calibration / "00.png"])
    assert rows[0]["error"] is None and abs(sum(rows[0]["class_fractions"]) - 1) < 1e-6


@pytest.mark.slow
def test_int8_digits_keep_the_float_models_accuracy_through_raycv_infer(ray_session, digits_run, tmp_path, capsys):
    """Calibrated on the checkpoint's own training split (read with Ray), inferred with raycv infer
    over the validation split, scored with raycv evaluate: within a point of the float model's
    val_accuracy on the same images."""
    assert main(["quantize", "--checkpoint", str(digits_run.checkpoint), "--output", str(tmp_path / "int8"),
                 "--images", "200"]) == 0
    assert "static int8, x86, 200 calibration images" in capsys.readouterr().out
    assert main(["infer", "--checkpoint", str(tmp_path / "int8"), "--input", "registry:digits:val",
                 "--output", str(tmp_path / "pred")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(tmp_path / "pred")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp32 = json.loads((digits_run.checkpoint / "raycv.json").read_text())["metrics"]["val_accuracy"]
    assert report["rows"] == 359 and abs(report["top1"] - fp32) <= 0.01, (report, fp32)
