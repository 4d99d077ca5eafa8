"""cluster.yaml is checked offline with Ray's own cluster-launcher schema, plus raycv's rules:
a head that runs no work, GPU workers that start from zero, the dashboard on loopback, SSH not
open to the world."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())


def _check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema():
    prepared = _check(CLUSTER)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # no work on the head
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers)  # autoscale from zero
    assert prepared["idle_timeout_minutes"] > 0 and prepared["upscaling_speed"] > 0


def test_dashboard_on_loopback_and_ssh_not_open_to_the_world():
    head_cmds = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "0.0.0.0" not in head_cmds
    assert "RAY_AUTH_MODE=token" in head_cmds
    ranges = [r["CidrIp"] for p in CLUSTER["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert ranges and "0.0.0.0/0" not in ranges
    assert any(dst.endswith("auth_token") for dst in CLUSTER["file_mounts"])
    image = CLUSTER["docker"]["image"]
    assert ":" in image and "latest" not in image and "py3" in image  # pinned, with a modern Python


@pytest.mark.parametrize("breakage, why", [("unknown_top_level_key", "'max_wrokers' was unexpected"),
                                           ("worker_without_node_config", "'node_config' is a required property"),
                                           ("bad_max_workers", "'many' is not of type 'integer'")])
def test_rays_schema_rejects_broken_configs(breakage, why):
    import jsonschema

    config = copy.deepcopy(CLUSTER)
    if breakage == "unknown_top_level_key":
        config["max_wrokers"] = 3
    elif breakage == "worker_without_node_config":
        del config["available_node_types"]["gpu_infer"]["node_config"]
    else:
        config["available_node_types"]["gpu_infer"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match=why):
        _check(config)
