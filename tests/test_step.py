"""The training recipe observed in the worker's step function (raycv.training.step, what the Ray
Train loop calls for every batch), built from `train.*` settings as the worker builds it: the
forward's autocast dtype and memory layout, soft targets under MixUp/CutMix, how often the
optimizer steps under accumulation, the gradient norm it steps with under clipping, label
smoothing, the learning-rate schedule against its formula, torch.compile, and the augmentation the
worker's collate function applies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raycv.config import load_config
from raycv.training.batches import AugmentCollate
from raycv.training.driver import make_presets
from raycv.training.optim import build_loss, build_optimizer, build_scheduler
from raycv.training.precision import Precision
from raycv.training.step import build_stepper

NUM_CLASSES = 5


class TinyNet(nn.Module):
    """Convolution, ReLU, pooling, a linear head: no batch norm, so accumulated gradients of
    micro-batches equal one batch's exactly (up to float rounding)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _setup(overrides: list[str], batches_per_epoch: int = 4, seed: int = 0):
    cfg = load_config("train", None, ["optim.name=sgd", "optim.momentum=0", "train.warmup_epochs=0", *overrides])
    torch.manual_seed(seed)
    precision = Precision(cfg.train.amp, cfg.train.channels_last, torch.device("cpu"))
    model = precision.layout(TinyNet())
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch=math.ceil(batches_per_epoch / cfg.train.grad_accum_steps),
                                cfg=cfg.train)
    stepper = build_stepper(model, optimizer, scheduler, cfg=cfg.train, task="classification", num_classes=NUM_CLASSES,
                            precision=precision, batches_per_epoch=batches_per_epoch)
    return model, optimizer, scheduler, stepper


