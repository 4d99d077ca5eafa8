"""Autoscaling for real on one host: Ray's fake multi-node provider (`fake_multinode`) adds and
removes raylets on this machine exactly where a cloud provider would add and remove VMs.

The head (its own ports and temp dir, own process group) runs the v1 autoscaler with a config
written here: Ray's wheels lack `fake_multi_node/example.yaml`, so Ray's
`AutoscalingCluster` cannot be used (and it runs `ray stop --force`, which kills every Ray process
on the host). A worker type carries a custom resource `accel` that stands in for a GPU; an
inference job whose predictor actors need it makes the cluster scale up from zero, succeeds with
complete output, and the node is removed after idling.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import untrained_checkpoint
from helpers.head import Head, session_token_env

REPO = Path(__file__).parents[1]


def _config(gcs_address: str) -> dict:
    return {
        "cluster_name": "raycv-fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            # The accelerator node type: none at start, at most one.
            "accel_worker": {"resources": {"CPU": 1, "accel": 1}, "node_config": {}, "min_workers": 0,
                             "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def fake_cluster():
    from helpers.head import free_port

    temp = Path(tempfile.mkdtemp(prefix="rca-"))
    gcs_port = free_port()
    (temp / "autoscaling.yaml").write_text(yaml.safe_dump(_config(f"127.0.0.1:{gcs_port}")))
    env, token = session_token_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    h = Head(temp, env, "--node-ip-address=127.0.0.1", f"--autoscaling-config={temp / 'autoscaling.yaml'}",
             gcs_port=gcs_port, token=token)
    yield h
    h.stop()  # the head's process group holds its autoscaler and the nodes that started


def _alive_nodes(address: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address, raise_on_missing_output=False)
            if n.state == "ALIVE"]


@pytest.mark.slow
def test_accelerator_actors_scale_the_cluster_up_from_zero_and_back(fake_cluster, tmp_path):
    address = fake_cluster.address
    deadline = time.monotonic() + 30
    while not (nodes := _alive_nodes(address)):  # the head registers a moment after the dashboard is up
        assert time.monotonic() < deadline
        time.sleep(1)
    assert len(nodes) == 1  # the head only: the accelerator type starts from zero
    client = fake_cluster.client()
    out = tmp_path / "preds"
    # No working_dir upload here: every fake node shares this host's session folder, so a second
    # node unpacking the same package replaces the folder that running workers use as their cwd.
    # raycv is installed in this venv; the entrypoint is given by absolute path.
    ckpt = untrained_checkpoint(tmp_path / "ckpt", "simple_cnn", classes=10)  # scaling does not need accuracy
    job = client.submit_job(
        entrypoint=f"python {REPO / 'jobs' / 'infer.py'} --checkpoint {ckpt} --input registry:digits:val "
                   f"--output {out} 'infer.actor_resources={{accel: 1}}' infer.cpus_per_actor=1")
    peak, deadline = 1, time.monotonic() + 300
    while (status := str(client.get_job_status(job).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still {status}"
        peak = max(peak, len(_alive_nodes(address)))
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:] + fake_cluster.log_tail()
    manifest = json.loads((out / "_raycv_manifest.json").read_text())
    assert manifest["rows"] == 359 and manifest["errors"] == 0  # complete
    assert peak == 2  # one accelerator node was added for the predictor actor

    deadline = time.monotonic() + 120  # idle_timeout_minutes=0.1: the node goes after ~6 s idle
    while len(_alive_nodes(address)) > 1:
        assert time.monotonic() < deadline, "the idle accelerator node was not removed"
        time.sleep(2)
