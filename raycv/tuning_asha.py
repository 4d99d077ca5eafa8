"""ASHA that keeps its rungs when `raycv tune` continues a search.

Ray Tune's `Tuner.restore` brings back a search's trials and its searcher, not its scheduler: the
ASHAScheduler it unpickles is the one pickled when the search began, with empty rungs. The first
trial to reach a rung after a restart would then never be stopped, however far behind, and those
after it would be judged against it alone. `ResumableASHA` writes every rung result it records to
`<search>/asha_rungs.json` (JSON: bracket, milestone, trial id, reward) and puts them back into its
brackets before its first decision in a continued search.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler

from raycv.data import io as fsio
from raycv.ray_internals import asha_bracket, asha_rungs


class ResumableASHA(ASHAScheduler):
    def __init__(self, rungs_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rungs_path = rungs_path
        self._written: list[dict] = []
        self._loaded = False

    def __getstate__(self) -> dict:
        # Tune pickles the scheduler into tuner.pkl when the search begins; the copy a continued
        # search unpickles reads the rungs back from the file
        return {**self.__dict__, "_written": [], "_loaded": False}

    def start_fresh(self) -> None:
        """A new search: whatever a file of that name held belongs to other trials."""
        fsio.write_text(self._rungs_path, "[]\n")
        self._loaded = True

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            self._written = json.loads(fsio.read_text(self._rungs_path) or "[]")
        except ValueError as e:
            raise ValueError(f"{self._rungs_path}: not raycv's ASHA record ({e})") from None
        rungs = asha_rungs(self)
        for r in self._written:
            for milestone, recorded in rungs[r["bracket"]]:
                if milestone == r["milestone"]:
                    recorded[r["trial_id"]] = r["reward"]

    def _record(self, trial_id: str, b: int) -> None:
        seen = {(r["bracket"], r["milestone"], r["trial_id"]) for r in self._written}
        new = [{"bracket": b, "milestone": m, "trial_id": trial_id, "reward": float(rec[trial_id])}
               for m, rec in asha_rungs(self)[b] if trial_id in rec and (b, m, trial_id) not in seen]
        if new:
            self._written += new
            fsio.write_text(self._rungs_path, json.dumps(self._written, indent=0) + "\n")

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        bracket = asha_bracket(self, trial.trial_id)
        action = super().on_trial_result(tune_controller, trial, result)
        if bracket is not None:
            self._record(trial.trial_id, bracket)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        bracket = asha_bracket(self, trial.trial_id)
        super().on_trial_complete(tune_controller, trial, result)
        if bracket is not None:
            self._record(trial.trial_id, bracket)
