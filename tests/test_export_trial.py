"""``export_trial`` from Python: the checkpoint and recipe ``autoprune export`` writes, the study's
record compared, notes instead of prints, and refusals that leave the output folder alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import TRIALS_ONLY
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from autoprune.cli import main
from autoprune.errors import AutopruneError
from autoprune.measure import measure_size
from autoprune.models import ArchitectureAdapter
from autoprune.plan import Recipe
from autoprune.study import SearchConfig, export_trial, run_search, trial_recipe

STUDY = "export"


@pytest.fixture(scope="module")
def searched(tiny_llama_dir, data_dir, tmp_path_factory) -> SearchConfig:
    """A small finished study; tests that change it work on a copy (``own_copy``)."""
    folder = tmp_path_factory.mktemp("export")
    config = SearchConfig(
        model=str(tiny_llama_dir), data=str(data_dir), storage=f"sqlite:///{folder / 's.db'}",
        study=STUDY, trials=3, population=2, seeded=False, method="wanda", sparsity_range=(0.4, 0.6),
        eval_windows=2, min_windows=1, seq_len=32, calib_samples=4, cache_dir=str(folder / "cache"),
        **TRIALS_ONLY,
    )
    run_search(config, progress=False)
    return config


def own_copy(config: SearchConfig, tmp_path) -> str:
    copy = tmp_path / "copy.db"
    shutil.copy(config.storage.removeprefix("sqlite:///"), copy)
    return f"sqlite:///{copy}"


def complete_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(states=(TrialState.COMPLETE,))


def test_export_trial_writes_what_the_cli_prints(searched, tmp_path, capsys):
    trial = complete_trials(searched.storage)[-1]
    result = export_trial(searched.storage, STUDY, trial.number, tmp_path / "py", cache_dir=Path(searched.cache_dir),
                          progress=False)
    assert result.notes == [] and result.trial == trial.number
    assert result.report.size.linear_nonzeros == result.recorded_nonzeros == trial.user_attrs["size"]["linear_nonzeros"]
    assert result.recorded_ppl == trial.user_attrs["ppl"]
    study = optuna.load_study(study_name=STUDY, storage=searched.storage)
    assert Recipe.load(result.recipe) == trial_recipe(study, trial)
    reloaded = AutoModelForCausalLM.from_pretrained(result.out)
    assert measure_size(reloaded, ArchitectureAdapter.for_model(reloaded)).linear_nonzeros == result.recorded_nonzeros

    code = main(["export", "--storage", searched.storage, "--study", STUDY, "--trial", str(trial.number),
                 "--out", str(tmp_path / "cli"), "--cache-dir", searched.cache_dir, "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err.count("autoprune:") == 0
    assert json.loads(captured.out) == [{**result.row(), "out": str(tmp_path / "cli"),
                                         "recipe": str(tmp_path / "cli" / "recipe.yaml")}]


def test_the_default_variant_is_the_one_the_study_measured_best(searched, tmp_path):
    """Exported without --sequential or --one-shot, a trial whose sequential variant the study
    measured better is exported that way (a note says so, ``recorded_ppl`` is that measurement);
    one measured worse, or never, is exported one-shot without a note. --sequential on a trial the
    study never measured that way has no recorded perplexity; a record of another size gets a
    warning."""
    storage = own_copy(searched, tmp_path)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    source = complete_trials(storage)[0]
    size, quality, ppl = source.user_attrs["size"], source.user_attrs["quality"], source.user_attrs["ppl"]
    for attrs in (
        {"sequential": {"ppl": ppl * 0.9, "kl": None, "quality": quality * 0.9}},
        {"sequential": {"ppl": ppl * 1.1, "kl": None, "quality": quality * 1.1}},
        {"size": {**size, "linear_nonzeros": size["linear_nonzeros"] + 1}},
    ):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, params=source.params, distributions=source.distributions,
            values=source.values, user_attrs={**source.user_attrs, **attrs},
        ))
    better, worse, resized = complete_trials(storage)[-3:]
    chosen = export_trial(storage, STUDY, better.number, tmp_path / "a", progress=False)
    assert chosen.notes == [f"note: exporting trial {better.number} --sequential, the variant the study "
                            f"measured best (ppl {ppl * 0.9:.2f}, one-shot {ppl:.2f}); --one-shot for the other"]
    assert chosen.recorded_ppl == ppl * 0.9 and Recipe.load(chosen.recipe).sequential
    asked = export_trial(storage, STUDY, better.number, tmp_path / "b", sequential=False, progress=False)
    assert asked.notes == [] and asked.recorded_ppl == ppl and not Recipe.load(asked.recipe).sequential
    plain = export_trial(storage, STUDY, worse.number, tmp_path / "c", progress=False)
    assert plain.notes == [] and plain.recorded_ppl == ppl and not Recipe.load(plain.recipe).sequential
    unmeasured = export_trial(storage, STUDY, source.number, tmp_path / "d", sequential=True, progress=False)
    assert unmeasured.notes == [] and unmeasured.recorded_ppl is None
    assert Recipe.load(unmeasured.recipe).sequential
    warned = export_trial(storage, STUDY, resized.number, tmp_path / "e", progress=False)
    assert warned.notes == [f"warning: the checkpoint has {size['linear_nonzeros']} linear non-zeros, the "
                            f"study recorded {size['linear_nonzeros'] + 1} (different calibration data or model?)"]


def test_refusals_leave_the_output_folder_alone(searched, tmp_path):
    storage = own_copy(searched, tmp_path)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    waiting = study.ask().number
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    with pytest.raises(AutopruneError, match="already exists and is not empty"):
        export_trial("sqlite:///nowhere.db", STUDY, 0, busy)  # checked before the storage is opened
    assert [p.name for p in busy.iterdir()] == ["keep"]
    with pytest.raises(AutopruneError, match=f"^trial {waiting} is running; only complete trials can be exported$"):
        export_trial(storage, STUDY, waiting, tmp_path / "new")
    with pytest.raises(AutopruneError, match="trial 99 is not in study"):
        export_trial(storage, STUDY, 99, tmp_path / "new")
    assert not (tmp_path / "new").exists()
