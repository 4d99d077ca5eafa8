"""More models in: timm models by name (`model.name=timm/<name>`) and plugins, a user's own model and
dataset registered from outside raycv (`--import`, `run.plugins`, entry points)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycv.cli import main

REPO = Path(__file__).parents[1]
PLUGINS = REPO / "tests" / "plugins"


def _raycv(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycv.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_a_plugin_that_fails_or_takes_a_name_is_one_line_before_ray(monkeypatch, capsys):
    from raycv import runtime

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.syspath_prepend(str(PLUGINS))
    for args, expected in [
        (["train", "--import", "no_such_plugin_module"],
         "plugin 'no_such_plugin_module' failed to import: ModuleNotFoundError: No module named 'no_such_plugin_module'"),
        (["models", "--import", "raycv_bad_plugin"],
         "plugin 'raycv_bad_plugin': model 'simple_cnn' is already registered (by raycv)"),
        (["train", "run.plugins=[not a module]"], "run.plugins: 'not a module' is not a Python module name"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err


def test_entry_points_register_without_being_named(tmp_path):
    """An installed package's `raycv.models` / `raycv.datasets` entry points: a dist-info folder on the
    path is what pip leaves behind."""
    dist = tmp_path / "raycv_example_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: raycv-example-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[raycv.models]\nexample = raycv_example_plugin\n\n"
                                           "[raycv.datasets]\nexample = raycv_example_plugin\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(PLUGINS)])}
    models = _raycv("models", cwd=tmp_path, env=env)
    assert models.returncode == 0, models.stderr
    assert any(line.split()[:3] == ["example_tinynet", "classification", "raycv_example_plugin"]
               for line in models.stdout.splitlines()), models.stdout
    (dist / "entry_points.txt").write_text("[raycv.models]\nbroken = raycv_no_such_module:register\n")
    broken = _raycv("datasets", cwd=tmp_path, env=env)
    assert broken.returncode == 2 and broken.stderr.strip() == (
        "raycv datasets: error: plugin entry point 'broken' (raycv_no_such_module:register) of group raycv.models "
        "failed to load: ModuleNotFoundError: No module named 'raycv_no_such_module'")


@pytest.mark.slow
def test_a_plugin_model_and_dataset_train_and_infer_on_a_running_instance(ray_session, tmp_path):
    """The plugin is a module in the current folder: the driver, the Ray Train worker and the
    inference actor each import it (a separate driver joins the test run's Ray instance, as a
    user's command joins theirs with RAY_ADDRESS)."""
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    train = _raycv("train", "--import", "raycv_example_plugin", "model.name=example_tinynet",
                   "data.name=example_stripes", "train.epochs=2", "scaling.num_workers=1",
                   f"run.storage_path={tmp_path}", "run.name=plug", cwd=PLUGINS, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    run = tmp_path / "plug"
    config = (run / "config.yaml").read_text()
    assert "example_tinynet" in config and "- raycv_example_plugin" in config
    (tmp_path / "one").mkdir()  # joining a running instance, the actor builds the model: give it an image
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    without = _raycv("infer", "--checkpoint", str(run), "--input", str(tmp_path / "one"), "--output",
                     str(tmp_path / "x"), cwd=tmp_path, env=env)
    assert without.returncode == 2 and "unknown model 'example_tinynet'" in without.stderr
    assert "--import MODULE" in without.stderr and not (tmp_path / "x").exists()
    infer = _raycv("infer", "--import", "raycv_example_plugin", "--checkpoint", str(run), "--input",
                   "registry:example_stripes:val", "--output", str(tmp_path / "preds"), cwd=PLUGINS, env=env)
    assert infer.returncode == 0, infer.stderr[-2000:]
    rows = pq.read_table(tmp_path / "preds").to_pylist()
    assert len(rows) == 40 and all(r["error"] is None for r in rows)
    truth = {f"stripes/{i:04d}.png": ("horizontal", "vertical")[i % 2] for i in range(160, 200)}
    assert sum(r["label"] == truth[r["path"]] for r in rows) >= 36  # stripes are easy: 2 epochs learn them


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------

TIMM_WEIGHTS = r"""
import os, sys, timm, torch
from safetensors.torch import save_file
from raycv.errors import UserError
from raycv.models import get_model, get_model_entry
out = []
for name, weights in [("timm/test_resnet", "DEFAULT"), ("timm/test_resnet", "nope"), ("timm/resnet_nope", None)]:
    try:
        get_model(name, num_classes=10, weights=weights)
    except UserError as e:
        out.append(str(e))
# the Hugging Face cache as a download leaves it: refs/main -> snapshots/<commit>/model.safetensors
src = timm.create_model("test_resnet", num_classes=1000)
repo = os.path.join(os.environ["HF_HOME"], "hub", "models--timm--test_resnet.r160_in1k")
os.makedirs(repo + "/snapshots/0123abcd"); os.makedirs(repo + "/refs")
open(repo + "/refs/main", "w").write("0123abcd")
save_file({k: v.contiguous() for k, v in src.state_dict().items()}, repo + "/snapshots/0123abcd/model.safetensors")
m = get_model("timm/test_resnet", num_classes=10, weights="DEFAULT")
sd, ref = m.state_dict(), src.state_dict()
same = [k for k in sd if k in ref and sd[k].shape == ref[k].shape and torch.equal(sd[k], ref[k])]
print(__import__("json").dumps({"errors": out, "same": len(same), "total": len(sd), "fc": list(sd["fc.weight"].shape),
                                "input": get_model_entry("timm/test_resnet").default_input_size}))
"""


def test_timm_weights_come_from_the_hugging_face_cache_or_fail_in_one_line(tmp_path):
    pytest.importorskip("timm")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # read when huggingface_hub is imported
    r = subprocess.run([sys.executable, "-c", TIMM_WEIGHTS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    offline, bad_tag, bad_name = got["errors"]
    assert offline.startswith("could not load timm weights 'test_resnet': not in the Hugging Face cache") and "\n" not in offline
    assert bad_tag == "timm model 'test_resnet' has no pretrained weights 'nope' (valid: DEFAULT, r160_in1k)"
    assert bad_name.startswith("unknown timm model 'resnet_nope' (close: ")
    # every tensor but the new 10-class head is the cached file's
    assert got["fc"] == [10, 96] and got["same"] == got["total"] - 2 and got["input"] == 160


@pytest.mark.slow
def test_a_timm_model_trains_infers_predicts_and_exports(ray_session, tmp_path):
    pytest.importorskip("timm")
    import raycv
    from raycv.data.bundled import digits_root
    from raycv.export import export_checkpoint

    s = raycv.train(overrides={"model.name": "timm/test_resnet", "train.epochs": 3, "scaling.num_workers": 2,  # DDP
                               "run.storage_path": str(tmp_path), "run.name": "timm"})
    assert s.epochs == 3 and s.val_accuracy > 0.5  # 10 classes: chance is 0.1
    folder = tmp_path / "images"
    for digit in "0123456789":
        (folder / digit).mkdir(parents=True)
        for src in sorted((digits_root() / digit).glob("*.png"))[:3]:
            (folder / digit / src.name).write_bytes(src.read_bytes())
    infer = raycv.infer(tmp_path / "timm", folder, tmp_path / "preds")
    assert infer.rows == 30 and infer.errors == 0
    written = {r["path"]: r for r in pq.read_table(tmp_path / "preds").to_pylist()}
    p = raycv.load(tmp_path / "timm")
    assert type(p.model).__module__.startswith("timm.")
    for row in p(sorted(written)):  # in this process, without Ray: the same answers
        assert row["label"] == written[row["path"]]["label"]
        assert row["score"] == pytest.approx(written[row["path"]]["score"], abs=1e-5)
    onnx = export_checkpoint(str(tmp_path / "timm"), "onnx", str(tmp_path / "m.onnx"))
    assert onnx.max_abs_diff < 1e-3 and json.loads(Path(onnx.sidecar).read_text())["model"] == "timm/test_resnet"
