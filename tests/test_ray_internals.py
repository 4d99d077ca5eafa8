"""Every private Ray API raycv uses (raycv/ray_internals.py) still exists and answers on the
installed Ray. A Ray release that moves one fails here, by name, rather than deep in a run."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from raycv import ray_internals

REPO = Path(__file__).parents[1]


def test_private_ray_apis_on_a_live_instance(ray_session):
    assert isinstance(ray_internals.cluster_config_max_resources(), (dict, type(None)))
    report = ray_internals.autoscaler_report()
    assert report is None or isinstance(report, dict)
    logs = ray_internals.session_logs_dir()
    assert logs and Path(logs).is_dir() and Path(logs).name == "logs"
    assert any(p.name.startswith("raylet") for p in Path(logs).iterdir())
    raylet = psutil.Process(ray_internals.raylet_pid())
    assert "raylet" in raylet.name() and raylet.is_running()


def test_auth_settings_are_reread_after_import():
    before = (os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN"))
    ray_internals.apply_auth_env()  # Ray's config and token cache, reloaded from the environment
    assert (os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN")) == before


def test_private_ray_apis_for_the_tests():
    ignored = ray_internals.upload_excludes(REPO, include_gitignore=False)
    assert ignored(REPO / ".venv" / "x") and not ignored(REPO / "raycv" / "cli.py")
    prepared = ray_internals.validate_cluster_config(
        {"cluster_name": "x", "provider": {"type": "aws", "region": "us-west-2"}, "max_workers": 0})
    assert prepared["max_workers"] == 0 and "available_node_types" in prepared


def test_in_blocks_of_fuses_into_the_upstream_map_and_cuts_blocks(ray_session):
    import ray.data

    from raycv.ray_internals import in_blocks_of

    def rows(batch):
        yield {"x": list(range(1000))}

    ds = in_blocks_of(ray.data.from_items([{"u": 0}]).map_batches(rows, batch_size=1, num_cpus=0.25), 256,
                      num_cpus=0.25)
    assert ds._logical_plan.dag.ray_remote_args == {"num_cpus": 0.25}
    capped = in_blocks_of(ray.data.from_items([{"u": 0}]).map_batches(
        rows, batch_size=1, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2)), 256, num_cpus=0, tasks=2)
    assert capped._logical_plan.dag.compute.size == 2
    assert "MapBatches(rows)->StreamingRepartition" in capped.materialize().stats()  # one fused operator
    assert [b.num_rows for b in (ray.get(r) for r in ds.to_arrow_refs())] == [256, 256, 256, 232]


def test_pbt_record_settings_and_its_exploit_step():
    import inspect

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining

    scheduler = PopulationBasedTraining(time_attr="epoch", metric="m", mode="max", perturbation_interval=2,
                                        hyperparam_mutations={"optim.lr": [0.1, 0.2]}, synch=True)
    assert ray_internals.pbt_settings(scheduler) == (2, ["optim.lr"])
    from ray.tune.schedulers.pbt import _PBTTrialState

    trial = Trial("trainable", config={"optim.lr": 0.1}, stub=True)
    scheduler._trial_state[trial] = _PBTTrialState(trial)  # what on_trial_add does, without a controller
    assert ray_internals.pbt_record(scheduler, trial) == (0, None)
    assert ray_internals.pbt_compare_next_at(scheduler, 5) == 2  # Ray starts it at the first interval
    assert ray_internals.pbt_compare_next_at(scheduler, 7) == 5
    method = getattr(PopulationBasedTraining, ray_internals.PBT_EXPLOIT)
    assert list(inspect.signature(method).parameters) == ["self", "tune_controller", "trial", "trial_to_clone"]


def test_asha_rungs_and_brackets():
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(metric="m", mode="max", time_attr="training_iteration", max_t=4, grace_period=1,
                              reduction_factor=2)
    rungs = ray_internals.asha_rungs(scheduler)
    assert [[m for m, _ in bracket] for bracket in rungs] == [[4, 2, 1]]
    rungs[0][2][1]["t0"] = 0.5  # the scheduler's own dict: what raycv writes there, it judges by
    assert scheduler._brackets[0].cutoff(scheduler._brackets[0]._rungs[2][1]) == 0.5
    assert ray_internals.asha_bracket(scheduler, "unknown") is None

