"""``export_trial`` from Python: the checkpoint and recipe ``autoprune export`` writes, the study's
record compared, notes instead of prints, and refusals that leave the output folder alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
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


def test_notes_say_what_differs_from_the_studys_record(searched, tmp_path):
    """A trial refined for --sequential exported one-shot gets a note, exported --sequential it has
    no recorded perplexity (never measured); a record of another size gets a warning."""
    storage = own_copy(searched, tmp_path)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    source = complete_trials(storage)[0]
    size = source.user_attrs["size"]
    for attrs in ({"refine": {"sequential_every": 2}}, {"size": {**size, "linear_nonzeros": size["linear_nonzeros"] + 1}}):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, params=source.params, distributions=source.distributions,
            values=source.values, user_attrs={**source.user_attrs, **attrs},
        ))
    refined, resized = complete_trials(storage)[-2:]
    one_shot = export_trial(storage, STUDY, refined.number, tmp_path / "a", progress=False)
    assert one_shot.notes == [f"note: trial {refined.number} was refined for --sequential; exporting it "
                              "one-shot, as the study measured it"]
    sequential = export_trial(storage, STUDY, refined.number, tmp_path / "b", sequential=True, progress=False)
    assert sequential.notes == [] and sequential.recorded_ppl is None
    assert Recipe.load(sequential.recipe).sequential
    warned = export_trial(storage, STUDY, resized.number, tmp_path / "c", progress=False)
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