def _batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("none", False)])
def test_forward_dtype_and_memory_layout_follow_amp_and_channels_last(amp, channels_last):
    model, _, _, stepper = _setup([f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}"])
    seen = {}
    model.register_forward_pre_hook(lambda m, args: seen.update(
        autocast=torch.is_autocast_enabled("cpu"), autocast_dtype=torch.get_autocast_dtype("cpu"),
        nhwc=args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    model.conv.register_forward_hook(lambda m, args, out: seen.update(conv_dtype=out.dtype))
    stepper.begin_epoch()
    stepper(*_batch())
    assert seen["autocast"] is (amp == "bf16")
    assert seen["conv_dtype"] == (torch.bfloat16 if amp == "bf16" else torch.float32)
    if amp == "bf16":
        assert seen["autocast_dtype"] == torch.bfloat16
    assert seen["nhwc"] is channels_last
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert model.conv.weight.dtype == torch.float32  # autocast computes in bf16; the weights stay float32


@pytest.mark.parametrize("mix", [["train.mixup_alpha=0.2"], ["train.cutmix_alpha=1.0"],
                                 ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0"], []])
def test_mixup_and_cutmix_train_on_soft_targets(mix):
    _, _, _, stepper = _setup(mix)
    targets = []
    loss_fn = stepper.loss_fn
    stepper.loss_fn = lambda out, y: (targets.append(y), loss_fn(out, y))[1]
    stepper.begin_epoch()
    x, y = _batch(16)
    for _ in range(4):
        stepper(x, y)
    if not mix:
        assert all(t.dtype == torch.int64 and torch.equal(t, y) for t in targets)
        return
    assert all(t.shape == (16, NUM_CLASSES) and t.is_floating_point() for t in targets)
    assert all(torch.allclose(t.sum(dim=1), torch.ones(16)) for t in targets)  # probabilities
    assert any(float(t.max(dim=1).values.min()) < 1.0 for t in targets)  # mixed: not one-hot


def test_the_optimizer_steps_once_per_accumulation_and_at_the_epoch_end():
    """7 micro-batches with grad_accum_steps=3: steps after micro-batches 3, 6 and 7, per epoch."""
    _, optimizer, scheduler, stepper = _setup(["train.grad_accum_steps=3"], batches_per_epoch=7)
    steps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(stepper.micro))
    for _ in range(2):
        stepper.begin_epoch()
        stepped = [stepper(*_batch(4, seed=i)).stepped for i in range(7)]
        assert stepped == [False, False, True, False, False, True, True]
    assert steps == [3, 6, 7, 3, 6, 7] and scheduler.last_epoch == 6


def test_accumulated_micro_batches_step_like_one_batch():
    """Three micro-batches of 4 with grad_accum_steps=3 move the weights as one batch of 12 does."""
    x, y = _batch(12)
    accum, _, _, stepper = _setup(["train.grad_accum_steps=3"], batches_per_epoch=3)
    stepper.begin_epoch()
    for i in range(3):
        stepper(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
    whole, _, _, stepper = _setup([], batches_per_epoch=1)
    stepper.begin_epoch()
    stepper(x, y)
    for a, b in zip(accum.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    fresh, _, _, _ = _setup([])
    assert not torch.equal(fresh.fc.weight, whole.fc.weight)  # and the step did move them


@pytest.mark.parametrize("clip", [0.05, None])
def test_the_optimizer_steps_with_the_clipped_gradient(clip):
    _, optimizer, _, stepper = _setup([f"train.grad_clip_norm={clip}"] if clip else [])
    norms = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: norms.append(float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for g in opt.param_groups for p in g["params"]])))))
    stepper.begin_epoch()
    results = [stepper(*_batch(8, seed=i)) for i in range(4)]
    assert len(norms) == 4
    if clip is None:
        assert all(r.grad_norm is None for r in results) and max(norms) > 0.05
        return
    assert all(r.grad_norm > clip for r in results)  # the raw gradients were larger than the limit ...
    assert all(n == pytest.approx(clip, rel=1e-4) for n in norms)  # ... and the optimizer saw them clipped


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    """label_smoothing=eps: the target puts 1-eps on the class and eps spread over all classes."""
    cfg = load_config("train", None, ["train.label_smoothing=0.1"]).train
    logits = torch.randn(6, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    target = torch.full((6, NUM_CLASSES), 0.1 / NUM_CLASSES)
    target[torch.arange(6), y] += 0.9
    expected = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert float(build_loss(cfg)(logits, y)) == pytest.approx(float(expected), rel=1e-6)
    assert float(build_loss(load_config("train", None, []).train)(logits, y)) != pytest.approx(float(expected), rel=1e-3)


def test_the_learning_rate_warms_up_linearly_then_follows_the_cosine():
    """lr at each optimizer step, against the formula: lr * (f + (1-f) * s/W) for s < W warm-up
    steps, then lr * (1 + cos(pi * (s-W) / (T-W))) / 2 over the T steps of the run."""
    lr, f, spe, epochs, warm = 0.2, 0.1, 5, 4, 1
    cfg = load_config("train", None, [f"optim.lr={lr}", f"train.warmup_factor={f}", f"train.epochs={epochs}",
                                      f"train.warmup_epochs={warm}"])
    optimizer = build_optimizer([nn.Parameter(torch.zeros(1))], cfg.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch=spe, cfg=cfg.train)
    seen = []
    for _ in range(spe * epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    W, T = warm * spe, epochs * spe
    expected = [lr * (f + (1 - f) * s / W) if s < W else lr * (1 + math.cos(math.pi * (s - W) / (T - W))) / 2
                for s in range(T)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # ends at zero


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_resumed_optimizer_takes_the_configs_values_and_keeps_its_state(name):
    """What a worker does on resume (and raycv tune's PBT relies on): the checkpoint's optimizer state
    (momentum, Adam's moments, the schedule's step) with the config's lr, weight decay and momentum,
    at the step the schedule had reached; with the config unchanged, bit for bit the checkpoint's."""
    from raycv.training.optim import follow_config, lr_factor

    spe = 5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))

    def build(lr: float, wd: float, momentum: float):
        cfg = load_config("train", None, [f"optim.name={name}", f"optim.lr={lr}", f"optim.weight_decay={wd}",
                                          f"optim.momentum={momentum}", "train.epochs=4"])
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, steps_per_epoch=spe, cfg=cfg.train)
        return cfg, optimizer, scheduler, [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    cfg, optimizer, scheduler, _ = build(0.1, 1e-3, 0.9)
    for _ in range(7):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()

    same_cfg, same, same_sched, configured = build(0.1, 1e-3, 0.9)  # a plain resume
    same.load_state_dict(saved_opt)
    same_sched.load_state_dict(saved_sched)
    follow_config(same, same_sched, configured)
    assert same.state_dict()["param_groups"] == saved_opt["param_groups"]
    assert same_sched.state_dict() == saved_sched

    new_cfg, resumed, new_sched, configured = build(0.03, 2e-3, 0.5)  # PBT's new values
    resumed.load_state_dict(saved_opt)
    new_sched.load_state_dict(saved_sched)
    follow_config(resumed, new_sched, configured)
    factor = lr_factor(7, steps_per_epoch=spe, cfg=new_cfg.train)
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([0.03 * factor] * 2, rel=1e-12)
    assert [g["weight_decay"] for g in resumed.param_groups] == [2e-3, 0.0]  # norms and biases: none
    if name == "sgd":
        assert [g["momentum"] for g in resumed.param_groups] == [0.5, 0.5]
    for key, state in saved_opt["state"].items():  # momentum buffers / Adam's moments, as saved
        assert all(torch.equal(v, resumed.state_dict()["state"][key][k]) for k, v in state.items())
    new_sched.step()  # and the schedule goes on from step 7 with the new peak
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.03 * lr_factor(8, steps_per_epoch=spe, cfg=new_cfg.train),
                                                          rel=1e-12)


def test_step_schedule_decays_by_gamma_every_step_epochs():
    cfg = load_config("train", None, ["optim.lr=1.0", "train.lr_schedule=step", "train.step_epochs=2",
                                      "train.step_gamma=0.5", "train.epochs=6", "train.warmup_epochs=0"])
    optimizer = build_optimizer([nn.Parameter(torch.zeros(1))], cfg.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch=3, cfg=cfg.train)
    seen = []
    for _ in range(18):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [1.0] * 6 + [0.5] * 6 + [0.25] * 6


@pytest.mark.slow  # inductor compiles C++ for the CPU: ~25 s
def test_compile_runs_the_step_through_torch_compile():
    """train.compile=true: the step calls the torch.compile of the model (dynamo captures its
    frame), and the loss is the eager model's."""
    import torch._dynamo

    x, y = _batch()
    model, _, _, eager = _setup([])
    eager.begin_epoch()
    expected = float(eager(x, y).loss.detach())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, _, _, compiled = _setup(["train.compile=true"])
    assert isinstance(compiled.forward, torch._dynamo.eval_frame.OptimizedModule)
    compiled.begin_epoch()
    got = float(compiled(x, y).loss.detach())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert got == pytest.approx(expected, rel=1e-4)


def _collate(overrides: list[str]) -> AugmentCollate:
    cfg = load_config("train", None, ["data.input_size=24", "data.resize_size=32", *overrides])
    train, _ = make_presets(cfg, (0.5,) * 3, (0.25,) * 3)
    return AugmentCollate(train)


def _uint8_batch(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)  # no zero pixels: an erased (zeroed) patch stands out
    return {"image": rng.integers(1, 256, (n, 3, 32, 32), dtype=np.uint8), "label": np.arange(n)}


def test_random_erasing_zeroes_a_patch_of_every_image():
    batch = _uint8_batch()
    erased, plain = _collate(["data.augment=standard", "data.random_erasing=1.0"]), _collate(["data.augment=standard"])
    for i in range(len(batch["label"])):  # one image at a time: both draw the same crop first
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.manual_seed(i)
        a = erased(one)["image"][0]
        torch.manual_seed(i)
        b = plain(one)["image"][0]
        changed = (a != b).any(dim=0)
        assert a.shape == b.shape == (3, 24, 24) and changed.any()
        assert (a[:, changed] == 0).all()  # where they differ, the erased image is black
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float().mean() > 0.5  # one patch


def test_randaugment_changes_the_batch_after_the_crop():
    batch = _uint8_batch()
    torch.manual_seed(0)
    rand = _collate(["data.augment=randaugment"])(batch)["image"]
    torch.manual_seed(0)
    plain = _collate(["data.augment=standard"])(batch)["image"]
    assert rand.shape == plain.shape == (6, 3, 24, 24) and rand.dtype == torch.uint8
    assert sum(not torch.equal(r, p) for r, p in zip(rand, plain)) >= 3
