"""Training end to end on a real local Ray instance: 2 DDP workers (gloo), real files, resume."""

import io
import json
from pathlib import Path

import pytest
import torch

from raycv.cli import main
from raycv.config import load_config
from raycv.errors import UserError
from raycv.runtime import plan_worker_resources
from raycv.training.checkpoint import load_model, read_info
from raycv.training.driver import WORKER_MALLOC_ENV, fit, worker_malloc_env


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_resume(digits_run):
    s, printed, log, run_dir = digits_run.summary, digits_run.printed, digits_run.log, digits_run.run_dir
    assert [line.split()[1] for line in printed if line.startswith("epoch")] == ["1/2", "2/2"]
    assert _epochs(run_dir)[:2] == log
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["val_count"] == 359 for r in log)  # every validation image counted exactly once over 2 ranks
    assert s.epochs == 2 and s.val_accuracy > 0.5  # 2 epochs of digits: well above chance (0.1)
    from conftest import SECRET_IN_URI

    written = [f for f in run_dir.rglob("*") if f.is_file()]
    assert (run_dir / "config.yaml").read_text().count("s3://***@bucket/unused?X-Amz-Signature=***") == 1
    assert not [f for f in written if SECRET_IN_URI.encode() in f.read_bytes()]  # config, raycv.json, summary, events
    assert not any(SECRET_IN_URI in line for line in printed)
    p = digits_run.progress  # what the driver's live line read: the last epoch, counted over both ranks
    assert (p["epoch"], p["epochs"], p["total"]) == (2, 2, 1438) and 0 < p["images"] <= 1438

    # The checkpoint: tensors only, self-describing, loadable without raycv's training code.
    best = Path(s.best_checkpoint)
    state = torch.load(best / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    train_state = torch.load(best / "train_state.pt", weights_only=True)
    info = read_info(best)
    assert info.model_name == "simple_cnn" and info.classes == [str(i) for i in range(10)]
    assert train_state["epoch"] == info.epoch and info.preprocess.input_size == 32
    model, _ = load_model(best)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_checkpoint"] == s.best_checkpoint and summary["images_per_second"] > 0
    assert summary["epochs"] == 2 and "val_accuracy" in summary
    # Where the start-up went, in seconds from this process's start: the driver's marks, then rank 0's.
    marks = ["fit", "ray", "trainer_fit", "loop_entered", "model_ready", "first_batch", "first_step"]
    st = summary["startup"]
    assert set(st) == {*marks, "worker_process"} and [st[k] for k in marks] == sorted(st[k] for k in marks)
    assert st["worker_process"] <= st["loop_entered"]  # the worker's imports lie between (its process may be pooled)
    assert (run_dir / "config.yaml").is_file()

    # Same run.name, more epochs: continues at epoch 3 from the epoch-2 checkpoint; 1-2 untouched.
    printed = []
    s2 = fit(load_config("train", None, digits_run.overrides + ["train.epochs=3"]),
             echo=printed.append)
    assert [line.split()[1] for line in printed if line.startswith("epoch")] == ["3/3"]
    log2 = _epochs(run_dir)
    assert [r["epoch"] for r in log2] == [1, 2, 3]
    assert log2[:2] == log  # the first two epochs were not trained again
    assert s2.epochs == 3 and s2.resumed_from_epoch == 2
    # train.keep_checkpoints=2 over 3 epochs: the latest stays, and no pruned epoch scored better than a kept one
    kept = {int(d.name.rsplit("_", 1)[1]) for d in run_dir.glob("checkpoint_epoch_*")}
    score = {r["epoch"]: r["val_accuracy"] for r in log2}
    assert 3 in kept and len(kept) <= 3 and len(kept - {3}) <= 2
    assert all(score[k] >= score[p] for k in kept - {3} for p in {1, 2, 3} - kept)
    assert len(kept) < 3 or score[3] <= min(score[1], score[2])  # three kept only when the latest is not a best one
    assert read_info(Path(s2.latest_checkpoint)).epoch == 3


def test_default_resources_never_starve_ray_data():
    res, threads = plan_worker_resources(num_workers=2, use_gpu=False, cpus_per_worker=None, gpus_per_worker=1,
                                         data_cpus=0.5, total_cpus=2)
    assert res["CPU"] * 2 + 0.5 <= 2 and threads == 1
    res, threads = plan_worker_resources(num_workers=1, use_gpu=False, cpus_per_worker=None, gpus_per_worker=1,
                                         data_cpus=0.5, total_cpus=2)
    assert res["CPU"] == 1.5 and threads == 2
    with pytest.raises(UserError, match="would wait forever"):
        plan_worker_resources(num_workers=4, use_gpu=False, cpus_per_worker=1, gpus_per_worker=1,
                              data_cpus=0.5, total_cpus=2)
    with pytest.raises(UserError, match="does not fit"):
        plan_worker_resources(num_workers=64, use_gpu=False, cpus_per_worker=None, gpus_per_worker=1,
                              data_cpus=0.5, total_cpus=2)


def test_worker_malloc_settings_default_and_the_drivers_environment_wins(monkeypatch):
    for key in WORKER_MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    assert worker_malloc_env() == WORKER_MALLOC_ENV and WORKER_MALLOC_ENV["MALLOC_ARENA_MAX"] == "1"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    env = worker_malloc_env()
    assert env["MALLOC_ARENA_MAX"] == "8" and env["MALLOC_TRIM_THRESHOLD_"] == str(2**30)


def test_corrupt_training_image_is_one_line_exit_2(ray_session, image_tree, tmp_path, capsys):
    (image_tree / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rc = main(["train", "data.name=image_folder", f"data.root={image_tree}", "data.input_size=16",
               f"run.storage_path={tmp_path}", "train.epochs=1", "scaling.num_workers=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot decode" in err[0] and "broken.png" in err[0]


def test_too_many_workers_is_refused_up_front(ray_session, tmp_path, capsys):
    rc = main(["train", "scaling.num_workers=3", "scaling.cpus_per_worker=1", f"run.storage_path={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "would wait forever" in err


def _fit_within(cfg, seconds: float):
    """fit() in a thread: a run that waits forever fails the test instead of hanging the suite."""
    import threading

    out: dict = {}

    def run():
        try:
            out["summary"] = fit(cfg, echo=lambda line: None)
        except BaseException as e:  # re-raised below, in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"training did not finish in {seconds:.0f} s: it waits for resources it cannot get"
    if "error" in out:
        raise out["error"]
    return out["summary"]


def test_shard_cache_serves_every_row_once_per_epoch_in_fresh_order():
    from raycv.data.presets import ClassificationTrainPreset
    from raycv.training.batches import AugmentCollate, ShardCache

    cache = ShardCache(limit_bytes=1e6)
    collate = AugmentCollate(ClassificationTrainPreset(input_size=4, resize_size=4, augment="none"), cache)
    import numpy as np

    for start in range(0, 10, 4):  # what Ray Data hands the collate function during epoch 1
        n = min(4, 10 - start)
        collate({"image": np.full((n, 3, 4, 4), 0, np.uint8) + np.arange(start, start + n, dtype=np.uint8)[:, None, None, None],
                 "label": np.arange(start, start + n)})
    cache.seal()
    assert cache.ready
    g = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        batches = list(cache.batches(4, ClassificationTrainPreset(input_size=4, resize_size=4, augment="none"), g))
        labels = torch.cat([b["label"] for b in batches])
        assert sorted(labels.tolist()) == list(range(10))  # every row once
        assert all(torch.equal(b["image"][:, 0, 0, 0].long(), b["label"]) for b in batches)  # images stay with labels
        orders.append(labels.tolist())
    assert orders[0] != orders[1]  # reshuffled every epoch

    small = ShardCache(limit_bytes=100)  # over the limit: nothing kept, Ray Data keeps serving
    small.add(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    small.seal()
    assert not small.ready


@pytest.mark.slow
def test_elastic_streaming_run_starts_with_what_the_cluster_holds(ray_session, tmp_path):
    """Two ways to wait forever, in one run (CI time):
    - elastic: scaling.min_workers=1, num_workers=3 at 0.7 CPU each on 2 CPUs. Three never fit, so a
      fixed size would wait forever; Ray Train's elastic policy starts with what fits.
    - streaming: data.cache=false, so decode tasks run beside the workers in the 0.6 CPU they leave.
      A `select_columns` stage after decoding once added a whole-CPU Ray Data task that could never
      be scheduled there: the run hung at epoch 1 without a word."""
    s = _fit_within(load_config("train", None, [f"run.storage_path={tmp_path}", "run.name=elastic", "train.epochs=1",
                                                "scaling.min_workers=1", "scaling.num_workers=3",
                                                "scaling.cpus_per_worker=0.7", "data.cache=false"]), 240)
    log = _epochs(tmp_path / "elastic")
    assert s.epochs == 1 and log[0]["val_count"] == 359
    assert 1 <= len(log[0]["worker_nodes"]) <= 2  # ranks that ran: fewer than the 3 asked for


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal], ids=["log", "terminal"])
def test_the_driver_shows_epoch_lines_and_progress_within_an_epoch(tmp_path, stream):
    """From rank 0's files: a finished epoch is one line; the running epoch a bar on a terminal,
    a plain line (every 30 s; here at once) in a log, with images/s and the time left."""
    from raycv.training.progress import TrainProgress

    done = {"epoch": 1, "epochs": 3, "train_loss": 1.5, "val_loss": 0.9, "val_accuracy": 0.7, "val_top5": 0.99,
            "images_per_second": 500.0, "train_seconds": 2.0, "val_seconds": 1.0, "time": 100.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(done) + "\n")
    (tmp_path / "progress.json").write_text(json.dumps(
        {"epoch": 2, "epochs": 3, "images": 500, "total": 1438, "seconds": 1.0, "time": 101.0}))
    echoed, out = [], stream()
    watcher = TrainProgress(str(tmp_path), echoed.append, since=50.0, stream=out)
    watcher.live.log_every_s = 0.0
    watcher.poll()
    watcher.live.close()
    assert len(echoed) == 1 and echoed[0].startswith("epoch   1/3  loss 1.5000  val_loss 0.9000  val_acc 0.7000")
    text = out.getvalue()
    if stream is io.StringIO:  # 938 images left at 500 img/s: ~2 s; then one more epoch of 3 s
        assert text == "epoch 2/3: 500/1,438 images (35%), 500 img/s, epoch left ~2s, run left ~5s\n"
    else:
        assert "epoch 2/3" in text and "500/1438" in text and "run left ~5s" in text and "\r" in text
    # A report older than this run (a resumed run's previous attempt) is not shown.
    echoed.clear()
    stale = TrainProgress(str(tmp_path), echoed.append, since=200.0, stream=stream())
    stale.live.log_every_s = 0.0
    stale.poll()
    assert echoed == [] and stale.live.stream.getvalue() == ""
