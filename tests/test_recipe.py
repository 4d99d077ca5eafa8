"""The training recipe on CPU: bf16 autocast, channels_last, MixUp + CutMix, RandAugment + random
erasing, gradient accumulation and clipping, weight-decay groups, an EMA of the weights (evaluated,
checkpointed, resumed), early stopping, fine-tuning from a raycv checkpoint with a new head, and
`raycv report` drawing the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DETERMINISTIC, assert_same_run

from raycv.cli import main
from raycv.config import load_config
from raycv.errors import UserError
from raycv.models import get_model
from raycv.training import checkpoint as ckpt
from raycv.training.optim import build_optimizer

RECIPE = ["train.amp=bf16", "train.channels_last=true", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
          "data.augment=randaugment", "data.random_erasing=0.25", "train.grad_accum_steps=2",
          "train.grad_clip_norm=1.0", "optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=5e-4",
          "train.ema_decay=0.9", "scaling.num_workers=2", "train.warmup_epochs=0", "train.log_every_steps=5"]


@pytest.mark.slow
def test_full_recipe_trains_checkpoints_ema_and_resumes(ray_session, tmp_path, capsys):
    mlruns = f"file://{tmp_path / 'mlruns'}"  # a real MLflow file store, written by rank 0 and the driver
    rc = main(["train", *RECIPE, "train.epochs=2", f"run.storage_path={tmp_path}", "run.name=recipe",
               f"run.mlflow_tracking_uri={mlruns}"])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "recipe"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    last = run / "checkpoint_epoch_0002"
    state = ckpt.load_train_state(last)
    assert {"ema", "model", "optimizer", "scheduler"} <= set(state)
    # grad_accum_steps=2: the optimizer stepped once per two of each rank's batches, each epoch.
    cfg = load_config("train", str(run / "config.yaml"), [])
    per_rank = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_images"] // 2  # 2 workers
    batches = math.ceil(per_rank / cfg.data.batch_size)
    assert state["scheduler"]["last_epoch"] == 2 * math.ceil(batches / 2)
    averaged = ckpt.load_state_dict(last)  # model.pt holds the EMA weights: what was evaluated
    raw = state["model"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if raw[k].is_floating_point())
    model, info = ckpt.load_model(last)  # and it loads as a plain model for inference
    assert info.metrics["val_accuracy"] == pytest.approx(
        json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_accuracy"])

    rc = main(["train", *RECIPE, "train.epochs=3", f"run.storage_path={tmp_path}", "run.name=recipe",
               f"run.mlflow_tracking_uri={mlruns}"])
    out = capsys.readouterr().out
    assert rc == 0 and "resumed from the epoch-2 checkpoint" in out
    assert [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    steps = [json.loads(ln) for ln in (run / "steps.jsonl").read_text().splitlines()]
    assert steps and [s["step"] for s in steps] == list(range(5, 5 * len(steps) + 1, 5))  # each once, in order
    assert {s["epoch"] for s in steps} == {1, 2, 3}
    assert all(s["grad_norm"] > 0 for s in steps)  # grad_clip_norm: the norm before clipping, logged

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert [e.value for e in tb.Scalars("val/accuracy")] == pytest.approx(
        [json.loads(ln)["val_accuracy"] for ln in (run / "metrics.jsonl").read_text().splitlines()])
    assert len(tb.Scalars("train/loss_step")) == len(steps)

    # MLflow: one run across the resume, the config as params, every epoch's metrics, the artifacts.
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(mlruns)
    run_id = (run / "mlflow_run_id").read_text().strip()
    found = client.search_runs([client.get_experiment_by_name("raycv").experiment_id])
    assert [r.info.run_id for r in found] == [run_id]
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED" and mrun.data.params["train.ema_decay"] == "0.9"
    assert mrun.data.params["train.epochs"] == "2"  # logged once, by the first attempt
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy"))
    assert [step for step, _ in history] == [1, 2, 3]
    assert [v for _, v in history] == pytest.approx(
        [json.loads(ln)["val_accuracy"] for ln in (run / "metrics.jsonl").read_text().splitlines()])
    assert len(client.get_metric_history(run_id, "loss_step")) == len(steps)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"curves.png", "summary.json", "metrics.jsonl"}

    # `raycv report`: the table, the best checkpoint, and a PNG that is a real picture of curves.
    (run / "curves.png").unlink()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "epoch" in out and "best checkpoint:" in out and out.count("\n") >= 5
    img = np.asarray(Image.open(run / "curves.png").convert("L"))
    assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 10  # drawn, not blank


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_says_so(ray_session, tmp_path, capsys):
    """lr=1e-9: the validation accuracy cannot improve after epoch 1, so patience 1 stops at epoch 2,
    on both ranks at once (one rank going on alone would wait forever in its next all-reduce)."""
    rc = main(["train", "train.epochs=10", "train.early_stop_patience=1", "optim.lr=1e-9", "train.lr_schedule=constant",
               "train.warmup_epochs=0", "scaling.num_workers=2", f"run.storage_path={tmp_path}", "run.name=es"])
    out = capsys.readouterr().out
    assert rc == 0 and "stopped early after epoch 2" in out
    log = [json.loads(ln) for ln in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1, 2] and log[-1]["early_stopped"] and len(log[-1]["worker_nodes"]) == 2
    assert json.loads((tmp_path / "es" / "summary.json").read_text())["early_stopped"] is True


@pytest.mark.slow
def test_deterministic_runs_give_identical_weights(deterministic_run, tmp_path, capsys):
    """train.deterministic=true: a second 2-worker run of the same config ends with the same weights,
    bit for bit (each rank's part of the data and its order are fixed, augmentation and MixUp draw on
    the training thread in batch order, the thread count is fixed). Without it the same two runs
    differ (measured: up to 0.08 apart in a weight)."""
    assert main(["train", *DETERMINISTIC, f"run.storage_path={tmp_path}", "run.name=two"]) == 0, capsys.readouterr().err
    assert_same_run(deterministic_run, tmp_path / "two")


def test_weight_decay_skips_norm_and_bias():
    cfg = load_config("train", None, ["optim.name=sgd", "optim.weight_decay=0.1"]).optim
    model = get_model("resnet18_cifar", num_classes=10)
    decay, no_decay = build_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cfg = load_config("train", None, ["optim.weight_decay=0.1", "optim.decay_norm_and_bias=true"]).optim
    assert len(build_optimizer(model, cfg).param_groups) == 1


def _saved(tmp_path: Path, classes: int) -> Path:
    from raycv.data.presets import ClassificationEvalPreset

    model = get_model("resnet18_cifar", num_classes=classes)
    info = ckpt.CheckpointInfo(task="classification", model_name="resnet18_cifar", model_kwargs={},
                               classes=[str(i) for i in range(classes)], preprocess=ClassificationEvalPreset(input_size=32, resize_size=32),
                               epoch=1, metrics={}, config={})
    return ckpt.write_checkpoint(tmp_path / f"c{classes}", model, info)


def test_fine_tune_from_a_raycv_checkpoint_with_a_new_head(tmp_path):
    src = _saved(tmp_path, classes=10)
    saved = ckpt.load_state_dict(src)
    model = get_model("resnet18_cifar", num_classes=3)
    fresh_head = model.fc.weight.clone()
    ckpt.init_from_checkpoint(model, str(src))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("fc."))  # the body came over
    assert torch.equal(model.fc.weight, fresh_head) and model.fc.out_features == 3  # the head is new
    with pytest.raises(UserError, match="same architecture"):
        ckpt.init_from_checkpoint(get_model("simple_cnn", num_classes=3), str(src))


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "train.amp=fp16", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raycv train: error: train.amp=fp16 needs GPUs (scaling.use_gpu=true); on CPU use train.amp=bf16"]
