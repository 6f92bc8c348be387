"""Ray Tune's OptunaSearch with the study kept in EXP_DIR/optuna.db (see ``fvae.study``).

Imported by ``fvae.tune.run_search`` only: it imports Ray. What it adds to OptunaSearch's own
``storage=`` support:

- every epoch's value is reported to the study, the last one too (Tune hands OptunaSearch a
  trial's last result only on completion, and OptunaSearch does not report it);
- each trial's value is its best epoch's value of the metric (in the mode's direction), read
  back from those per-epoch values, so the study, TPE and summary.json agree on a trial's
  value (OptunaSearch itself tells the last epoch's); a failed trial is FAIL (OptunaSearch tells
  a failed trial that had reported an epoch as COMPLETE);
- each trial carries Tune's trial id (user attribute ``ray_trial_id``);
- on ``--resume`` (Tune restores this searcher from its last experiment checkpoint), a trial the
  study holds as RUNNING that the checkpoint does not know was asked after that checkpoint and
  will never run: it is marked FAIL with a note, so that no trial is counted twice.

SQLite is safe here: only the search's driver writes to the study.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from fvae.study import NOTE_ATTR, TRIAL_ID_ATTR, storage_url


class KeptOptunaSearch(OptunaSearch):
    """OptunaSearch on ``sqlite:///EXP_DIR/optuna.db``, study ``study_name``."""

    def __init__(self, *, space: Callable[..., Any], metric: str, mode: str, sampler: Any, exp_dir: Path,
                 study_name: str) -> None:
        import optuna

        Path(exp_dir).mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(storage_url(exp_dir))
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler, study_name=study_name,
                         storage=storage)

    # OptunaSearch keeps its state in _ot_study, _ot_trials (Tune trial id -> optuna.Trial),
    # _completed_trials, _storage and _study_name; these overrides read them.

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TRIAL_ID_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        # fvae's trials leave NaN metrics out of their results; there is no value to report then
        if isinstance(value, (int, float)) and math.isfinite(value) and not self._told(trial_id):
            super().on_trial_result(trial_id, result)

    def _told(self, trial_id: str) -> bool:
        """Whether the study already holds this trial's end: after a driver was killed, Tune's last
        experiment checkpoint can predate a trial's end that the study recorded, and Tune then
        restores the trial, which reports its last epoch again."""
        return trial_id in self._ot_trials and self._frozen(trial_id).state.is_finished()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._completed_trials and self._told(trial_id):
            self._completed_trials.add(trial_id)
            return None
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        from fvae.tune import best_epoch

        # Tune hands a trial's last result (a scheduler's stop, or the trial's end) to
        # on_trial_complete only, never to on_trial_result: report it as the epoch it is
        step = (result or {}).get(TRAINING_ITERATION)
        if step is not None and step not in self._frozen(trial_id).intermediate_values:
            self.on_trial_result(trial_id, result)
        value = best_epoch(self._frozen(trial_id).intermediate_values.values(), self.mode)
        # result None: FAIL when the trial errored, PRUNED when it never had a finite value
        ok = not error and math.isfinite(value)
        super().on_trial_complete(trial_id, result={self.metric: value} if ok else None, error=error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._abandon_orphans()

    def _storage_id(self, number: int) -> int:
        sid = self._storage.get_study_id_from_name(self._study_name)
        return self._storage.get_trial_id_from_study_id_trial_number(sid, number)

    def _frozen(self, trial_id: str) -> Any:
        return self._storage.get_trial(self._storage_id(self._ot_trials[trial_id].number))

    def _abandon_orphans(self) -> None:
        from optuna.trial import TrialState

        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                tid = self._storage_id(t.number)
                self._storage.set_trial_user_attr(tid, NOTE_ATTR, "asked after the search's last checkpoint, "
                                                  "before its driver stopped; never run (--resume)")
                self._storage.set_trial_state_values(tid, TrialState.FAIL)
