"""Every private Ray API raycv touches, in one place.

Ray moves its private modules between releases. Each function here wraps one such use behind a
name raycv owns; `tests/test_ray_internals.py` calls each on the installed Ray, so a release that
moves one fails that test by name instead of somewhere deep in a run. The last three serve the
tests only (they check Ray's own behaviour: which files an upload leaves out, Ray's cluster-config
schema, which processes belong to the session's raylet).
"""

from __future__ import annotations

import json
from typing import Any, Callable


def in_blocks_of(ds, rows: int, *, num_cpus: float, tasks: int | None = None):
    """`ds` cut into blocks of at most `rows` rows by a streaming repartition that runs inside the
    tasks that make the rows. Ray Data joins a task's yields into blocks of up to 128 MiB, so a
    listing task's rows (paths) would travel as one block and be written, their parts committed,
    only at its end. The repartition's resources are set to the upstream map's (private: its logical
    operator) so that the two fuse; on its own Ray would give it a whole CPU, which the predictors
    may hold, and it would wait forever on a small machine. `tasks`: the upstream map's
    TaskPoolStrategy size, which the two must share to fuse."""
    import ray.data

    ds = ds.repartition(target_num_rows_per_block=rows)
    op = ds._logical_plan.dag
    if isinstance(getattr(op, "ray_remote_args", None), dict):
        object.__setattr__(op, "ray_remote_args", {"num_cpus": num_cpus})
    if tasks is not None and hasattr(op, "compute"):
        object.__setattr__(op, "compute", ray.data.TaskPoolStrategy(size=tasks))
    return ds


def asha_rungs(scheduler) -> list[list[tuple[float, dict]]]:
    """An ASHAScheduler's rungs, per bracket: (milestone, {trial id: recorded metric}), the dicts
    themselves (Tune neither saves nor exposes them: raycv/tuning_asha.py keeps them across restarts)."""
    return [bracket._rungs for bracket in scheduler._brackets]


def asha_bracket(scheduler, trial_id: str) -> int | None:
    """The index of the bracket an ASHAScheduler put a trial in, or None once it let go of it."""
    bracket = scheduler._trial_info.get(trial_id)
    return None if bracket is None else scheduler._brackets.index(bracket)


def pbt_record(scheduler, trial) -> tuple[float, dict | None]:
    """What a PopulationBasedTraining scheduler last recorded of a trial at a comparison: (its time
    attribute's value, its result)."""
    state = scheduler._trial_state[trial]
    return state.last_train_time, state.last_result


def pbt_compare_next_at(scheduler, time: float) -> float:
    """Set when synchronous PBT next compares its trials (it runs only trials behind that time).
    -> the time it had (read first: a Ray that renamed it fails here, not by setting a new name)."""
    before = scheduler._next_perturbation_sync
    scheduler._next_perturbation_sync = time
    return before


def pbt_settings(scheduler) -> tuple[float, list[str]]:
    """A PopulationBasedTraining scheduler's perturbation interval and the keys it mutates."""
    return scheduler._perturbation_interval, list(scheduler._hyperparam_mutations)


# PopulationBasedTraining calls this method of itself, (tune_controller, trial, trial_to_clone), when
# a trial takes another's checkpoint and perturbed values (raycv/tuning_pbt.py prints a line after it).
PBT_EXPLOIT = "_exploit"


def cluster_config_max_resources() -> dict | None:
    """Node-type maxima of the cluster config that KubeRay / autoscaler v2 report, or None."""
    from ray._private import state

    return state.state.get_max_resources_from_cluster_config()


def autoscaler_report() -> dict | None:
    """The v1 autoscaler's latest status report (written every few seconds by the head's monitor),
    or None before the first one."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return (json.loads(raw) if raw else {}).get("autoscaler_report")


def apply_auth_env() -> None:
    """Make this process see $RAY_AUTH_MODE / $RAY_AUTH_TOKEN as they are now. Ray reads its
    config and the token once, when `ray` is imported; a local instance started afterwards by
    `ray.init` would otherwise run with the values from before."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def session_logs_dir() -> str | None:
    """This driver's Ray session log folder (`<temp>/session_*/logs`), or None when not connected."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


# -- for the tests --------------------------------------------------------------------------------


def raylet_pid() -> int:
    """The PID of the raylet this process's Ray instance started (its workers are its children)."""
    from ray._private import worker

    return worker._global_node.all_processes["raylet"][0].process.pid


def upload_excludes(working_dir, include_gitignore: bool = True) -> Callable[[Any], bool]:
    """Whether Ray's job upload leaves a path out (`.gitignore` / `.rayignore` of `working_dir`)."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    (ignored,) = get_excludes_from_ignore_files(working_dir, include_gitignore=include_gitignore)
    return ignored


def validate_cluster_config(config: dict) -> dict:
    """A cluster-launcher config filled with Ray's defaults and checked against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
