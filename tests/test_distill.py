"""Knowledge distillation (train.distill): the loss the worker's step computes against its formula,
the teacher seeing the batch through its own preprocessing and never learning, the refusals, and a
student trained from the digits fixture's teacher on the session cluster."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from raycv.config import load_config
from raycv.data.presets import ClassificationEvalPreset
from raycv.errors import UserError
from raycv.models import get_model
from raycv.training import checkpoint as ckpt
from raycv.training.distill import check_teacher
from raycv.training.optim import build_optimizer, build_scheduler
from raycv.training.precision import Precision
from raycv.training.step import build_stepper

CLASSES = ["a", "b", "c", "d", "e"]
TEACHER_PRESET = ClassificationEvalPreset(input_size=24, resize_size=24, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
STUDENT_MEAN, STUDENT_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _teacher(path, *, task: str = "classification", classes=CLASSES, seed: int = 7):
    torch.manual_seed(seed)
    model = get_model("simple_cnn", num_classes=len(classes), input_size=24)
    info = ckpt.CheckpointInfo(task=task, model_name="simple_cnn", model_kwargs={"input_size": 24}, classes=classes,
                               preprocess=TEACHER_PRESET, epoch=1, metrics={}, config={})
    ckpt.write_checkpoint(path, model, info, None)
    return model.eval()


def _stepper(teacher_dir, overrides=()):
    cfg = load_config("train", None, ["optim.name=sgd", "optim.momentum=0", "train.warmup_epochs=0",
                                      f"train.distill.teacher={teacher_dir}", *overrides])
    torch.manual_seed(0)
    student = get_model("simple_cnn", num_classes=len(CLASSES), input_size=16)
    optimizer = build_optimizer(student, cfg.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch=4, cfg=cfg.train)
    stepper = build_stepper(student, optimizer, scheduler, cfg=cfg.train, task="classification",
                            num_classes=len(CLASSES), precision=Precision("none", False, torch.device("cpu")),
                            batches_per_epoch=4, student_norm=(STUDENT_MEAN, STUDENT_STD))
    return student, stepper


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return raw, torch.randint(0, len(CLASSES), (n,), generator=g)


def _normalize(raw, mean, std):
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (raw.float() / 255 - m) / s


def test_the_loss_is_soft_teacher_targets_plus_labels_and_the_teacher_sees_its_own_preprocessing(tmp_path):
    teacher = _teacher(tmp_path / "teacher")
    student, stepper = _stepper(tmp_path / "teacher", ["train.distill.temperature=3", "train.distill.alpha=0.7"])
    raw, y = _batch()
    x = _normalize(raw, STUDENT_MEAN, STUDENT_STD)
    # what the teacher must see: the same pixels, normalized its way, resized to its 24 px
    expected_input = F.interpolate(_normalize(raw, TEACHER_PRESET.mean, TEACHER_PRESET.std), size=(24, 24),
                                   mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(stepper.distill.teacher_input(x), expected_input, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher(expected_input)
    p_t = F.softmax(t_logits / 3, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s_logits / 3, dim=1))).sum(dim=1).mean()
    expected = 0.7 * 9 * kl + 0.3 * F.cross_entropy(s_logits, y)
    before = {k: v.clone() for k, v in stepper.distill.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    result = stepper(x, y)
    assert math.isclose(result.loss.item(), expected.item(), rel_tol=1e-4)
    assert math.isclose(stepper.distill.last_kd.item(), 9 * kl.item(), rel_tol=1e-4)
    # the teacher neither learns nor leaves eval mode; the student did step
    after = stepper.distill.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not stepper.distill.teacher.training and all(p.grad is None for p in stepper.distill.teacher.parameters())
    assert result.stepped and any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_alpha_weighs_the_teacher_against_the_labels(tmp_path):
    _teacher(tmp_path / "teacher")
    raw, y = _batch()
    x = _normalize(raw, STUDENT_MEAN, STUDENT_STD)
    losses = {}
    for alpha in (0.0, 1.0):
        student, stepper = _stepper(tmp_path / "teacher", [f"train.distill.alpha={alpha}"])
        with torch.no_grad():
            ce = F.cross_entropy(student(x), y).item()
        losses[alpha] = (stepper(x, y).loss.item(), ce, stepper.distill.last_kd.item())
    assert math.isclose(losses[0.0][0], losses[0.0][1], rel_tol=1e-6)  # the labels alone
    assert math.isclose(losses[1.0][0], losses[1.0][2], rel_tol=1e-6)  # the teacher alone
    assert not math.isclose(losses[1.0][0], losses[1.0][1], rel_tol=1e-3)


def test_a_teacher_of_another_task_other_classes_or_nowhere_is_one_line(tmp_path):
    _teacher(tmp_path / "teacher")
    check_teacher(str(tmp_path / "teacher"), "classification", CLASSES)
    with pytest.raises(UserError, match=r"trained on other classes \(class 2 is 'c' there, 'x' here\)"):
        check_teacher(str(tmp_path / "teacher"), "classification", ["a", "b", "x", "d", "e"])
    with pytest.raises(UserError, match=r"other classes \(5 classes there, 4 here\)"):
        check_teacher(str(tmp_path / "teacher"), "classification", CLASSES[:4])
    with pytest.raises(UserError, match="distillation is for classification; the teacher is classification and this run trains segmentation"):
        check_teacher(str(tmp_path / "teacher"), "segmentation")
    _teacher(tmp_path / "seg", task="segmentation")
    with pytest.raises(UserError, match="the teacher is segmentation"):
        check_teacher(str(tmp_path / "seg"), "classification")
    with pytest.raises(UserError, match=r"^train.distill.teacher: checkpoint not found: "):
        check_teacher(str(tmp_path / "nowhere"), "classification")
    with pytest.raises(Exception, match="train.distill.alpha"):
        load_config("train", None, ["train.distill.alpha=1.5"])


def test_offline_the_loss_takes_the_logits_read_from_disk_and_refuses_what_breaks_the_pairing(tmp_path):
    cfg = load_config("train", None, ["optim.name=sgd", "train.warmup_epochs=0", f"train.distill.logits={tmp_path}",
                                      "train.distill.alpha=1", "train.distill.temperature=2"])
    torch.manual_seed(0)
    student = get_model("simple_cnn", num_classes=len(CLASSES), input_size=16)
    optimizer = build_optimizer(student, cfg.optim)
    stepper = build_stepper(student, optimizer, build_scheduler(optimizer, steps_per_epoch=4, cfg=cfg.train),
                            cfg=cfg.train, task="classification", num_classes=len(CLASSES),
                            precision=Precision("none", False, torch.device("cpu")), batches_per_epoch=4,
                            student_norm=(STUDENT_MEAN, STUDENT_STD))
    assert stepper.distill.teacher is None
    raw, y = _batch()
    x = _normalize(raw, STUDENT_MEAN, STUDENT_STD)
    teacher = torch.randn(len(y), len(CLASSES), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        s_logits = student(x)
    p_t = F.softmax(teacher / 2, dim=1)
    expected = 4 * (p_t * (p_t.log() - F.log_softmax(s_logits / 2, dim=1))).sum(dim=1).mean()
    assert math.isclose(stepper(x, y, teacher).loss.item(), expected.item(), rel_tol=1e-4)
    from raycv.training.distill import check_offline

    def refused(overrides, match):
        with pytest.raises(UserError, match=match):
            check_offline(load_config("train", None, [f"train.distill.logits={tmp_path}", *overrides]), "classification")

    refused([], "data.augment changes the image: set data.augment=none")  # the default augments
    refused(["data.augment=none", "data.hflip=true"], "data.hflip changes the image")
    refused(["data.augment=none", "train.mixup_alpha=0.2"], "train.mixup_alpha changes the image")
    refused(["data.augment=none", f"train.distill.teacher={tmp_path}"], "a teacher .online. or logits .offline., not both")
    refused(["data.augment=none"], f"train.distill.logits={tmp_path} is not a complete raycv infer output")


@pytest.mark.slow
def test_a_student_learns_from_the_teachers_logits_on_disk(ray_session, digits_run, tmp_path):
    """Offline: the digits fixture's logits over its training split, written by raycv infer, then a
    16-px student trained on them alone (alpha=1, no augmentation); a training split the logits do
    not cover, and an output without logits, are one line each."""
    import pyarrow.parquet as pq

    import raycv

    raycv.infer(digits_run.checkpoint, "registry:digits:train", tmp_path / "teacher", overrides={"infer.logits": True})
    from raycv.inference.output import read_output

    table = read_output(str(tmp_path / "teacher"))
    logits = torch.tensor(table.column("logits").to_pylist())
    assert logits.shape == (1438, 10) and logits.argmax(1).tolist() == table.column("label_index").to_pylist()
    assert pq.read_schema(next((tmp_path / "teacher").glob("*.parquet"))).field("logits").type.list_size == 10
    base = {"train.distill.logits": str(tmp_path / "teacher"), "train.distill.alpha": 1.0, "data.augment": "none",
            "data.input_size": 16, "model.kwargs": {"input_size": 16}, "train.epochs": 2, "scaling.num_workers": 2,
            "run.storage_path": str(tmp_path)}
    s = raycv.train(overrides={**base, "run.name": "offline"})
    log = [json.loads(ln) for ln in (tmp_path / "offline" / "metrics.jsonl").read_text().splitlines()]
    assert log[1]["train_distill_loss"] < log[0]["train_distill_loss"]
    assert s.val_accuracy > 0.5, s.val_accuracy
    # another split of the digits holds training images the logits lack
    with pytest.raises(UserError, match=r"has no teacher row for the training image .*digits-v1/\d/\d+\.png"):
        raycv.train(overrides={**base, "data.val_fraction": 0.1, "run.name": "other-split"})  # a bigger training split
    raycv.infer(digits_run.checkpoint, "registry:digits:val", tmp_path / "plain")
    with pytest.raises(UserError, match="has no logits column: infer with infer.logits=true"):
        raycv.train(overrides={**base, "train.distill.logits": str(tmp_path / "plain"), "run.name": "no-logits"})


@pytest.mark.slow
def test_a_student_learns_digits_from_the_teacher_alone(ray_session, digits_run, tmp_path):
    """alpha=1: no label reaches the loss, so what the student knows of digits came from the teacher
    (the digits fixture's 32-px CNN), which sees the student's 16-px batches resized to its own size;
    an untrained teacher teaches nothing."""
    import raycv

    s = raycv.train(overrides={"train.distill.teacher": str(digits_run.run_dir), "train.distill.alpha": 1.0,
                               "data.input_size": 16, "model.kwargs": {"input_size": 16}, "train.epochs": 2,
                               "scaling.num_workers": 2,
                               "run.storage_path": str(tmp_path), "run.name": "student"})
    log = [json.loads(ln) for ln in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["train_distill_loss"] < log[0]["train_distill_loss"]
    assert all(r["train_loss"] == pytest.approx(r["train_distill_loss"], rel=1e-4) for r in log)  # alpha=1
    assert s.val_accuracy > 0.5, s.val_accuracy  # 10 classes: chance is 0.1
    recorded = raycv.load(tmp_path / "student")
    assert recorded.classes == [str(i) for i in range(10)] and recorded.preprocess.input_size == 16
    # the same student taught by an untrained teacher of the same classes learns nothing useful
    _teacher(tmp_path / "random-teacher", classes=[str(i) for i in range(10)])
    r = raycv.train(overrides={"train.distill.teacher": str(tmp_path / "random-teacher"), "train.distill.alpha": 1.0,
                               "data.input_size": 16, "model.kwargs": {"input_size": 16}, "train.epochs": 2,
                               "scaling.num_workers": 2, "run.storage_path": str(tmp_path), "run.name": "untaught"})
    assert r.val_accuracy < 0.3, r.val_accuracy
    with pytest.raises(UserError, match="trained on other classes"):
        raycv.train(overrides={"train.distill.teacher": str(digits_run.run_dir), "data.name": "shapes",
                               "run.storage_path": str(tmp_path), "run.name": "wrong"})
    assert not (tmp_path / "wrong" / "metrics.jsonl").exists()
