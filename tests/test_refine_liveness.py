"""``refine`` takes a lease on its refinement: a second process on the same trial and settings is
refused in one line while the first one's lease is live, and runs once it is given back."""

from __future__ import annotations

import os
import platform

import optuna
from optuna.trial import TrialState
from conftest import REFINE_STUDY as STUDY
from conftest import run_cli

from autoprune.study._liveness import DriverLease
from autoprune.study.refine import checkpoint_key
from autoprune.study._storage import open_storage


def test_a_second_refinement_of_the_same_trial_is_refused_while_the_first_runs(capsys, studied):
    folder, config = studied
    settings = studied.refine_config(generations=2)
    other = DriverLease(open_storage(config.storage), f"{STUDY}:{checkpoint_key(settings)}", interval=0.2, grace=30)
    other.acquire()  # another process refining this trial with these settings
    args = ["refine", "--storage", config.storage, "--study", STUDY, "--trial", settings.trial, "--generations", 2,
            "--offspring", 3, "--pool-windows", 6, "--screen-tokens", 16, "--cache-dir", folder / "cache"]
    try:
        code, _, err = run_cli(capsys, *args)
    finally:
        other.release(clean=True)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"refinement of trial {settings.trial}" in err and f"({platform.node()} pid {os.getpid()}," in err
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    assert not [t for t in study.trials if t.user_attrs.get("refined_from") == settings.trial
                and t.user_attrs["refine"]["generations"] == 2]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    refined = [t for t in optuna.load_study(study_name=STUDY, storage=config.storage).trials
               if t.user_attrs.get("refined_from") == settings.trial and t.user_attrs["refine"]["generations"] == 2]
    assert len(refined) == 1 and refined[0].state == TrialState.COMPLETE
