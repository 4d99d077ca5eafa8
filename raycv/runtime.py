"""Connecting to Ray and sizing resources so that nothing waits forever on a small machine."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass

import ray
import ray.data

from raycv.errors import UserError

QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")
FORWARDED_ENV = ("RAYCV_WEIGHTS_HASH",)  # raycv settings its Ray workers and actors must see too


def forwarded_env() -> dict[str, str]:
    """The driver's raycv settings, for a runtime_env: a worker of an instance started earlier (or on
    another node) would not inherit them."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def connect(address: str | None = None, *, verbose: bool = False, dashboard: bool = False) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), else start a new local instance.

    A local instance is raycv's own: it runs with Ray's token authentication (a fresh token in the
    environment of its processes, nothing written to disk, unless $RAY_AUTH_MODE / $RAY_AUTH_TOKEN
    say otherwise). It is never an instance found by auto-discovery: to reuse a running one, pass
    `run.address` or set $RAY_ADDRESS. Ray's own chatter stays in Ray's log folder unless `verbose`:
    raycv prints its own progress. `dashboard`: a local instance also runs Ray's dashboard, on
    127.0.0.1 only (`raycv tune` needs its State API: Ray Train's placement-group cleaner asks it
    whether a stopped trial's controller is gone).
    """
    level = logging.INFO if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:  # Ray Data logs a user error's stack before raising it; raycv reports it in one line
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train's controller polls its workers this often (Ray's default: 2 s), and the start and
    # the end of every run wait for a poll (measured: the end of a 1-epoch run 3.8-4.3 s -> 1.6-1.9 s
    # at 0.5 s). Ray Train passes the variable on to its controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=level, log_to_driver=verbose, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        local_token_auth()
        if dashboard:
            pin_local_address()
        ray.init(address="local", include_dashboard=dashboard,
                 **({"dashboard_host": "127.0.0.1"} if dashboard else {}), **kwargs)
    if not verbose:
        native_stderr_to_ray_logs()


def joins_running_instance(address: str | None = None) -> bool:
    """Whether `connect(address)` would join a Ray instance that is already running (run.address or
    $RAY_ADDRESS naming one) rather than start one."""
    address = address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local" and not ray.is_initialized()


def pin_local_address() -> None:
    """Give the local instance about to start a GCS port chosen here, and its processes that address
    as $RAY_ADDRESS. Ray's own helpers that look the cluster up without an address (the State API
    behind Ray Train's placement-group cleaner) otherwise fail when another Ray instance runs on
    the machine ("Found multiple active Ray instances"), and a stopped trial's CPUs stay reserved."""
    import socket

    from ray.util import get_node_ip_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"  # inherited by the instance's processes


def local_token_auth() -> None:
    """Token authentication for a local instance this process starts: Ray >= 2.59 turns it on by
    default with a warning at every start (and writes a token to ~/.ray/auth_token when none
    exists); 2.58 leaves it off. Set explicitly, with a fresh token held only in the environment
    that the instance's processes inherit."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # the user chose
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    from raycv import ray_internals

    ray_internals.apply_auth_env()


def native_stderr_to_ray_logs() -> None:
    """Ray's C++ core worker in this process writes its error-level lines straight to file
    descriptor 2 (Ray 2.60 writes one for every Ray Data actor pool: "Actor ... has constructor
    arguments in the object store and max_restarts > 0"). Point descriptor 2 at a file in Ray's
    session log folder and keep Python's stderr (raycv's lines, progress bars, tracebacks) on the
    original stream. Ray's processes were started before this and keep their own outputs. Left
    alone when Python's stderr is not the process's own (a notebook, a test harness capturing it)."""
    if sys.stderr is not sys.__stderr__ or sys.__stderr__ is None:
        return
    from raycv import ray_internals

    logs = ray_internals.session_logs_dir()
    if not logs or not os.path.isdir(logs):
        return
    sys.stderr.flush()
    original = os.dup(2)
    sys.stderr = os.fdopen(original, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    target = os.open(os.path.join(logs, f"raycv-driver-{os.getpid()}.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(target, 2)
    os.close(target)


@dataclass(frozen=True)
class CpuBudget:
    total: float  # every CPU of the cluster: what a request is checked against
    free: float  # not held right now (say, by this job's own driver): what default sizes share
    largest_node: float  # one worker or actor cannot span nodes


def cpu_budget(need: float = 0.0, wait_s: float = 15.0) -> CpuBudget:
    """The cluster's CPUs now. With `need`: while fewer than that are free, wait up to `wait_s` for
    them (polling): the actors and placement groups of a job that just returned in this process (a
    notebook's or a script's earlier raycv.train / raycv.infer) are released by Ray a moment later."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    free = float(ray.available_resources().get("CPU", 0.0))
    deadline = time.monotonic() + wait_s
    while free < min(need, total) and time.monotonic() < deadline:
        time.sleep(0.25)
        free = float(ray.available_resources().get("CPU", 0.0))
    nodes = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return CpuBudget(total=total, free=min(free, total), largest_node=max(nodes, default=total))


def plan_worker_resources(*, num_workers: int, use_gpu: bool, cpus_per_worker: float | None,
                          gpus_per_worker: float, data_cpus: float, total_cpus: float,
                          free_cpus: float | None = None, node_cpus: float | None = None,
                          min_workers: int | None = None) -> tuple[dict, int]:
    """-> (resources_per_worker, torch intra-op threads per worker).

    Ray's documented TorchTrainer + Ray Data pattern gives each worker a whole CPU; with 2 workers
    on 2 CPUs Ray Data then gets none and the run waits forever. By default raycv splits the CPUs
    free now (`free_cpus`, e.g. less what a job's driver reserved) minus `data_cpus` between the
    workers, no more than one node holds (fractions are fine: Ray CPUs are a scheduling unit,
    not a cgroup), and refuses up front a request that can never be placed.
    """
    free_cpus = total_cpus if free_cpus is None else free_cpus
    node_cpus = total_cpus if node_cpus is None else node_cpus
    if use_gpu:
        cpus = cpus_per_worker if cpus_per_worker is not None else 1.0
        resources = {"CPU": cpus, "GPU": gpus_per_worker}
    else:
        if cpus_per_worker is None:
            spare = free_cpus - data_cpus
            cpus = min(spare / num_workers, node_cpus)
            if cpus < 0.1:
                raise UserError(
                    f"scaling.num_workers={num_workers} does not fit this cluster's {total_cpus:g} CPUs "
                    f"(with scaling.data_cpus={data_cpus:g} kept for Ray Data); lower scaling.num_workers")
            cpus = min(cpus, 8.0) if spare >= num_workers else cpus
        else:
            cpus = cpus_per_worker
        resources = {"CPU": round(cpus, 3)}
    fewest = min_workers or num_workers  # elastic: the run can start with min_workers
    if fewest * resources["CPU"] + (0 if use_gpu else data_cpus) > total_cpus + 1e-6:
        what = f"scaling.min_workers={fewest}" if min_workers else f"scaling.num_workers={num_workers}"
        raise UserError(
            f"{what} x {resources['CPU']:g} CPUs (+ scaling.data_cpus={data_cpus:g}) "
            f"needs more than this cluster's {total_cpus:g} CPUs and would wait forever; "
            f"lower scaling.num_workers or scaling.cpus_per_worker")
    threads = max(1, int(resources["CPU"] + 0.5))
    return resources, threads


def autoscaler_running(wait_s: float = 10.0) -> bool:
    """Whether an autoscaler could add nodes to this cluster.

    Ray reports a cluster config with node-type maxima when KubeRay or autoscaler v2 drives the
    cluster. The v1 autoscaler (`ray up cluster.yaml`, `ray start --autoscaling-config`) does not,
    but its status (written every few seconds by the head's monitor) names the configured node
    types; without an autoscaling config the monitor runs read-only and each node's type is just
    `node_<its id>`. The first status can lag a fresh head by a few seconds: wait up to `wait_s`.
    """
    import time

    from raycv import ray_internals

    try:
        if ray_internals.cluster_config_max_resources():
            return True
    except Exception:  # KubeRay / autoscaler v2 only; anything else may lack it
        pass
    deadline = time.monotonic() + wait_s
    while True:
        try:
            report = ray_internals.autoscaler_report()
        except Exception:
            report = None
        if report:
            mapping = report.get("node_type_mapping") or {}
            return any(t != f"node_{node_id}" for node_id, t in mapping.items())
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_can_hold(needed: dict[str, float], what: str, fix: str) -> None:
    """Refuse up front a request for resources (GPU, custom ones) that this cluster lacks and no
    autoscaler could add: Ray would otherwise wait forever without a word. `needed` is the total
    the job cannot start without (every training worker; the minimum predictor actor pool)."""
    have = ray.cluster_resources()
    short = {k: v for k, v in needed.items() if k != "CPU" and v > 0 and have.get(k, 0.0) + 1e-6 < v}
    if not short or autoscaler_running():
        return
    parts = ", ".join(f"{v:g} {k} (it has {have.get(k, 0.0):g})" for k, v in short.items())
    raise UserError(f"{what} needs {parts} and this cluster has no autoscaler that could add them; {fix}")
