"""Healing a study's members: ``heal_targets`` as a search's last step, training-aware selection,
``front`` and ``export`` of healed members, ``autoprune heal --trial``."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from conftest import copy_search, run_cli, tiny_config
from safetensors.torch import load_file

from autoprune.study import (
    SearchConfig,
    StudyHealer,
    TrialRequest,
    TrialWorker,
    export_trial,
    recorded_heal,
    run_search,
    study_settings,
    trial_plan,
)
from autoprune.models import load_model

#: Heals small enough for the tiny model.
TINY_HEALS = dict(heal_tokens=6 * 2 * 16, heal_seq_len=16, heal_batch_size=2, heal_lr=3e-4,
                  heal_select=3, heal_select_tokens=2 * 2 * 16)


@pytest.fixture(scope="module")
def healed_study_source(tiny_llama_dir, data_dir, tmp_path_factory) -> tuple[Path, SearchConfig]:
    folder = tmp_path_factory.mktemp("healed")
    config = tiny_config(tiny_llama_dir, data_dir, folder, space="subnet", sparsity_range=None, trials=8,
                         objective="kl", heal_targets=[0.25], heal_max_latency=0.97, learn_targets=[0.25],
                         **TINY_HEALS)
    run_search(config, progress=False)
    return folder, config


@pytest.fixture
def healed_study(healed_study_source, tmp_path) -> SearchConfig:
    folder, config = healed_study_source
    return copy_search(folder, tmp_path / "study", config)


def _study(config: SearchConfig) -> optuna.Study:
    return optuna.load_study(study_name=config.study, storage=config.storage)


def test_the_search_heals_its_member_chosen_by_training(healed_study) -> None:
    study = _study(healed_study)
    selection = study.user_attrs["heal_selection:0.25"]
    assert len(selection["candidates"]) == 3 and [len(s["ranking"]) for s in selection["stages"]] == [3, 2]
    assert [s["tokens"] for s in selection["stages"]] == [64, 128]
    winner = selection["winner"]
    assert selection["stages"][-1]["ranking"][0]["trial"] == winner
    healed = recorded_heal(study, winner)
    assert healed["tokens"] == 192 and healed["selected"] and healed["target"] == 0.25
    trial = study.trials[winner]
    assert trial.user_attrs["size"]["sparsity"] >= 0.25
    dense_ms = StudyHealer(study, study_settings(study).worker_spec(cache_dir=healed_study.cache_dir)).dense_latency_ms()
    for number in selection["candidates"]:
        assert study.trials[number].user_attrs["size"]["latency_ms"] <= 0.97 * dense_ms
    watched = healed["measurements"]  # the heal's own held-out windows, before and after
    assert [m["tokens"] for m in watched][::len(watched) - 1] == [0, 192]
    artifacts = Path(str(healed_study.storage).removeprefix("sqlite:///") + ".artifacts")
    assert (artifacts / healed["artifact"]).is_file()


def test_front_shows_and_export_writes_the_healed_weights(healed_study, tmp_path, capsys) -> None:
    study = _study(healed_study)
    number = study.user_attrs["heal_selection:0.25"]["winner"]
    healed = recorded_heal(study, number)
    code, out, _ = run_cli(capsys, "front", "--storage", healed_study.storage, "--study", healed_study.study,
                           "--format", "json")
    rows = {row["trial"]: row for row in json.loads(out)}
    if number in rows:
        assert rows[number]["ppl_healed"] == pytest.approx(healed["ppl"])
    assert all(row["ppl_healed"] is None for n, row in rows.items() if n != number)
    result = export_trial(healed_study.storage, healed_study.study, number, tmp_path / "healed", progress=False)
    assert result.recorded_ppl == healed["ppl"] and "healed" in result.notes[0]
    settings = study_settings(study)
    worker = TrialWorker(settings.worker_spec(cache_dir=healed_study.cache_dir))
    reloaded = load_model(str(tmp_path / "healed")).model
    measured = worker.measure(TrialRequest(number, trial_plan(study.trials[number])), reloaded)
    assert measured.quality == pytest.approx(healed["quality"], rel=1e-6)  # the recorded one, reloaded
    export_trial(healed_study.storage, healed_study.study, number, tmp_path / "one-shot", healed=False,
                 progress=False)
    one_shot = load_file(tmp_path / "one-shot" / "model.safetensors")
    trained = load_file(tmp_path / "healed" / "model.safetensors")
    assert set(one_shot) == set(trained)
    assert any(not torch.equal(one_shot[name], trained[name]) for name in one_shot)


def test_running_the_search_again_heals_nothing_twice(healed_study) -> None:
    before = dict(_study(healed_study).user_attrs)
    summary = run_search(healed_study, progress=False)
    assert summary.healed and summary.healed[0].startswith("found trial")
    assert dict(_study(healed_study).user_attrs) == before


def test_heal_a_trial_from_the_command_line(healed_study, tmp_path, capsys) -> None:
    study = _study(healed_study)
    number = study.user_attrs["heal_selection:0.25"]["stages"][0]["ranking"][-1]["trial"]  # not healed yet
    assert recorded_heal(study, number) is None
    code, out, err = run_cli(
        capsys, "heal", "--storage", healed_study.storage, "--study", healed_study.study, "--trial", number,
        "--tokens", 64, "--seq-len", 16, "--batch-size", 2, "--lr", "3e-4", "--cache-dir", healed_study.cache_dir,
        "--out", tmp_path / "out", "--format", "json",
    )
    assert code == 0, err
    row = json.loads(out)
    assert recorded_heal(_study(healed_study), number)["ppl"] == row["ppl"]
    assert (tmp_path / "out" / "config.json").is_file()
    code, _, err = run_cli(capsys, "heal", "--storage", healed_study.storage, "--study", healed_study.study,
                           "--trial", 999, "--out", tmp_path / "missing")
    assert code == 2 and "trial 999 is not in study" in err and err.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_a_structure_learned_beside_the_healed_member_is_a_trial_export_writes(healed_study, tmp_path) -> None:
    study = _study(healed_study)
    record = study.user_attrs["learned:0.25"]
    trial = study.trials[record["trial"]]
    assert trial.user_attrs["plan"]["structure"]["method"] == "learned"
    assert record["tokens"] == recorded_heal(study, study.user_attrs["heal_selection:0.25"]["winner"])["tokens"]
    assert 0.74 <= 1 - trial.user_attrs["size"]["sparsity"] <= 0.76
    assert trial.values[-1] == pytest.approx(record["quality"])
    result = export_trial(healed_study.storage, healed_study.study, trial.number, tmp_path / "learned", progress=False)
    assert "learned" in result.notes[0] and (tmp_path / "learned" / "recipe.yaml").is_file()
    settings = study_settings(study)
    worker = TrialWorker(settings.worker_spec(cache_dir=healed_study.cache_dir))
    reloaded = load_model(str(tmp_path / "learned")).model
    measured = worker.measure(TrialRequest(trial.number, trial_plan(trial)), reloaded)
    assert measured.quality == pytest.approx(record["quality"], rel=1e-6)
