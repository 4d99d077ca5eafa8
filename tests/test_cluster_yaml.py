"""cluster.yaml is checked offline with Ray's own cluster-launcher schema, plus raycv's rules:
a head that runs no work, GPU workers that start from zero, the dashboard on loopback, SSH not
open to the world."""

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from raycv.ray_internals import validate_cluster_config

REPO = Path(__file__).parents[1]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())


def _check(config: dict) -> dict:
    return validate_cluster_config(copy.deepcopy(config))


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


def test_the_image_runs_the_ray_that_the_default_install_resolves_to():
    """A client and its cluster must run the same Ray: the image follows the newest Ray that
    pyproject.toml allows (`ray...>=A,<X.Y` resolves to the X.(Y-1) line)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    major, minor = map(int, re.search(r"<(\d+)\.(\d+)", ray_dep).groups())
    tag = CLUSTER["docker"]["image"].split(":")[1]
    assert tag.startswith(f"{major}.{minor - 1}."), (tag, ray_dep)


def test_every_node_finds_the_mounted_token_whatever_its_home():
    """The token is mounted at a fixed path and each `ray start` names that path (in a container,
    ~ need not be the home the file was mounted under)."""
    prepared = _check(CLUSTER)
    (token_mount,) = [dst for dst in prepared["file_mounts"] if dst.endswith("auth_token")]
    for cmd in (*prepared["head_start_ray_commands"], *prepared["worker_start_ray_commands"]):
        if "ray start" in cmd:
            assert f"RAY_AUTH_TOKEN_PATH={token_mount} " in cmd and "RAY_AUTH_MODE=token " in cmd, cmd
