"""`raycv tune`: hyperparameter search with Ray Tune, each trial a full raycv training run.

    recipe (train sections + `tune:`) --validate (space, metric)--> TuneConfig        raycv/config.py
      -> Tuner(trial function at 0.01 CPU, param_space, ASHA / none, random / Optuna search)
           each trial: the recipe + its sampled values -> raycv's fit (Ray Train's TorchTrainer)
             in <storage>/<name>/trials/<trial id>, reporting every epoch to Tune through Ray
             Train's TuneReportCallback (Ray's Train V2 + Tune integration)
      -> tune_results.parquet / .csv, best_config.yaml, tune.png, in <storage>/<name>/

Tune's own state lives in <storage>/<name>/tune: the same `run.name` restores it, and finished
trials are not run again. Every trial gets the same CPUs (`scaling.cpus_per_worker` fixed here
from the cluster and `tune.max_concurrent_trials`), so trials running side by side never wait on
each other forever.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from raycv.config import DISTRIBUTIONS, TrainConfig, TuneConfig, default_run_name, resolve_storage_path, to_yaml
from raycv.data import io as fsio
from raycv.errors import UserError


TRIAL_DRIVER_CPUS = 0.01


@dataclass
class TuneSummary:
    run_dir: str
    metric: str
    mode: str
    trials: list[dict[str, Any]]  # one row per trial, as in tune_results.parquet
    best: dict[str, Any] | None
    best_config: str | None
    results: str
    plot: str | None
    wall_seconds: float
    restored: bool = False
    errors: list[str] = field(default_factory=list)

    def table(self) -> str:
        params = sorted({k for t in self.trials for k in t["params"]})
        pbt = any(len(t["runs"]) > 1 for t in self.trials)  # PBT continued some from other trials' checkpoints
        head = ["trial", *params, f"best {self.metric}", f"last {self.metric}", "epochs", "stopped early", "status",
                *(["runs"] if pbt else [])]
        rows = [[t["trial_id"], *(_fmt(t["params"].get(p)) for p in params), _fmt(t["best"]), _fmt(t["last"]),
                 str(t["epochs"]), "yes" if t["stopped_early"] else "", t["status"], *([str(len(t["runs"]))] if pbt else [])]
                for t in self.trials]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """YAML distributions (checked by TuneSection) -> Tune's."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),  # both bounds included, as written
            "choice": lambda a: tune.choice(list(a)), "grid": lambda a: tune.grid_search(list(a))}
    assert set(make) == set(DISTRIBUTIONS)
    return {key: make[name](args) for key, dist in space.items() for name, args in dist.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any], *, storage: str, trial_id: str) -> TrainConfig:
    """The recipe with a trial's sampled values, in the search's trials/ folder."""
    from raycv.config import _merge

    nested: dict[str, Any] = {}
    for key, value in params.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    merged = _merge(base, nested)
    # set as strings, not parsed as YAML: a trial id such as 84924_00000 would read as an integer
    merged = _merge(merged, {"run": {"storage_path": storage, "name": trial_id, "resume": "auto"}})
    return TrainConfig.model_validate(merged)


