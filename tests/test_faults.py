"""Fault tolerance on a real local Ray instance: a training worker SIGKILLed mid-run."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import ray_processes
from helpers.runs import registered_epochs

from raycv.config import load_config
from raycv.training.driver import WORKER_MALLOC_ENV, fit


def _logged(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


@pytest.mark.slow
def test_sigkilled_worker_resumes_from_the_last_checkpoint(ray_session, tmp_path):
    """A training worker SIGKILLed after the epoch-2 checkpoint is registered: the second attempt starts
    at the epoch after the last registered checkpoint (not at epoch 1), and every epoch is logged once."""
    cfg = load_config("train", None, [f"run.storage_path={tmp_path}", "run.name=faulty", "train.epochs=4",
                                      "scaling.num_workers=2", "train.max_failures=1"])
    run_dir = tmp_path / "faulty"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=fit(cfg, echo=lambda line: None)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while 2 not in registered_epochs(run_dir):  # the checkpoint itself, not the log line written before it
        assert time.monotonic() < deadline and thread.is_alive(), "training did not checkpoint epoch 2"
        time.sleep(0.2)
    victims = ray_processes("RayTrainWorker")
    assert len(victims) == 2
    for worker in victims:  # live workers run with raycv's malloc settings (Ray Train's worker_runtime_env)
        assert {k: worker.environ().get(k) for k in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV
    last = max(registered_epochs(run_dir))  # what the restart must resume from (2, or 3 if it came in meanwhile)
    os.kill(victims[0].pid, signal.SIGKILL)
    assert last < 4, "the run finished before the kill"
    thread.join(timeout=300)
    assert not thread.is_alive() and "summary" in result, "the run did not finish after the restart"
    s = result["summary"]
    log = _logged(run_dir)
    assert s.epochs == 4 and [m["epoch"] for m in log] == [1, 2, 3, 4]  # each epoch once, none lost
    # the first attempt trained epochs 1..last; the second started at last + 1: a resume, not a restart
    assert [m["started_at_epoch"] for m in log] == [1] * last + [last + 1] * (4 - last)
    # TensorBoard: the second attempt's writer tells readers to drop what the dead attempt logged
    # past the checkpoint (a SessionLog START at the first step after it)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps_per_epoch = math.ceil(log[0]["train_images"] // 2 / cfg.data.batch_size)
    starts = [ev.step for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
              for ev in EventFileLoader(str(f)).Load() if ev.HasField("session_log") and ev.session_log.status == 1]
    assert starts == [last * steps_per_epoch + 1]
    assert not victims[0].is_running()
    assert victims[0].pid not in {p.pid for p in ray_processes("RayTrainWorker")}
