"""The search's Optuna study, kept in EXP_DIR/optuna.db (SQLite).

``python -m fvae.tune`` hands Ray's OptunaSearch this storage (``fvae.searcher``), so
every trial Tune runs is a trial of one Optuna study, named after the search space,
with its real distributions, its per-epoch values (``report``) and, as its value, the
best epoch's value of the space's metric: what summary.json calls the trial's
``value``. Each Optuna trial carries Tune's trial id as the user attribute
``ray_trial_id``. Open it with

    optuna-dashboard sqlite:///EXP_DIR/optuna.db
    optuna.load_study(study_name=NAME, storage="sqlite:///EXP_DIR/optuna.db")

(NAME is summary.json's ``study.name``). This module does not import Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

STUDY_FILE = "optuna.db"
TRIAL_ID_ATTR = "ray_trial_id"  # user attribute: Tune's trial id (the summary's trial_id)
NOTE_ATTR = "fvae_note"  # user attribute: why fvae ended a trial itself (see fvae.searcher)


def storage_url(exp_dir: str | Path) -> str:
    """``sqlite:////abs/EXP_DIR/optuna.db``: what optuna and optuna-dashboard take."""
    return f"sqlite:///{Path(exp_dir).resolve() / STUDY_FILE}"


def open_study(exp_dir: str | Path, summary: dict[str, Any] | None = None) -> optuna.Study | None:
    """The search's study from EXP_DIR/optuna.db, or None when the search kept none (searches made
    before fvae kept it). The name is summary.json's ``study.name``, else the database's only study."""
    path = Path(exp_dir) / STUDY_FILE
    if not path.is_file():  # optuna would create an empty database
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(exp_dir)
    name = ((summary or {}).get("study") or {}).get("name")
    if name is None:
        names = optuna.get_all_study_names(url)
        if len(names) != 1:
            raise ValueError(f"{path}: holds studies {names}; summary.json names none of them")
        name = names[0]
    return optuna.load_study(study_name=name, storage=url)
