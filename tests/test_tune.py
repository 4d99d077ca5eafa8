"""`raycv tune`: a Ray Tune search whose trials are raycv training runs (Ray Train inside Tune
trials), ASHA stopping the ones that fall behind; results, the best config, a picture; a search
run again under its name continues instead of starting over. Bad search spaces fail in one line
before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raycv.cli import main

REPO = Path(__file__).parents[1]
RECIPE = REPO / "jobs" / "configs" / "digits_tune.yaml"


@pytest.mark.parametrize("overrides,message", [
    (["tune.space={optim.lrr: {loguniform: [1.0e-4, 0.1]}}"],
     "tune.space.optim.lrr: unknown config key 'optim.lrr' (valid keys here: name, lr,"),
    (["tune.space={optim.lr: {loguniform: [0, 0.1]}}"], "tune.space: optim.lr: loguniform wants [low, high], 0 < low < high"),
    (["tune.space={optim.lr: {normal: [1, 2]}}"], "tune.space: optim.lr: want one of {loguniform: "),
    (["tune.space={data.augment: {choice: [none, heavy]}}"], "tune.space.data.augment: data.augment='heavy': Input should be"),
    (["tune.space={run.name: {choice: [a, b]}}"], "tune.space: run.name: the search cannot vary tune.* or run.* keys"),
    (["tune.metric=val_acc"], "tune.metric='val_acc': Input should be 'val_accuracy'"),
    (["tune.scheduler=hyperband"], "tune.scheduler='hyperband': Input should be 'none', 'asha' or 'pbt'"),
    (["tune.scheduler=pbt", "tune.space={model.name: {choice: [simple_cnn, resnet18]}}"],
     "tune.space.model.name: tune.scheduler=pbt changes values mid-run, from another trial's checkpoint, and "
     "model.name cannot change there (it can: optim.lr, "),
    (["tune.scheduler=pbt", "tune.space={train.label_smoothing: {grid: [0.0, 0.1]}}"],
     "tune.space.train.label_smoothing: tune.scheduler=pbt mutates what it samples; a grid is not sampled"),
    (["tune.scheduler=pbt", "tune.space={optim.weight_decay: {uniform: [0, 0.01]}}"],
     "tune.space.optim.weight_decay: with tune.scheduler=pbt every value must be > 0"),
    (["tune.scheduler=pbt", "tune.search=optuna"], "tune.scheduler=pbt samples its population at random"),
    (["tune.scheduler=pbt", "tune.perturbation_interval=3"],
     "tune.perturbation_interval=3 is not below train.epochs=3: PBT would never compare the trials"),
])
def test_a_bad_search_is_one_line_before_ray_starts(overrides, message, monkeypatch, capsys):
    from raycv import runtime

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    assert main(["tune", "--config", str(RECIPE), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("raycv tune: error: ") and message in err, err


def test_pbt_runs_its_population_at_once_and_says_when_it_does_not_fit():
    from raycv.config import load_config
    from raycv.errors import UserError
    from raycv.tuning import plan_trials

    cfg = load_config("tune", RECIPE, ["tune.scheduler=pbt", "tune.num_samples=2"])
    assert plan_trials(cfg, 2.0) == (2, 0.5)  # (2 CPUs - 2 x data_cpus 0.5) / 2 trials
    assert plan_trials(load_config("tune", RECIPE, ["tune.num_samples=2"]), 2.0) == (1, 1.5)  # ASHA: one at a time
    with pytest.raises(UserError, match=r"^tune.scheduler=pbt trains its population side by side, and "
                                        r"tune.num_samples=6 x scaling.num_workers=1 does not fit this cluster's 2 CPUs"):
        plan_trials(load_config("tune", RECIPE, ["tune.scheduler=pbt"]), 2.0)


def test_pbt_keeps_perturbed_values_within_the_space():
    """PBT multiplies a value by 0.8 or 1.2 whatever its bounds; raycv puts it back inside them (a
    momentum of 0.99 x 1.2 would be refused by the config and fail the trial), and moves choices as lists."""
    from raycv.tuning_pbt import WithinBounds, mutations

    space = {"optim.momentum": {"uniform": [0.5, 0.99]}, "optim.lr": {"loguniform": [1.0e-4, 0.1]},
             "n": {"randint": [1, 4]}, "data.augment": {"choice": ["none", "light"]}}
    keep = WithinBounds(space)
    assert keep({"optim.momentum": 0.99 * 1.2, "optim.lr": 0.1 * 0.8, "n": 4 * 1.2, "data.augment": "light"}) == \
        {"optim.momentum": 0.99, "optim.lr": 0.1 * 0.8, "n": 4, "data.augment": "light"}
    assert keep({"optim.momentum": 0.4, "optim.lr": 1e-5, "n": 1 * 0.8, "data.augment": "none"}) == \
        {"optim.momentum": 0.5, "optim.lr": 1e-4, "n": 1, "data.augment": "none"}
    assert mutations(space)["data.augment"] == ["none", "light"]


def test_optuna_is_an_extra_asked_for_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as where it is not installed: `import optuna` fails
    assert main(["tune", "--config", str(RECIPE), "tune.search=optuna"]) == 2
    assert capsys.readouterr().err.strip() == ("raycv tune: error: tune.search=optuna needs Optuna: "
                                              "pip install 'raycv[optuna]'")
    assert main(["tune", "--config", str(RECIPE), "tune.search=optuna",
                 "tune.space={data.batch_size: {grid: [16, 32]}}"]) == 2
    assert "a grid needs tune.search=random" in capsys.readouterr().err


def test_an_empty_space_is_one_line(tmp_path, capsys):
    assert main(["tune", "train.epochs=1"]) == 2
    assert capsys.readouterr().err.strip().startswith("raycv tune: error: tune.space is empty: give at least one key")


@pytest.mark.slow
def test_a_search_stops_trials_early_writes_its_results_and_continues_by_name(tmp_path):
    """Four 1-worker trials of up to 2 epochs over optim.lr (log-uniform over four decades) and
    data.augment, one at a time, on the test machine's 2 CPUs, with raycv's own Ray (its dashboard
    on 127.0.0.1: Ray Train's cleaner of a stopped trial's placement group asks its State API).
    The seed fixes the samples: the second trial's learning rate (1.5e-5) cannot get near the
    first's (3.5e-3) accuracy in one epoch, so ASHA stops it at its first rung.

    The search is interrupted (Ctrl-C) once its first trial has finished, then run again under the
    same name: the first trial is not trained again, the others are run."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    args = [sys.executable, "-m", "raycv.cli", "tune", "--config", str(RECIPE), "train.epochs=2", "tune.num_samples=4",
            f"run.storage_path={tmp_path}", "run.name=search"]
    run = tmp_path / "search"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None and not list(run.glob("trials/*/summary.json")):
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # our own child only: the Ray instance it started ends with it
    printed = first.communicate(timeout=300)[0]
    done = list(run.glob("trials/*/summary.json"))
    assert len(done) == 1, printed[-3000:]
    assert len(list(run.glob("trials/*/metrics.jsonl"))) < 4, printed[-3000:]  # interrupted mid-search
    finished = done[0].parent
    stamp = (finished / "metrics.jsonl").stat().st_mtime_ns

    second = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "continuing the search" in second.stdout
    assert f"trial {finished.name}: epoch" not in second.stdout  # the finished trial was not trained again
    assert (finished / "metrics.jsonl").stat().st_mtime_ns == stamp
    table = pq.read_table(run / "tune_results.parquet").to_pylist()
    assert len(table) == 4 and all(r["status"] == "done" for r in table), table
    assert all(r["epochs"] in (1, 2) for r in table)
    # the search continued with ASHA's rungs as the first run left them: the next trial (the slow
    # learner, lr 1.5e-5) is judged against the finished one and stopped at its first rung (a
    # scheduler restored with empty rungs lets the first trial after a restart run on, whatever it scores)
    rungs = json.loads((run / "asha_rungs.json").read_text())
    assert {(r["trial_id"], r["milestone"]) for r in rungs} >= {(finished.name, 1), (finished.name, 2)}

    def epoch_one(trial_id: str) -> float:
        return json.loads((run / "trials" / trial_id / "metrics.jsonl").read_text().splitlines()[0])["val_accuracy"]

    following = min((r for r in table if r["trial_id"] != finished.name), key=lambda r: r["trial_id"])
    assert following["param.optim.lr"] < 2e-5 and epoch_one(following["trial_id"]) < epoch_one(finished.name)
    assert following["stopped_early"] and following["epochs"] == 1, table
    assert all(r["epochs"] == 2 for r in table if not r["stopped_early"])
    best = max(table, key=lambda r: r["best_val_accuracy"])
    assert f"best: trial {best['trial_id']}, val_accuracy {best['best_val_accuracy']:.4f}" in second.stdout
    assert best["best_val_accuracy"] > 0.8 and (run / "tune_results.csv").read_text().count("\n") == 5

    # best_config.yaml is the best trial's own recipe: raycv train --config reads it as that config
    from raycv.config import load_config

    again = load_config("train", run / "best_config.yaml").model_dump(mode="json")
    trial = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    for section in ("data", "model", "optim", "train", "scaling"):
        assert again[section] == trial[section], section
    assert again["optim"]["lr"] == best["param.optim.lr"] and again["data"]["augment"] == best["param.data.augment"]
    assert (run / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in table:  # every trial is a raycv run: its epochs and checkpoints
        log = [json.loads(ln) for ln in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in log] == list(range(1, r["epochs"] + 1))
        assert (Path(r["run_dir"]) / "checkpoint_epoch_0001" / "model.pt").is_file()
    assert (Path(best["run_dir"]) / "summary.json").is_file()  # the best trial finished its run


@pytest.mark.slow
def test_pbt_continues_the_trials_behind_from_the_checkpoints_of_those_ahead(tmp_path):
    """Population based training over two 1-worker trials of 2 epochs, compared after epoch 1
    (synchronous PBT: both trials stop there; the last epoch is never compared). The trial behind
    continues from the other's checkpoint in a new run of its own, with the other's values
    perturbed. That run starts at epoch 2 and trains with its own values: its learning rate over its
    configured peak (a constant schedule after one warm-up epoch: 1) is the same as in the other
    trial's run (a resume that kept the checkpoint's optimizer values would give the other trial's lr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    args = [sys.executable, "-m", "raycv.cli", "tune", "--config", str(RECIPE), "train.epochs=2",
            "train.lr_schedule=constant", "tune.num_samples=2", "tune.scheduler=pbt", "tune.perturbation_interval=1",
            f"run.storage_path={tmp_path}", "run.name=pbt"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run = tmp_path / "pbt"
    table = pq.read_table(run / "tune_results.parquet").to_pylist()
    assert len(table) == 2 and all(r["status"] == "done" and r["epochs"] == 2 for r in table), table
    steps = [line for line in done.stdout.splitlines() if "continues from trial" in line]
    continued = sorted(p.name for p in (run / "trials").glob("*.from-*"))
    assert len(steps) == 1 and len(continued) == 1 and continued[0].endswith("-epoch1"), (done.stdout, continued)

    ratio: dict[int, list[float]] = {}  # epoch -> lr / configured peak, over every run
    for r in table:
        runs = [*filter(None, r["earlier_runs"].split(" ")), r["run_dir"]]
        epochs = []
        for d in map(Path, runs):
            log = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
            peak = yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"]
            first = int(d.name.rsplit("-epoch", 1)[1]) + 1 if ".from-" in d.name else 1
            assert [m["epoch"] for m in log] == list(range(first, first + len(log))), d
            assert all(m["started_at_epoch"] <= m["epoch"] for m in log) and log[0]["started_at_epoch"] == first
            for m in log:
                ratio.setdefault(m["epoch"], []).append(m["lr"] / peak)
            epochs += [m["epoch"] for m in log]
        assert epochs == [1, 2], (r["trial_id"], runs)  # each epoch once, across the trial's runs
        last = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert last["optim"]["lr"] == r["param.optim.lr"] and last["data"]["augment"] == r["param.data.augment"]
    assert ratio[2] == pytest.approx([1.0, 1.0], rel=1e-12), ratio  # after the warm-up epoch: the peak
    best = max(table, key=lambda r: r["best_val_accuracy"])
    assert best["best_val_accuracy"] > 0.8 and (Path(best["run_dir"]) / "summary.json").is_file()


def test_a_search_submits_as_a_job_through_jobs_tune_py():
    """`raycv submit tune ...` checks the search here and submits jobs/tune.py, which runs `raycv tune`
    (run on a head by tests/test_jobs.py::test_a_search_runs_as_a_job)."""
    from raycv import submit
    from raycv.errors import ConfigError

    submit.validate_locally("tune", "jobs/configs/digits_tune.yaml", ["tune.num_samples=2"], REPO)
    with pytest.raises(ConfigError, match="tune.space.optim.lrr: unknown config key"):
        submit.validate_locally("tune", "jobs/configs/digits_tune.yaml",
                                ["tune.space={optim.lrr: {uniform: [0.1, 0.2]}}"], REPO)
    assert submit.entrypoint("tune", ["--config", "jobs/configs/digits_tune.yaml"], REPO) == \
        "python jobs/tune.py --config jobs/configs/digits_tune.yaml"
    assert "console([\"tune\", *sys.argv[1:]])" in (REPO / "jobs" / "tune.py").read_text()


@pytest.mark.slow
def test_a_search_stopped_before_tune_saved_or_recorded_a_trial_continues_whole(tmp_path):
    """Two ways a search stops that Tune's own restore gets wrong: before its first save (only
    tuner.pkl is there: restoring that ran 1 of 2 trials, without their parameters), and between a
    trial's run ending and Tune recording it (the restored trial trains nothing and reported no
    metric: Tune failed the search). raycv starts the first again and reports the second's last epoch."""
    import re

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    args = [sys.executable, "-m", "raycv.cli", "tune", "--config", str(RECIPE), "train.epochs=1", "tune.num_samples=2",
            f"run.storage_path={tmp_path}", "run.name=s"]
    run = tmp_path / "s"
    # Its stdout closed before it writes: the search stops at its first line, after Tune's Tuner
    # has saved tuner.pkl and before the search starts (the line comes just before Tuner.fit).
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    first.stdout.close()
    assert first.wait(timeout=300) != 0
    assert (run / "tune" / "tuner.pkl").is_file() and not list((run / "tune").glob("experiment_state*"))
    assert not (run / "trials").exists()

    second = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "continuing" not in second.stdout and "2 trials" in second.stdout, second.stdout
    table = pq.read_table(run / "tune_results.parquet").to_pylist()
    assert len(table) == 2 and all(r["status"] == "done" and r["param.optim.lr"] > 0 for r in table), table

    # What a driver that died after a trial's run ended, before Tune recorded it, leaves behind.
    state = next((run / "tune").glob("experiment_state-*.json"))
    saved = json.loads(state.read_text())
    trial = json.loads(saved["trial_data"][1][0])
    assert trial["status"] == "TERMINATED"
    saved["trial_data"][1][0] = saved["trial_data"][1][0].replace('"status": "TERMINATED"', '"status": "RUNNING"')
    state.write_text(json.dumps(saved))
    log = Path(table[1]["run_dir"]) / "metrics.jsonl"
    before = log.read_text()

    third = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert "continuing the search" in third.stdout and log.read_text() == before  # nothing trained again
    again = {r["trial_id"]: r for r in pq.read_table(run / "tune_results.parquet").to_pylist()}
    assert again[table[1]["trial_id"]]["best_val_accuracy"] == table[1]["best_val_accuracy"]
    assert all(r["status"] == "done" for r in again.values()) and len(again) == 2
    assert re.search(rf"trial {trial['trial_id']}: epoch 1 val_accuracy", third.stdout), third.stdout
