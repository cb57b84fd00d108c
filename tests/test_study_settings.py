"""Typed study settings: written and read in one place, the stored form unchanged, so a study
written before they were typed (``tests/data/legacy_study.journal``, made by
``tests/data/make_legacy_study.py`` with the code of commit 85e2412) still resumes, refines and
exports; ``prepare`` results have names; a refined trial's constraints use Optuna's own API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune import CalibrationConfig, prepare, prepare_with_windows
from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.study import (
    SearchConfig,
    StudySettings,
    TrialResult,
    WorkerSpec,
    open_storage,
    pareto_trials,
    run_search,
    study_settings,
    trial_plan,
    trial_recipe,
)
from autoprune.study._settings import SETTINGS_ATTR
from autoprune.study.refine import EvolutionState, RefineConfig, record_refinement
from conftest import TRIALS_ONLY, save_tiny_model, synthetic_text, tiny_llama_config

LEGACY = Path(__file__).parent / "data" / "legacy_study.journal"
#: What the generator asked for (``make_legacy_study.py``); the study must resume with exactly this.
LEGACY_CONFIG = dict(
    model="model", data="data", study="legacy", trials=3, population=2, seeded=False,
    space="layerwise", method="wanda", sparsity_range=(0.4, 0.6), eval_windows=2, min_windows=1,
    seq_len=32, calib_samples=4, objective="ppl", max_ppl=1e6, **TRIALS_ONLY,
)


@pytest.fixture(scope="module")
def legacy_folder(tmp_path_factory, tokenizer) -> Path:
    """The model and data the legacy study names (``model``, ``data``: relative to the folder the
    test runs in), rebuilt with the generator's seeds; read-only for the tests."""
    folder = tmp_path_factory.mktemp("legacy")
    save_tiny_model(tiny_llama_config(len(tokenizer)), tokenizer, folder / "model")
    (folder / "data").mkdir()
    (folder / "data" / "wiki.valid.tokens").write_text(synthetic_text(1))
    (folder / "data" / "wiki.test.raw").write_text(synthetic_text(2))
    return folder


@pytest.fixture
def legacy(legacy_folder, tmp_path, monkeypatch) -> str:
    """A private copy of the legacy study, run from the folder holding its model and data."""
    copy = tmp_path / LEGACY.name
    shutil.copy(LEGACY, copy)
    monkeypatch.chdir(legacy_folder)
    return f"journal://{copy}"


def stored_raw(storage: str) -> dict:
    return optuna.load_study(study_name="legacy", storage=open_storage(storage)).user_attrs[SETTINGS_ATTR]


def test_settings_round_trip_through_a_study_in_the_stored_form():
    config = SearchConfig(model="m", data="d", method="sparsegpt", objective="kl", sparsity_range=(0.3, 0.7),
                          seq_len=64, eval_windows=5, calib_samples=16, calib_seed=3)
    settings = config.settings()
    study = optuna.create_study(directions=["minimize", "minimize"])
    settings.write(study)
    assert study_settings(study) == settings
    raw = study.user_attrs[SETTINGS_ATTR]
    assert raw == {
        "model": "m", "calibration": {"source": "d", "n_samples": 16, "seq_len": 64, "seed": 3},
        "space": "layerwise", "method": "sparsegpt", "objective": "kl", "sparsity_range": [0.3, 0.7],
        "eval_seq_len": 64, "eval_windows": 5,
    }
    assert json.loads(json.dumps(raw)) == raw and StudySettings.model_validate(raw) == settings
    # the worker a study's settings make measures as the search's own workers did
    assert settings.worker_spec(cache_dir="c", min_windows=config.min_windows) == config.worker_spec().model_copy(
        update={"cache_dir": "c", "threads": None, "device": "cpu", "database": None}
    )
    assert settings.worker_spec().calibration == config.calibration()


