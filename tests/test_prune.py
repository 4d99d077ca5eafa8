"""Pruning (train.prune): global magnitude pruning's zeros, kept through the optimizer's steps;
structured pruning that removes channels (the model smaller, a checkpoint that loads back to the
same outputs); the refusals; and on the session cluster, the digits fixture pruned and fine-tuned,
resumed, inferred with."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from raycv.config import PruneSection, load_config
from raycv.errors import UserError
from raycv.models import get_model
from raycv.training import pruning
from raycv.training.optim import build_optimizer, build_scheduler
from raycv.training.precision import Precision
from raycv.training.step import build_stepper


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_global_magnitude_zeros_the_smallest_weights_and_the_steps_keep_them_zero():
    torch.manual_seed(0)
    model = get_model("simple_cnn", num_classes=10)
    original = [m.weight.detach().clone() for m in pruning._prunable(model)]
    magnitudes = torch.cat([w.abs().flatten() for w in original]).sort().values
    pruning.prune(model, PruneSection(amount=0.6), (3, 32, 32))
    assert pruning.sparsity(model) == pytest.approx(0.6, abs=1e-6)
    threshold = magnitudes[round(0.6 * len(magnitudes)) - 1]
    for m, w in zip(pruning._prunable(model), original):  # across layers: the globally smallest 60%
        assert torch.equal(m.weight == 0, w.abs() <= threshold)
        assert torch.equal(m.weight[m.weight != 0], w[m.weight != 0])
    zeros = [(m.weight == 0).clone() for m in pruning._prunable(model)]
    cfg = load_config("train", None, ["optim.name=adam", "train.warmup_epochs=0"])
    optimizer = build_optimizer(model, cfg.optim)
    stepper = build_stepper(model, optimizer, build_scheduler(optimizer, steps_per_epoch=3, cfg=cfg.train),
                            cfg=cfg.train, task="classification", num_classes=10,
                            precision=Precision("none", False, torch.device("cpu")), batches_per_epoch=3,
                            masks=pruning.masks(model))
    before = [m.weight.detach().clone() for m in pruning._prunable(model)]
    stepper.begin_epoch()
    for _ in range(3):
        stepper(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    for m, z, b in zip(pruning._prunable(model), zeros, before):
        assert torch.all(m.weight[z] == 0)  # Adam's momentum moved them; the mask put them back
        assert not torch.equal(m.weight[~z], b[~z])  # the rest trained


@pytest.mark.parametrize("name,size", [("simple_cnn", 32), ("resnet18_cifar", 32)])
def test_structured_pruning_removes_channels_and_the_checkpoint_loads_back(tmp_path, name, size):
    from raycv.data.presets import ClassificationEvalPreset
    from raycv.training import checkpoint as ckpt

    torch.manual_seed(0)
    model = get_model(name, num_classes=10)
    full = _params(model)
    pruning.prune(model, PruneSection(amount=0.5, method="ln_structured"), (3, size, size))
    assert 0.2 < _params(model) / full < 0.3  # half the channels in and out: about a quarter of the weights
    assert model.get_submodule("fc2" if name == "simple_cnn" else "fc").out_features == 10  # the classes stay
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model.eval()(x)
    info = ckpt.CheckpointInfo(task="classification", model_name=name, model_kwargs={},
                               classes=[str(i) for i in range(10)],
                               preprocess=ClassificationEvalPreset(input_size=size, resize_size=size), epoch=1,
                               metrics={}, config={}, pruning={"method": "ln_structured", "amount": 0.5,
                                                               "structured": True})
    ckpt.write_checkpoint(tmp_path / "pruned", model, info)
    loaded, _ = ckpt.load_model(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert _params(loaded) == _params(model)
    # fine-tuning it further (model.init_from) starts from the same narrow model
    again = get_model(name, num_classes=10)
    ckpt.init_from_checkpoint(again, str(tmp_path / "pruned"))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), expected)


def test_pruning_refusals_are_one_line(monkeypatch):
    with pytest.raises(UserError, match="train.prune needs model.init_from=CHECKPOINT"):
        pruning.check(PruneSection(amount=0.5), task="classification", init_from=None)
    pruning.check(PruneSection(amount=0.0), task="classification", init_from=None)  # off
    with pytest.raises(UserError, match="ln_structured is for classification models; this run trains segmentation"):
        pruning.check(PruneSection(amount=0.5, method="ln_structured"), task="segmentation", init_from="x")
    pruning.check(PruneSection(amount=0.5), task="segmentation", init_from="x")  # magnitude prunes any model
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(UserError, match=r"needs torch-pruning, which is not installed: pip install 'raycv\[prune\]'"):
        pruning.check(PruneSection(amount=0.5, method="ln_structured"), task="classification", init_from="x")
    with pytest.raises(Exception, match="train.prune.amount"):
        load_config("train", None, ["train.prune.amount=0.99"])


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """A digits model to prune, the same weights in every run (train.deterministic); the pruned runs
    are deterministic too, so the accuracies asserted below are fixed numbers, not draws (the
    session's digits run, trained without it, once left a 70%-pruned model at 323 of 359)."""
    import raycv

    s = raycv.train(overrides={"train.epochs": 2, "train.deterministic": True, "train.seed": 3, "scaling.num_workers": 2,
                               "run.storage_path": str(tmp_path_factory.mktemp("prune-base")), "run.name": "base"})
    return s.best_checkpoint


@pytest.mark.slow
def test_the_digits_model_pruned_and_fine_tuned_is_smaller_resumes_and_infers(ray_session, trained, tmp_path):
    import raycv

    base = {"model.init_from": trained, "scaling.num_workers": 2, "train.deterministic": True,
            "run.storage_path": str(tmp_path)}
    # structured: 1 epoch, then the same run continued to 2 (the workers shape the model to its checkpoint)
    raycv.train(overrides={**base, "train.prune.amount": 0.5, "train.prune.method": "ln_structured",
                           "train.epochs": 1, "run.name": "structured"})
    s = raycv.train(overrides={**base, "train.prune.amount": 0.5, "train.prune.method": "ln_structured",
                               "train.epochs": 2, "run.name": "structured"})
    log = [json.loads(ln) for ln in (tmp_path / "structured" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["started_at_epoch"] == 2
    meta = json.loads((tmp_path / "structured" / "checkpoint_epoch_0002" / "raycv.json").read_text())
    full = _params(raycv.load(trained).model)
    assert meta["pruning"]["structured"] and meta["pruning"]["parameters"] < 0.3 * full
    size = lambda d: (d / "model.pt").stat().st_size
    assert size(tmp_path / "structured" / "checkpoint_epoch_0002") < 0.3 * size(Path(trained))
    assert s.val_accuracy > 0.9, s.val_accuracy
    predictor = raycv.load(tmp_path / "structured")
    assert _params(predictor.model) == meta["pruning"]["parameters"]
    inferred = raycv.infer(tmp_path / "structured", "registry:digits:val", tmp_path / "pred")
    assert inferred.rows == 359 and inferred.errors == 0
    # unstructured: the checkpoint holds exactly the zeros the pruning made
    u = raycv.train(overrides={**base, "train.prune.amount": 0.7, "train.epochs": 1, "run.name": "magnitude"})
    state = torch.load(tmp_path / "magnitude" / "checkpoint_epoch_0001" / "model.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert math.isclose(zeros, 0.7, abs_tol=1e-5) and u.val_accuracy > 0.9
