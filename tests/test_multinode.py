"""Several raylets on one host (`ray.cluster_utils.Cluster`): two DDP workers placed STRICT_SPREAD
land on different nodes, training completes, and with train.deterministic its weights equal a
run's on the single-node session cluster bit for bit; a node that hosts a training worker is removed
mid-run and the run finishes from its last checkpoint with every epoch once; a node that hosts a predictor actor is
removed mid-inference and every input is still written exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DETERMINISTIC, N_MANY, assert_same_run

from raycv.inference.output import read_output

HELPER = Path(__file__).parent / "helpers" / "multinode_train.py"
NODE_LOSS = Path(__file__).parent / "helpers" / "node_loss_infer.py"
NODE_LOSS_TRAIN = Path(__file__).parent / "helpers" / "node_loss_train.py"


@pytest.mark.slow
def test_two_workers_on_two_nodes_match_one_node(tmp_path, deterministic_run):
    r = subprocess.run([sys.executable, str(HELPER), str(tmp_path / "multi"), *DETERMINISTIC, "run.name=mn",
                        "scaling.placement_strategy=STRICT_SPREAD"], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["cluster_nodes"]) == 3
    log = [json.loads(ln) for ln in (tmp_path / "multi" / "mn" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1, 2]
    ranks = log[-1]["worker_nodes"]
    assert len(ranks) == 2 and len(set(ranks)) == 2 and set(ranks) <= set(out["cluster_nodes"])  # two nodes
    assert out["summary"]["epochs"] == 2
    one_log = [json.loads(ln) for ln in (deterministic_run / "metrics.jsonl").read_text().splitlines()]
    assert len(set(one_log[-1]["worker_nodes"])) == 1  # the session cluster has one node
    # The same recipe with train.deterministic: two nodes end where one node did, bit for bit.
    assert_same_run(deterministic_run, tmp_path / "multi" / "mn")


@pytest.mark.slow
def test_node_removed_mid_inference_every_input_exactly_once(many_images, tmp_path):
    ckpt, images = many_images
    r = subprocess.run([sys.executable, str(NODE_LOSS), str(ckpt), str(images), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["alive_at_removal"], "inference ended before the node was removed: make the input larger"
    assert out["alive_nodes"] == 3  # head + the two accelerator nodes left
    assert (out["actors_before"], out["spare_nodes"]) == (2, 1)
    assert out["restarted_on_spare"], "the lost predictor actor did not come back on the spare node"
    assert out["counter_on_head"]  # the progress counter lives on the driver's node, not on one that may leave
    paths = read_output(str(tmp_path / "out")).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N_MANY and set(paths) == {str(p) for p in images.rglob("*.png")}


@pytest.mark.slow
def test_node_removed_mid_training_resumes_from_the_last_checkpoint(tmp_path):
    """Two 2-CPU workers on three 2-CPU nodes; the node of one of them is removed once the epoch-2
    checkpoint is registered. Ray Train restarts the group (on the surviving and the spare node)
    from the last registered checkpoint: every epoch logged once, the later ones trained by the
    second attempt only, and none of them on the removed node."""
    r = subprocess.run([sys.executable, str(NODE_LOSS_TRAIN), str(tmp_path), "run.name=nl", "train.epochs=4",
                        "scaling.num_workers=2", "scaling.cpus_per_worker=2", "train.max_failures=2",
                        ], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["alive_at_removal"] and out["removed"] not in out["alive_nodes"] and len(out["alive_nodes"]) == 3
    resumed_at = max(out["registered_at_removal"]) + 1
    log = [json.loads(ln) for ln in (tmp_path / "nl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1, 2, 3, 4] and out["summary"]["epochs"] == 4
    assert resumed_at <= 4, "the run ended before the node was removed"
    assert [m["started_at_epoch"] for m in log] == [1] * (resumed_at - 1) + [resumed_at] * (5 - resumed_at)
    for m in log[resumed_at - 1:]:  # trained after the removal: two nodes, neither of them the removed one
        assert len(set(m["worker_nodes"])) == 2 and out["removed"] not in m["worker_nodes"]
    assert any(out["removed"] in m["worker_nodes"] for m in log[:resumed_at - 1])
