"""Sub-network searches end to end on the tiny LLaMA: the ``subnet`` space's trials are physically
cut models, measured on the configured objectives (decoder linear weights kept, predicted latency,
quality), shown by ``front`` and exported as checkpoints that reload with the recorded weights;
objective settings that make no sense are refused in one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from autoprune.errors import AutopruneError
from autoprune.models import LlamaFamilyAdapter
from autoprune.study import SearchConfig, export_trial, run_search
from conftest import run_cli, tiny_config

STUDY = "tiny"


@pytest.fixture(scope="module")
def subnet_study(tiny_llama_dir, data_dir, tmp_path_factory) -> SearchConfig:
    folder = tmp_path_factory.mktemp("subnet")
    config = tiny_config(tiny_llama_dir, data_dir, folder, space="subnet", sparsity_range=None, trials=8,
                         database=True)
    run_search(config, progress=False)
    return config


def decoder_linear_weights(model: torch.nn.Module) -> int:
    adapter = LlamaFamilyAdapter()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(adapter.blocks_path + "."):
            total += module.weight.numel()
    return total


def test_subnet_trials_are_cut_models_measured_on_params_latency_and_ppl(subnet_study):
    study = optuna.load_study(study_name=STUDY, storage=subnet_study.storage)
    assert len(study.directions) == 3  # params, latency, ppl: the subnet space's default
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete
    labels = {t.user_attrs.get("baseline", "").split("@")[0] for t in study.trials}
    assert {"uniform", "uniform-ffn", "flap", "blocks"} <= labels
    dense = subnet_study.settings()  # the sparsity range defaulted to the space's own
    assert dense.sparsity_range == (0.1, 0.4)
    for trial in complete:
        size = trial.user_attrs["size"]
        assert trial.values == [size["linear_params"], size["latency_ms"], trial.user_attrs["ppl"]]
        assert size["linear_params"] == size["linear_nonzeros"]  # no zeros inside a cut model
        assert size["linear_params"] == trial.user_attrs["expected_nonzeros"]
        assert trial.user_attrs["plan"]["structure"] is not None
    smaller = [t for t in complete if t.user_attrs["size"]["sparsity"] > 0.05]
    assert smaller and all(t.values[1] > 0 for t in smaller)
    # the trials' cuts were stored in the variant database (the search's default), for later processes
    assert list(Path(subnet_study.cache_dir, "variants").rglob("cuts/block_*/*.safetensors"))


def test_front_rows_carry_params_latency_and_ppl(subnet_study, capsys):
    code, out, _ = run_cli(capsys, "front", "--storage", subnet_study.storage, "--study", STUDY,
                           "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert rows
    for row in rows:
        assert {"trial", "params", "latency_ms", "decode_ms", "ppl"} <= row.keys()
        assert row["params"] > 0 and row["latency_ms"] > 0 and row["ppl"] > 0


def test_an_exported_subnet_trial_reloads_with_the_recorded_weights(subnet_study, tmp_path):
    study = optuna.load_study(study_name=STUDY, storage=subnet_study.storage)
    trial = max(study.get_trials(states=(TrialState.COMPLETE,)),
                key=lambda t: t.user_attrs["size"]["sparsity"])
    out = tmp_path / "export"
    result = export_trial(subnet_study.storage, STUDY, trial.number, out,
                          cache_dir=Path(subnet_study.cache_dir), progress=False)
    assert not result.notes
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert decoder_linear_weights(model) == trial.user_attrs["size"]["linear_params"]


def test_objectives_are_chosen_in_the_config(tiny_llama_dir, data_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, objectives=["kl", "bytes"], trials=2)
    assert config.objective == "kl" and config.costs == ("bytes",)
    run_search(config, progress=False)
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert trial.values == [trial.user_attrs["size"]["bytes_dense_fp16"], trial.user_attrs["kl"]]
    other = config.model_copy(update={"objectives": ["kl", "nonzeros"]})
    with pytest.raises(AutopruneError, match="costs"):
        run_search(other, progress=False)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ppl", "two or three"),
        ("ppl,speed", "unknown objective 'speed'"),
        ("ppl,kl", "exactly one quality"),
        ("params,latency", "exactly one quality"),
        ("ppl,params,params", "twice"),
        ("ppl,params,latency,bytes", "two or three"),
    ],
)
def test_bad_objectives_are_one_line_and_write_nothing(value, message, tiny_llama_dir, data_dir, tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text(f"objectives: [{value}]\n")
    storage = tmp_path / "never.db"
    code, _, err = run_cli(capsys, "search", "--config", config, "--model", tiny_llama_dir,
                           "--data", data_dir, "--storage", f"sqlite:///{storage}")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not storage.exists()


def test_objective_and_objectives_must_agree(tiny_llama_dir, data_dir, tmp_path):
    with pytest.raises(AutopruneError, match="objective"):
        SearchConfig.load(None, {"objective": "ppl", "objectives": ["kl", "params"]})


def test_the_subnet_space_refuses_a_family_it_cannot_cut(tiny_opt_dir, data_dir, tmp_path, capsys):
    storage = tmp_path / "s.db"
    code, _, err = run_cli(capsys, "search", "--model", tiny_opt_dir, "--data", data_dir, "--space", "subnet",
                           "--storage", f"sqlite:///{storage}", "--calib-samples", "4", "--seq-len", "32")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "LLaMA-family" in last and last.startswith("autoprune: error:")
    assert "Traceback" not in err
    assert not storage.exists() or not optuna.get_all_study_names(f"sqlite:///{storage}")
