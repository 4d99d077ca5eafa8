import subprocess
import sys
from pathlib import Path

import pytest

from raycv.config import TrainConfig, load_config, parse_overrides
from raycv.errors import ConfigError

RECIPES = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads(recipe):
    import yaml

    kind = "tune" if "tune" in (yaml.safe_load(recipe.read_text()) or {}) else "train"  # a search's recipe
    cfg = load_config(kind, recipe)
    assert isinstance(cfg, TrainConfig)
    from raycv.data import get_dataset_entry
    from raycv.models import get_model_entry

    get_dataset_entry(cfg.data.name)
    get_model_entry(cfg.model.name)


def test_required_keys_exist_and_override():
    cfg = load_config("train", None, ["data.name=shapes", "model.name=resnet18_cifar", "train.epochs=3",
                                      "scaling.num_workers=1", "run.storage_path=/tmp/x", "run.name=abc"])
    assert (cfg.data.name, cfg.model.name, cfg.train.epochs) == ("shapes", "resnet18_cifar", 3)
    assert (cfg.scaling.num_workers, cfg.run.storage_path, cfg.run.name) == (1, "/tmp/x", "abc")


def test_overrides_beat_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\noptim:\n  lr: 0.5\n")
    cfg = load_config("train", recipe, ["train.epochs=2"])
    assert cfg.train.epochs == 2 and cfg.optim.lr == 0.5


def test_override_values_are_yaml():
    assert parse_overrides(["data.mean=[0.5, 0.5, 0.5]", "run.name=null", "a.b.c=x"]) == {
        "data": {"mean": [0.5, 0.5, 0.5]}, "run": {"name": None}, "a": {"b": {"c": "x"}}}


@pytest.mark.parametrize("override, expected", [
    ("train.epoch=3", "unknown config key 'train.epoch' (valid keys here: epochs,"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.epochs=abc", "train.epochs='abc'"),
    ("train.epochs=0", "greater than or equal to 1"),
    ("optim.name=rmsprop", "'sgd', 'adam' or 'adamw'"),
    ("data.batch_size=-4", "data.batch_size=-4"),
    ("noequals", "not of the form section.key=value"),
])
def test_bad_values_name_key_value_and_choices(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("train", None, [override])
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("train", "/nonexistent/recipe.yaml")


def test_cli_config_error_is_one_line_exit_2():
    """A real process, no Ray: the bad key fails before Ray starts."""
    r = subprocess.run([sys.executable, "-m", "raycv.cli", "train", "train.epoch=3"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epoch" in lines[0] and "Traceback" not in r.stderr


def test_cli_lists_models_and_datasets():
    r = subprocess.run([sys.executable, "-m", "raycv.cli", "models"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "simple_cnn" in r.stdout and "resnet18_cifar" in r.stdout and "resnet50" in r.stdout
    assert any(ln.split()[:2] == ["deeplabv3_resnet50", "segmentation"] for ln in r.stdout.splitlines())
    r = subprocess.run([sys.executable, "-m", "raycv.cli", "datasets"], capture_output=True, text=True, timeout=120)
    for name in ("digits", "shapes", "image_folder", "cifar10", "parquet", "shapes_segmentation", "voc_segmentation",
                 "parquet_segmentation"):
        assert name in r.stdout


@pytest.mark.parametrize("name", ["2024", "2024-01-01", "exp.1_a-b", "A" * 128])
def test_a_run_name_is_taken_as_written(name):
    assert load_config("train", None, [f"run.name={name}"]).run.name == name


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".hidden", "/abs", "a\\b", "x y", "A" * 129, "-x"])
def test_a_run_name_is_one_folder_name(name):
    """A run name is joined to run.storage_path: anything but one plain component could land outside it."""
    with pytest.raises(ConfigError, match=r"^run\.name: .* must be one folder name"):
        load_config("train", None, [f"run.name={name}"])


@pytest.mark.parametrize("argv, message", [
    (["train", "data.name=cifar10"], "dataset 'cifar10' needs data.root=PATH"),
    (["train", "data.name=cifar10", "data.root=/no/such/cifar"], "data.root does not exist: /no/such/cifar"),
    (["train", "model.init_from=/no/such/run"], "model.init_from does not exist: /no/such/run"),
    (["train", "optim.lr=.inf"], "optim.lr=inf: Input should be a finite number"),
    (["train", "train.epochs=1000000000000"], "train.epochs=1000000000000: Input should be less than or equal to"),
    (["train", "scaling.num_workers=100000"], "scaling.num_workers=100000: Input should be less than or equal to"),
    (["infer", "--input", "/no/such/images"], "infer.input does not exist: /no/such/images"),
    (["infer", "--input", "registry:digits:test"], "registry input split must be train or val, got 'test'"),
    (["infer", "--input", "registry:nope"], "unknown dataset 'nope'"),
])
def test_bad_input_is_refused_before_ray_starts(argv, message, monkeypatch, tmp_path, capsys):
    from conftest import untrained_checkpoint

    from raycv import runtime
    from raycv.cli import main

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    if argv[0] == "infer":
        argv = [*argv, "--checkpoint", str(untrained_checkpoint(tmp_path / "ckpt")), "--output", str(tmp_path / "out")]
    assert main([*argv, f"run.storage_path={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_credentials_in_uris_are_redacted_where_raycv_writes_or_prints_them(monkeypatch, capsys):
    from raycv import runtime
    from raycv.cli import main
    from raycv.config import to_yaml
    from raycv.redact import redact

    assert redact("https://user:pa55@mlflow:5000/x") == "https://***@mlflow:5000/x"
    assert redact("s3://AKIA:SECRET@bucket/k?X-Amz-Signature=abc&x=1&token=t") == \
        "s3://***@bucket/k?X-Amz-Signature=***&x=1&token=***"
    assert redact("gs://bucket/plain/path.parquet") == "gs://bucket/plain/path.parquet"
    cfg = load_config("train", None, ["run.mlflow_tracking_uri=https://user:pa55@mlflow:5000"])
    assert "pa55" not in to_yaml(cfg) and cfg.run.mlflow_tracking_uri == "https://user:pa55@mlflow:5000"
    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    # an error line that names the URI (a scheme pyarrow cannot open: no network is touched)
    assert main(["train", "data.name=image_folder", "data.root=nofs://AKIA:SECRET@host/none"]) == 2
    err = capsys.readouterr().err
    assert "SECRET" not in err and "nofs://***@host/none" in err
    assert main(["submit", "--address", "http://127.0.0.1:9", "infer", "--input", "s3://AKIA:SECRET@bucket/x"]) == 2
    err = capsys.readouterr().err
    assert "SECRET" not in err and "would be readable by anyone who can list the cluster's jobs" in err
