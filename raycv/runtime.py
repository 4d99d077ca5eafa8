"""Connecting to Ray and sizing resources so that nothing waits forever on a small machine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
import ray.data

from raycv.errors import UserError

QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")


def connect(address: str | None = None, *, verbose: bool = False) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), else start a local instance.

    Ray's own chatter stays at warning level and worker logs stay off the console unless
    `verbose`: raycv prints its own progress from the run's metrics log.
    """
    level = logging.INFO if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:  # Ray Data logs a user error's stack before raising it; raycv reports it in one line
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=level, log_to_driver=verbose, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


@dataclass(frozen=True)
class CpuBudget:
    total: float  # every CPU of the cluster: what a request is checked against
    free: float  # not held right now (say, by this job's own driver): what default sizes share
    largest_node: float  # one worker or actor cannot span nodes


def cpu_budget() -> CpuBudget:
    total = float(ray.cluster_resources().get("CPU", 0.0))
    free = float(ray.available_resources().get("CPU", 0.0))
    nodes = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return CpuBudget(total=total, free=min(free, total), largest_node=max(nodes, default=total))


def plan_worker_resources(*, num_workers: int, use_gpu: bool, cpus_per_worker: float | None,
                          gpus_per_worker: float, data_cpus: float, total_cpus: float,
                          free_cpus: float | None = None, node_cpus: float | None = None) -> tuple[dict, int]:
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
    if num_workers * resources["CPU"] + (0 if use_gpu else data_cpus) > total_cpus + 1e-6:
        raise UserError(
            f"scaling.num_workers={num_workers} x {resources['CPU']:g} CPUs (+ scaling.data_cpus={data_cpus:g}) "
            f"needs more than this cluster's {total_cpus:g} CPUs and would wait forever; "
            f"lower scaling.num_workers or scaling.cpus_per_worker")
    threads = max(1, int(resources["CPU"] + 0.5))
    return resources, threads