def test_unreadable_or_missing_settings_are_one_line_errors():
    study = optuna.create_study(directions=["minimize", "minimize"], study_name="x")
    with pytest.raises(AutopruneError, match="was not created by autoprune search"):
        study_settings(study)
    good = SearchConfig().settings().stored()
    for bad, where in (({**good, "extra": 1}, "extra"), ({**good, "method": "nope"}, "method"),
                       ({**good, "calibration": {**good["calibration"], "n_samples": 0}}, "calibration.n_samples")):
        study.set_user_attr(SETTINGS_ATTR, bad)
        with pytest.raises(AutopruneError, match=rf"^study 'x' has unreadable autoprune settings: {where}:") as error:
            study_settings(study)
        assert "\n" not in str(error.value)


def test_a_legacy_study_reads_typed_and_unchanged(legacy):
    study = optuna.load_study(study_name="legacy", storage=open_storage(legacy))
    settings = study_settings(study)
    assert settings == SearchConfig(**LEGACY_CONFIG).settings()
    assert settings.calibration == CalibrationConfig(source="data", n_samples=4, seq_len=32, seed=0)
    assert settings.sparsity_range == (0.4, 0.6) and settings.method == "wanda"
    assert settings.stored() == study.user_attrs[SETTINGS_ATTR]  # what today writes, it wrote
    spec = settings.worker_spec(cache_dir="c")
    assert isinstance(spec, WorkerSpec) and (spec.eval_seq_len, spec.eval_windows) == (32, 2)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    recipe = trial_recipe(study, complete[0])
    assert (recipe.model, recipe.calibration, recipe.plan) == ("model", settings.calibration, trial_plan(complete[0]))


def test_a_legacy_study_resumes_and_refuses_other_settings(legacy):
    before = stored_raw(legacy)
    summary = run_search(SearchConfig(**{**LEGACY_CONFIG, "storage": legacy, "trials": 4}), progress=False)
    assert summary.resumed and summary.finished == 4
    assert stored_raw(legacy) == before
    with pytest.raises(AutopruneError, match=r"was created with eval_windows=2, this run has 3;"):
        run_search(SearchConfig(**{**LEGACY_CONFIG, "storage": legacy, "eval_windows": 3}), progress=False)
    with pytest.raises(AutopruneError, match=r"was created with sparsity_range=\[0.4, 0.6\], this run has \[0.4, 0.7\]"):
        run_search(SearchConfig(**{**LEGACY_CONFIG, "storage": legacy, "sparsity_range": (0.4, 0.7)}), progress=False)


def test_prepare_results_have_names(tiny_llama_dir, data_dir, tmp_path):
    calibration = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=32)
    first = prepare(str(tiny_llama_dir), calibration, tmp_path, progress=False)
    assert first.cached is False and first.stats is first[1] and first.loaded is first[0]
    again = prepare_with_windows(str(tiny_llama_dir), calibration, tmp_path, False)
    loaded, windows, stats, cached = again
    assert cached is True and again.windows is windows and tuple(windows.shape) == (4, 32)
    assert stats.folder == first.stats.folder  # the same cached statistics


def test_a_refined_trial_carries_the_parents_constraints_re_evaluated(legacy):
    """Recorded through Optuna's public ``constraints`` argument, read back by ``trial.constraints``
    like those the driver set: a refined plan whose perplexity passes ``max_ppl`` is infeasible and
    leaves the front (fails loudly if Optuna stores constraints apart from what it reads)."""
    study = optuna.load_study(study_name="legacy", storage=open_storage(legacy))
    parent = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.values[1])
    assert parent.constraints == {"max_ppl": pytest.approx(parent.user_attrs["ppl"] - 1e6)}
    config = RefineConfig(storage=legacy, study="legacy", trial=parent.number, generations=1)
    state = EvolutionState(generation=1, counts={}, accepted=1, history=[0.5, 0.4])
    plan: Plan = trial_plan(parent)
    for ppl, feasible in ((parent.user_attrs["ppl"] * 0.9, True), (2e6, False)):
        result = TrialResult(number=0, status="complete", quality=ppl, ppl=ppl, windows=2,
                             size={"linear_nonzeros": int(parent.values[0]) - 1})
        trial = record_refinement(study, parent, plan, result, config, state, 1.0, None)
        assert trial.constraints == {"max_ppl": pytest.approx(ppl - 1e6)}
        assert (trial in pareto_trials(study.get_trials())) is feasible
