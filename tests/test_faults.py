"""Fault tolerance on a real local Ray instance: a training worker SIGKILLed mid-run."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import ray_processes

from raycv.config import load_config
from raycv.train.driver import fit


def _logged(run_dir: Path) -> list[int]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(ln)["epoch"] for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


@pytest.mark.slow
def test_sigkilled_worker_restarts_from_the_last_checkpoint(ray_session, tmp_path):
    cfg = load_config("train", None, [f"run.storage_path={tmp_path}", "run.name=faulty", "train.epochs=4",
                                      "scaling.num_workers=2", "train.max_failures=1"])
    run_dir = tmp_path / "faulty"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=fit(cfg, echo=lambda line: None)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while 2 not in _logged(run_dir):  # epoch 2 is checkpointed: kill during epoch 3
        assert time.monotonic() < deadline and thread.is_alive(), "training did not reach epoch 2"
        time.sleep(0.2)
    victims = ray_processes("RayTrainWorker")
    assert len(victims) == 2
    os.kill(victims[0].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "summary" in result, "the run did not finish after the restart"
    s = result["summary"]
    assert s.epochs == 4 and _logged(run_dir) == [1, 2, 3, 4]  # each epoch once, none lost, none repeated
    assert not victims[0].is_running()
    survivors = {p.pid for p in ray_processes("RayTrainWorker")}
    assert victims[0].pid not in survivors
