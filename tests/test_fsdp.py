"""scaling.strategy=fsdp: a small torchvision ViT (its shape set through model.kwargs) sharded over
2 CPU workers with gloo; sharded checkpoints resumed on another world size and consolidated for
inference; what FSDP cannot do is one line before Ray starts."""

from __future__ import annotations

import json

import pytest
import torch

from raycv.errors import UserError

VIT = {"model.name": "vit_b_16", "data.input_size": 32, "optim.lr": 0.003,
       "model.kwargs": {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32,
                        "mlp_dim": 64}}


@pytest.mark.parametrize("override,message", [
    ({"train.ema_decay": 0.99}, "train.ema_decay: the EMA keeps a full copy"),
    ({"train.compile": True}, "train.compile is not supported with FSDP"),
    ({"data.name": "shapes_segmentation", "model.name": "fcn_resnet50", "model.kwargs": {}}, "this run trains segmentation"),
])
def test_what_fsdp_cannot_do_is_one_line(override, message, monkeypatch, tmp_path):
    import raycv
    from raycv import runtime

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(UserError, match=message):
        raycv.train(overrides={**VIT, "scaling.strategy": "fsdp", **override, "run.storage_path": str(tmp_path)})


def test_a_vit_block_is_checkpointed_and_keeps_its_gradients():
    """Activation checkpointing recomputes each EncoderBlock in backward: the same gradients, the
    same state_dict keys, and fewer tensors saved for backward."""
    from raycv.models import get_model
    from raycv.training import sharding

    def run(checkpointed: bool):
        torch.manual_seed(0)
        m = get_model("vit_b_16", num_classes=10, **VIT["model.kwargs"])
        if checkpointed:
            assert sharding.checkpoint_activations(m) == 2
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = m(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).sum()
        loss.backward()
        return m, sum(saved)

    plain, plain_saved = run(False)
    ckpt, ckpt_saved = run(True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)