def _trial_fn(base: dict[str, Any], storage: str, pbt_every: int | None = None) -> Callable[[dict[str, Any]], None]:
    """Each trial a raycv run; with PBT (`pbt_every`: its perturbation interval) the run Tune's
    checkpoint names, or a new one continuing another trial's checkpoint (raycv.tuning_pbt)."""
    def run_trial(params: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from raycv.training.driver import fit

        trial_id = tune.get_context().get_trial_id()
        if pbt_every:
            from raycv import tuning_pbt

            name, continue_from = tuning_pbt.segment(trial_id, tune.get_checkpoint(), storage)
            cfg = trial_config(base, params, storage=storage, trial_id=name)
            summary = tuning_pbt.run(fit, cfg, continue_from, pbt_every, storage)
        else:
            cfg = trial_config(base, params, storage=storage, trial_id=trial_id)
            summary = fit(cfg, callbacks=[TuneReportCallback()])
        if summary.resumed_from_epoch and summary.resumed_from_epoch >= summary.epochs:
            # The run had ended before this call (the search stopped between the run's end and
            # Tune's record of it) and trained nothing now: Tune still needs the trial's result.
            tune.report(last_epoch(summary.run_dir))

    return run_trial


def last_epoch(run_dir: str) -> dict[str, Any]:
    """The numbers of a run's last logged epoch (its metrics.jsonl), as the run reported them."""
    import json

    from raycv.training.tracking import METRICS_LOG

    lines = (fsio.read_text(fsio.join(run_dir, METRICS_LOG)) or "").splitlines()
    if not lines:
        raise UserError(f"{run_dir} has checkpoints but no metrics.jsonl line: it is not a raycv run this search can read")
    last = json.loads(lines[-1])
    return {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _has_state(experiment: str) -> bool:
    """Whether Tune saved the search's state there (a search stopped before its first save left
    only tuner.pkl: restoring that runs fewer trials than asked, so it starts again)."""
    return any(n.startswith("experiment_state") for n in fsio.list_names(experiment))


def plan_trials(cfg: TuneConfig, total_cpus: float) -> tuple[int, float]:
    """(trials at once, CPUs per training worker): each trial holds num_workers x cpus + data_cpus."""
    s = cfg.scaling
    if s.use_gpu:
        return cfg.tune.max_concurrent_trials or 1, s.cpus_per_worker or 1.0
    if s.cpus_per_worker is not None:
        per_trial = s.num_workers * s.cpus_per_worker + s.data_cpus
        fits = max(1, math.floor(total_cpus / per_trial + 1e-9))
        return cfg.tune.max_concurrent_trials or fits, s.cpus_per_worker
    # PBT compares a population running side by side (its trials otherwise wait paused in turns)
    concurrent = cfg.tune.max_concurrent_trials or (cfg.tune.num_samples if cfg.tune.scheduler == "pbt" else 1)
    cpus = min(8.0, (total_cpus - concurrent * s.data_cpus) / (concurrent * s.num_workers))
    if cpus < 0.1:
        if not cfg.tune.max_concurrent_trials and cfg.tune.scheduler == "pbt":
            raise UserError(f"tune.scheduler=pbt trains its population side by side, and tune.num_samples={concurrent} "
                            f"x scaling.num_workers={s.num_workers} does not fit this cluster's {total_cpus:g} CPUs "
                            f"(with scaling.data_cpus={s.data_cpus:g} per trial); lower tune.num_samples or set "
                            "tune.max_concurrent_trials (the others then wait their turn, paused)")
        raise UserError(f"tune.max_concurrent_trials={concurrent} x scaling.num_workers={s.num_workers} does not fit "
                        f"this cluster's {total_cpus:g} CPUs (with scaling.data_cpus={s.data_cpus:g} per trial); "
                        "lower one of them")
    return concurrent, round(cpus, 3)


def tune_search(cfg: TuneConfig, echo: Callable[[str], None] = print) -> TuneSummary:
    """Run (or continue) the search `cfg` describes."""
    from ray import tune

    from raycv import plugins, runtime, tasks
    from raycv.data import check_source
    from raycv.models import get_model_entry

    t0 = time.perf_counter()
    if not cfg.tune.space:
        raise UserError("tune.space is empty: give at least one key to search, e.g. "
                        "tune.space={optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}")
    plugins.load(cfg.run.plugins)
    train_cfg = cfg.train_config()
    task = check_source(train_cfg.data).task  # the same checks as raycv train, before Ray starts
    tasks.check_model_fits(task, train_cfg.model.name, get_model_entry(train_cfg.model.name).task)
    tasks.check_extras(task)
    metric = cfg.tune.metric or tasks.checkpoint_metric(task, cfg.train.checkpoint_metric)
    mode = cfg.tune.mode or ("min" if metric == "val_loss" else "max")
    if cfg.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError("tune.search=optuna needs Optuna: pip install 'raycv[optuna]'") from None
    storage = resolve_storage_path(cfg.run.storage_path)
    name = cfg.run.name or default_run_name(train_cfg).replace(f"{train_cfg.data.name}-", f"tune-{train_cfg.data.name}-", 1)
    run_dir = fsio.join(storage, name)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables stay off (verbose=0); raycv prints its lines
    runtime.connect(cfg.run.address, verbose=cfg.run.verbose, dashboard=True)
    concurrent, cpus = plan_trials(cfg, runtime.cpu_budget().total)
    base = train_cfg.model_dump(mode="json")
    base["scaling"]["cpus_per_worker"] = cpus
    base["train"]["checkpoint_metric"] = tasks.checkpoint_metric(task, cfg.train.checkpoint_metric)
    trials_dir = fsio.join(run_dir, "trials")
    fsio.make_dirs(run_dir)
    fsio.write_text(fsio.join(run_dir, "tune_config.yaml"), to_yaml(cfg))

    # The trial function only waits on its TorchTrainer; Tune refuses an empty request, so a sliver
    # (taken from the scaling.data_cpus every trial leaves free).
    pbt_every = cfg.tune.perturbation_interval if cfg.tune.scheduler == "pbt" else None
    trainable = tune.with_resources(_trial_fn(base, trials_dir, pbt_every), {"CPU": TRIAL_DRIVER_CPUS})
    experiment = fsio.join(run_dir, "tune")
    # PBT's trials restart as runs that resume from their checkpoints, not by reusing actors
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    restored = tune.Tuner.can_restore(experiment) and _has_state(experiment)
    if restored:
        echo(f"raycv tune: continuing the search in {run_dir} (finished trials are not run again)")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if cfg.tune.scheduler == "asha":
            from raycv.tuning_asha import ResumableASHA  # Tune restores a search without its rungs

            scheduler = ResumableASHA(fsio.join(run_dir, "asha_rungs.json"),
                                      time_attr="training_iteration", max_t=cfg.train.epochs,
                                      grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                                      reduction_factor=cfg.tune.reduction_factor,
                                      stop_last_trials=False)  # a trial that reaches max_t ends on its own,
            # after raycv has written its summary: stopping it there would kill it mid-write
            scheduler.start_fresh()
        elif cfg.tune.scheduler == "pbt":
            from raycv.tuning_pbt import FinalEpochPBT, WithinBounds, mutations

            # synchronous: the population is compared at the same epoch, every trial having reached it
            scheduler = FinalEpochPBT(cfg.train.epochs, time_attr="epoch", perturbation_interval=pbt_every,
                                      hyperparam_mutations=mutations(cfg.tune.space),
                                      custom_explore_fn=WithinBounds(cfg.tune.space), synch=True)
        if cfg.tune.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search = OptunaSearch(seed=cfg.tune.seed)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            search = BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrent)
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg.tune.space),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=concurrent, scheduler=scheduler, search_alg=search,
                                        # not reuse_actors: a trial ASHA stops leaves its training running in
                                        # the actor, and the next trial there waits on it (seen: a hang)
                                        reuse_actors=False),
            run_config=tune.RunConfig(name="tune", storage_path=run_dir, verbose=0,
                                      callbacks=[_echo_callback(metric, echo)]))
        echo(f"raycv tune: {cfg.tune.num_samples} sample(s) of {', '.join(cfg.tune.space)}; {metric} ({mode}); "
             f"scheduler {cfg.tune.scheduler}, search {cfg.tune.search}; {concurrent} trial(s) at once, "
             f"{cfg.scaling.num_workers} worker(s) x {cpus:g} CPU each; search {run_dir}")
    grid = tuner.fit()
    return _summarize(grid, cfg, metric, mode, run_dir, trials_dir, base, t0, restored)


