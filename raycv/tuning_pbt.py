"""Population based training for `raycv tune` (`tune.scheduler=pbt`).

Every `perturbation_interval` epochs, once every trial of the population has reached that epoch
(Tune's synchronous PBT), the trials in the lowest quarter take the checkpoint of one in the top
quarter and its values, perturbed (x0.8 or x1.2 within the space's bounds, or resampled; a choice
moves to a neighbour). A raycv run cannot change its weights' source mid-run, so each such step is
a new run directory of the trial, `trials/<trial id>.from-<other trial>-epoch<k>`, that starts from
the other trial's epoch-k checkpoint (weights, optimizer state, schedule position) with the new
values; the trial's run before it stays as it was.

Tune hands a trial's checkpoints between trials: each trial reports the raycv checkpoint of every
epoch PBT may compare at to Tune, which copies it into the search's `tune/` folder (Ray Train's
integration with Tune reports metrics only, so raycv relays both from its training run's controller).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ray.train import UserCallback
from ray.tune.schedulers import PopulationBasedTraining

from raycv import ray_internals
from raycv.data import io as fsio


class FinalEpochPBT(PopulationBasedTraining):
    """PBT that leaves a trial's last epoch alone: the run ends there on its own (perturbing it would
    restart a finished run to train nothing)."""

    def __init__(self, epochs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._epochs = epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch", 0) >= self._epochs:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def choose_trial_to_run(self, tune_controller):
        """Synchronous PBT runs the trials behind its next comparison epoch. Tune restores a search
        without its scheduler: the comparison epoch starts again at the first interval, behind every
        restored trial, and none would run again. When nothing runs and trials wait: the next
        comparison after the furthest of them."""
        from ray.tune.experiment import Trial

        chosen = super().choose_trial_to_run(tune_controller)
        trials = tune_controller.get_trials()
        waiting = [t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)]
        if chosen is None and waiting and not any(t.status == Trial.RUNNING for t in trials):
            interval, _ = ray_internals.pbt_settings(self)
            furthest = max(ray_internals.pbt_record(self, t)[0] for t in waiting)
            ray_internals.pbt_compare_next_at(self, furthest + interval)
            chosen = super().choose_trial_to_run(tune_controller)
        return chosen


def _exploit_and_say(self, tune_controller, trial, trial_to_clone) -> None:
    getattr(PopulationBasedTraining, ray_internals.PBT_EXPLOIT)(self, tune_controller, trial, trial_to_clone)
    epoch = (ray_internals.pbt_record(self, trial_to_clone)[1] or {}).get("epoch")
    values = ", ".join(f"{k}={trial.config[k]:.4g}" if isinstance(trial.config[k], float) else f"{k}={trial.config[k]}"
                       for k in ray_internals.pbt_settings(self)[1])
    print(f"trial {trial.trial_id}: continues from trial {trial_to_clone.trial_id}'s epoch {epoch} with {values}",
          flush=True)  # the search's driver prints its lines (raycv tune's own echo is print)


setattr(FinalEpochPBT, ray_internals.PBT_EXPLOIT, _exploit_and_say)


class WithinBounds:
    """PBT's explore step multiplies a value by 0.8 or 1.2 without looking at its bounds: back into
    the space's `[low, high]` (an integer stays one)."""

    def __init__(self, space: dict[str, dict[str, Any]]) -> None:
        self.bounds = {key: (name, args) for key, dist in space.items() for name, args in dist.items()
                       if name in ("loguniform", "uniform", "randint")}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (name, (low, high)) in self.bounds.items():
            value = min(max(config[key], low), high)
            config[key] = int(round(value)) if name == "randint" else float(value)
        return config


def mutations(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What PBT resamples from: Tune's distributions, and a choice as a list (PBT moves a choice to a
    neighbour; it would multiply a `tune.choice` like a number)."""
    from raycv.tuning import search_space

    domains = search_space(space)
    return {key: list(dist["choice"]) if "choice" in dist else domains[key] for key, dist in space.items()}


class Relay(UserCallback):
    """In the training run's controller: each epoch's metrics, with its checkpoint at the epochs PBT
    compares at, to the trial (which reports them to Tune)."""

    def __init__(self, queue, every: int) -> None:
        self.queue, self.every = queue, every

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = dict(metrics[0])
        at = checkpoint is not None and int(m.get("epoch", 0)) % self.every == 0
        self.queue.put((m, checkpoint.path if at else None))


def segment(trial_id: str, start, storage: str) -> tuple[str, str | None]:
    """(run name, checkpoint to continue from) for a trial that Tune started with checkpoint `start`:
    its own run continues itself; another trial's checkpoint (PBT's exploit) starts a new run."""
    if start is None:
        return trial_id, None
    from raycv.training.checkpoint import read_info

    uri = fsio.with_scheme(start.filesystem, start.path, storage)
    info = read_info(uri)
    source = str((info.config.get("run") or {}).get("name") or "")
    if source.split(".", 1)[0] == trial_id:
        return source, None
    return f"{trial_id}.from-{source.split('.', 1)[0]}-epoch{info.epoch}", uri


# How long a trial waits, its run ended at a perturbation epoch, for Tune to pause it (synchronous
# PBT pauses every trial there at once); a trial still running then trains on.
PAUSE_WAIT_S = 300.0


def run(fit: Callable[..., Any], cfg, continue_from: str | None, every: int, storage: str):
    """The trial's raycv run, ending after each perturbation epoch (so no trial is ever ahead of the
    checkpoint Tune compares it at), its epochs reported to Tune from this (the trial's) thread with
    the checkpoints Relay passes on. Tune pauses the trial between two parts. -> fit's summary."""
    import json
    import time

    from ray import tune
    from ray.util.queue import Queue

    from raycv.training.tracking import METRICS_LOG

    fs, _ = fsio.resolve(storage)
    while True:
        queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        done: list[Any] = []

        def train() -> None:
            try:
                done.append(fit(cfg, callbacks=[Relay(queue, every)], continue_from=continue_from, pause_every=every))
            except BaseException as e:  # raised again in the trial's thread
                done.append(e)
            finally:
                queue.put(None)

        worker = threading.Thread(target=train, name="raycv-pbt-fit", daemon=True)
        worker.start()
        while (item := queue.get()) is not None:
            metrics, path = item
            tune.report(metrics, checkpoint=tune.Checkpoint(path, filesystem=fs) if path else None)
        worker.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        summary = done[0]
        lines = (fsio.read_text(fsio.join(summary.run_dir, METRICS_LOG)) or "").splitlines()
        patience = bool(lines) and json.loads(lines[-1]).get("early_stopped", False)
        if summary.epochs >= cfg.train.epochs or summary.epochs % every or patience:
            return summary
        time.sleep(PAUSE_WAIT_S)
        continue_from = None  # not paused: the run goes on from its own checkpoint


def trial_runs(trials_dir: str, trial_id: str) -> list[str]:
    """A trial's run directories, in the order they trained (PBT's steps start new ones)."""
    from raycv.training.driver import _latest_checkpoint_epoch

    names = [n for n in fsio.list_names(trials_dir) if n == trial_id or n.startswith(f"{trial_id}.from-")]
    return sorted((fsio.join(trials_dir, n) for n in names), key=_latest_checkpoint_epoch)
