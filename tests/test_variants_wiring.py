"""Trials, ``refine``, ``export`` and ``prune --recipe`` assemble plans from the variant database
when told to, and measure exactly what pruning the plan directly gives."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from conftest import prune_args, run_cli, tiny_config
from optuna.trial import TrialState
from safetensors.torch import load_file

from autoprune.study import (
    TrialRequest,
    TrialWorker,
    export_trial,
    load_existing_study,
    refine_trial,
    run_search,
    study_settings,
    trial_plan,
)
from autoprune.variants import DatabaseSettings, level_key


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "variants").rglob("*.safetensors"))


def _complete(study: optuna.Study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _direct_worker(study: optuna.Study, cache: str) -> TrialWorker:
    """A worker measuring the study's plans as its trials were, without a database."""
    return TrialWorker(study_settings(study).worker_spec(cache_dir=cache))


def _direct_ppl(worker: TrialWorker, trial) -> float:
    return worker.run(TrialRequest(trial.number, trial_plan(trial))).ppl


def test_a_search_with_the_database_reads_its_layers_and_measures_as_direct_pruning(
    tiny_llama_dir, data_dir, tmp_path
):
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, method="admm", trials=5, database=True)
    run_search(config, progress=False)
    study = load_existing_study(config.storage, config.study)
    trials = _complete(study)
    assert trials and _entries(tmp_path / "cache")
    worker = _direct_worker(study, config.cache_dir)
    shapes = worker.pruner.layer_shapes()
    for trial in trials:
        plan = trial_plan(trial)
        off_grid = [n for n, s in plan.layers.items()
                    if not s.is_dense and level_key(s, shapes[n][1], config.database_grid) is None]
        assert len(off_grid) <= 1  # the budget's remainder, pruned directly
    assert all(_direct_ppl(worker, trial) == trial.user_attrs["ppl"] for trial in trials[:2])


def test_refine_with_the_database_adds_a_trial_measured_as_direct_pruning(studied):
    config = studied.refine_config(generations=2, database=True, method="admm")
    summary = refine_trial(config, progress=False)
    assert _entries(studied.folder / "cache")
    study = load_existing_study(config.storage, config.study)
    refined = next(t for t in study.get_trials(deepcopy=False) if t.number == summary.trial)
    assert _direct_ppl(_direct_worker(study, config.cache_dir), refined) == refined.user_attrs["ppl"]


def test_export_and_prune_recipe_with_the_database_write_the_same_weights(
    studied, data_dir, tmp_path, capsys
):
    config = studied.config
    study = load_existing_study(config.storage, config.study)
    trial = _complete(study)[0].number
    cache = Path(config.cache_dir)
    plain = export_trial(config.storage, config.study, trial, tmp_path / "plain", cache_dir=cache, progress=False)
    settings = DatabaseSettings(folder=str(tmp_path / "db"), grid=64)
    assembled = export_trial(config.storage, config.study, trial, tmp_path / "db-export", cache_dir=cache,
                             progress=False, database=settings)
    assert plain.report.size == assembled.report.size
    expected = load_file(tmp_path / "plain" / "model.safetensors")
    got = load_file(tmp_path / "db-export" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    stored = sorted((tmp_path / "db").rglob("*.safetensors"))
    assert stored  # the trial's on-grid layers (of 64 steps) were kept
    code, _, err = run_cli(capsys, "prune", "--recipe", tmp_path / "plain" / "recipe.yaml", "--out",
                           tmp_path / "again", "--cache-dir", cache, "--database", "--database-dir",
                           tmp_path / "db", "--database-grid", "64", "--data", data_dir, "--eval-windows", "2",
                           "--seq-len", "32")
    assert code == 0, err
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    assert sorted((tmp_path / "db").rglob("*.safetensors")) == stored  # read, nothing new


@pytest.mark.parametrize("flag", ["--database-grid", "--database-dir"])
def test_prune_database_flags_need_the_switch(tiny_llama_dir, data_dir, tmp_path, capsys, flag):
    args = prune_args(tiny_llama_dir, data_dir, tmp_path / "out", flag, "8")
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