def _echo_callback(metric: str, echo: Callable[[str], None]):
    """A Tune callback: one line per trial epoch and end (Tune's own table stays off)."""
    from ray.tune import Callback

    class Echo(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            echo(f"trial {trial.trial_id}: epoch {result.get('epoch', result.get('training_iteration'))}"
                 + (f" {metric} {value:.4f}" if isinstance(value, (int, float)) else ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            echo(f"trial {trial.trial_id}: done")

        def on_trial_error(self, iteration, trials, trial, **info):
            echo(f"trial {trial.trial_id}: error ({trial.error_file or 'see its log'})")

    return Echo()


def _summarize(grid, cfg: TuneConfig, metric: str, mode: str, run_dir: str, trials_dir: str,
               base: dict[str, Any], t0: float, restored: bool) -> TuneSummary:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    trials, errors = [], []
    better = max if mode == "max" else min
    for result in grid:
        trial_id = _trial_id(result)
        df = result.metrics_dataframe
        history = [float(v) for v in df[metric].tolist()] if df is not None and metric in df else []
        epochs = len(history)
        runs = [fsio.join(trials_dir, trial_id)]
        if cfg.tune.scheduler == "pbt":  # PBT's steps start new runs, which go on from another trial's epoch
            from raycv.tuning_pbt import trial_runs

            runs = trial_runs(trials_dir, trial_id) or runs
            epochs = int(df["epoch"].iloc[-1]) if df is not None and "epoch" in df and len(df) else 0
        status = "error" if result.error else "done"
        if result.error:
            errors.append(f"trial {trial_id}: {str(result.error).strip().splitlines()[-1]}")
        trials.append({
            "trial_id": trial_id, "params": {k: result.config[k] for k in cfg.tune.space if k in result.config},
            "best": better(history) if history else None, "last": history[-1] if history else None,
            "history": history, "epochs": epochs, "status": status,
            "stopped_early": status == "done" and epochs < cfg.train.epochs,
            "run_dir": runs[-1], "runs": runs})
    trials.sort(key=lambda t: t["trial_id"])
    scored = [t for t in trials if t["best"] is not None]
    best = better(scored, key=lambda t: t["best"]) if scored else None
    if best is None:
        raise UserError(f"no trial reported {metric}: {errors[0] if errors else 'see the trials in ' + trials_dir}")
    rows = [{"trial_id": t["trial_id"], **{f"param.{k}": (v if isinstance(v, (int, float)) else str(v))
                                            for k, v in t["params"].items()},
             f"best_{metric}": t["best"], f"last_{metric}": t["last"], "epochs": t["epochs"],
             "stopped_early": t["stopped_early"], "status": t["status"], "run_dir": t["run_dir"],
             **({"earlier_runs": " ".join(t["runs"][:-1])} if cfg.tune.scheduler == "pbt" else {})} for t in trials]
    table = pa.Table.from_pylist(rows)
    results = fsio.join(run_dir, "tune_results.parquet")
    fs, p = fsio.resolve(results)
    pq.write_table(table, p, filesystem=fs)
    with fs.open_output_stream(fsio.resolve(fsio.join(run_dir, "tune_results.csv"))[1]) as f:
        pacsv.write_csv(table, f)
    best_cfg = trial_config(base, best["params"], storage=cfg.run.storage_path, trial_id="x")
    best_cfg = best_cfg.model_copy(update={"run": best_cfg.run.model_copy(update={"name": None})})
    best_path = fsio.join(run_dir, "best_config.yaml")
    note = (f"# raycv train --config best_config.yaml trains it again (scaling.cpus_per_worker as the search "
            f"sized it)\n")
    if len(best["runs"]) > 1:
        note = (f"# PBT changed its values during training (its runs: {', '.join(r.rsplit('/', 1)[-1] for r in best['runs'])}): "
                f"these are its last ones; raycv train --config best_config.yaml trains with them from the start\n")
    fsio.write_text(best_path, f"# the best trial of {run_dir}: {best['trial_id']}, {metric} {best['best']:.6g}\n"
                    + note + to_yaml(best_cfg))
    plot = None
    try:
        plot = fsio.join(run_dir, "tune.png")
        fsio.write_bytes(plot, draw(trials, metric, cfg))
    except Exception:  # a picture is not worth failing a finished search
        plot = None
    return TuneSummary(run_dir=run_dir, metric=metric, mode=mode, trials=trials, best=best, best_config=best_path,
                       results=results, plot=plot, wall_seconds=time.perf_counter() - t0, restored=restored,
                       errors=errors)


def _trial_id(result) -> str:
    """Tune's trial id (e.g. 3f1a2_00001), as the trial function saw it: the trial folder's name
    holds it after the trainable's name."""
    import re

    m = re.search(r"_([0-9a-f]{5}_\d{5})", result.path.rstrip("/").rsplit("/", 1)[-1])
    return m.group(1) if m else result.path.rstrip("/").rsplit("/", 1)[-1]


def draw(trials: list[dict[str, Any]], metric: str, cfg: TuneConfig) -> bytes:
    """The metric per epoch of every trial, and the best metric against each searched parameter."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(cfg.tune.space)
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.6), squeeze=False)
    ax = axes[0][0]
    for t in trials:
        if t["history"]:
            ax.plot(range(1, len(t["history"]) + 1), t["history"], marker="o", ms=3,
                    ls="--" if t["stopped_early"] else "-", label=t["trial_id"][-5:])
    ax.set(xlabel="epoch", ylabel=metric, title="every trial (dashed: stopped early)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=6)
    for ax, key in zip(axes[0][1:], keys):
        xs = [t["params"].get(key) for t in trials if t["best"] is not None]
        ys = [t["best"] for t in trials if t["best"] is not None]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys)
            if "loguniform" in cfg.tune.space[key]:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=f"best {metric}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