@pytest.mark.slow
def test_an_fsdp_run_survives_a_sigkill_resumes_on_one_worker_and_infers(ray_session, tmp_path, capsys):
    """One FSDP run over 2 workers (clipping, accumulation):
    - a training worker SIGKILLed once the epoch-1 sharded checkpoint is registered: the restart
      reshards it back onto 2 workers and logs every epoch once;
    - the last checkpoint's predictions through `raycv infer` (Ray Data, consolidated in each actor)
      are a direct load's, and its val top-1 the one measured in training; `raycv consolidate`
      writes the same weights as one model.pt;
    - the run continues on 1 worker (the 2-rank shards resharded); a shard that is not the one
      raycv.json records is refused by name, on load and by the workers resuming."""
    import os
    import signal
    import threading
    import time

    import numpy as np
    from conftest import ray_processes
    from helpers.runs import registered_epochs
    from PIL import Image
    from sklearn.datasets import load_digits

    import raycv
    from raycv.cli import main
    from raycv.config import load_config
    from raycv.inference.output import read_output
    from raycv.training import checkpoint as ckpt
    from raycv.training.driver import fit

    base = {**VIT, "data.name": "digits", "scaling.strategy": "fsdp", "run.storage_path": str(tmp_path),
            "run.name": "vit"}
    overrides = {**base, "train.epochs": 3, "scaling.num_workers": 2, "train.max_failures": 1,
                 "train.grad_clip_norm": 1.0, "train.grad_accum_steps": 2, "train.log_every_steps": 1}
    cfg = load_config("train", None, [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in overrides.items()])
    run = tmp_path / "vit"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=fit(cfg, echo=lambda line: None)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while 1 not in registered_epochs(run):
        assert time.monotonic() < deadline and thread.is_alive(), "training did not checkpoint epoch 1"
        time.sleep(0.2)
    victims = ray_processes("RayTrainWorker")
    assert len(victims) == 2
    last = max(registered_epochs(run))
    os.kill(victims[0].pid, signal.SIGKILL)
    assert last < 3, "the run finished before the kill"
    thread.join(timeout=300)
    assert not thread.is_alive() and "summary" in result, "the run did not finish after the restart"
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1, 2, 3]  # each epoch once
    assert [m["started_at_epoch"] for m in log] == [1] * last + [last + 1] * (3 - last)  # resumed, not restarted
    assert all(0.4 < m["param_shard_fraction"] < 0.7 for m in log)  # about half of the parameters on each rank
    steps = [json.loads(ln) for ln in (run / "steps.jsonl").read_text().splitlines()]
    assert steps and all(s["grad_norm"] > 0 for s in steps)  # the total norm over both ranks' shards
    c3 = run / "checkpoint_epoch_0003"
    meta = json.loads((c3 / "raycv.json").read_text())
    assert meta["sharded"] == {"format": "torch.distributed.checkpoint", "world_size": 2, "strategy": "fsdp"}
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
    assert not (c3 / "model.pt").exists()

    # raycv infer over PNG files: the predictions of the model loaded here by hand
    digits = load_digits()
    folder = tmp_path / "pngs"
    for i in range(24):
        d = folder / str(digits.target[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    assert main(["infer", "--checkpoint", str(c3), "--input", str(folder), "--output", str(tmp_path / "preds"),
                 "infer.batch_size=8"]) == 0
    table = sorted(read_output(str(tmp_path / "preds")).to_pylist(), key=lambda r: r["path"])
    assert len(table) == 24 and all(r["error"] is None for r in table)
    model, info = ckpt.load_model(c3)
    assert info.sharded["world_size"] == 2 and sum(p.numel() for p in model.parameters()) == 24234
    pre = info.preprocess
    x = torch.stack([pre.geometry(Image.open(r["path"]).convert("RGB")) for r in table])
    with torch.no_grad():
        probs = torch.softmax(model(pre.normalize(x)), 1)
    assert [r["label_index"] for r in table] == probs.argmax(1).tolist()
    assert [r["score"] for r in table] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
    # the whole validation split through raycv infer scores what the sharded model scored in training
    raycv.infer(c3, "registry:digits:val", tmp_path / "val")
    assert raycv.evaluate(tmp_path / "val")["top1"] == pytest.approx(log[2]["val_accuracy"], abs=1e-12)
    images = [(d / 16 * 255).astype("uint8")[:, :, None].repeat(3, 2) for d in digits.images[:8]]
    rows = raycv.load(c3)(images)
    assert len(rows) == 8 and not any(r.get("error") for r in rows), rows[:2]

    # consolidated: one model.pt holding exactly the weights the shards hold
    capsys.readouterr()
    assert main(["consolidate", "--checkpoint", str(c3), "--output", str(tmp_path / "plain")]) == 0
    assert "consolidated vit_b_16 (epoch 3, 2 shards)" in capsys.readouterr().out
    plain = tmp_path / "plain"
    meta = json.loads((plain / "raycv.json").read_text())
    assert "sharded" not in meta and sorted(meta["files"]) == ["model.pt"]
    again, _ = ckpt.load_model(plain)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert main(["consolidate", "--checkpoint", str(plain), "--output", str(tmp_path / "twice")]) == 2
    assert "is not a sharded checkpoint" in capsys.readouterr().err
    assert main(["consolidate", "--checkpoint", str(c3), "--output", str(plain)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    # continued on one worker: the 2-rank shards resharded, epoch 4 only
    raycv.train(overrides={**base, "train.epochs": 4, "scaling.num_workers": 1})
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and log[3]["started_at_epoch"] == 4
    assert log[3]["param_shard_fraction"] == 1.0

    # a shard that is not the one raycv.json records is refused by name
    (c3 / "__1_0.distcp").write_bytes(b"x")
    with pytest.raises(UserError, match=r"torn: __1_0.distcp"):
        ckpt.load_model(c3)
    # and by the workers resuming from it (each rank hashes its share of the files; all stop)
    shard = run / "checkpoint_epoch_0004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match=r"torn: __0_0.distcp is not the file its raycv.json records \(its SHA-256"):
        raycv.train(overrides={**base, "train.epochs": 5, "scaling.num_workers": 2})
