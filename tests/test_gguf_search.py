"""Searches of GGUF types end to end on a tiny LLaMA whose rows are shaped like SmolLM2's: trials
priced in GGUF bytes (llama.cpp's presets and uniform types among the baselines, at their exact
bytes), the front's JSON rows, an exported trial's file (its size the recorded bytes, loaded by
transformers and llama.cpp at the study's perplexity), refinement at equal bytes, sub-networks
with types, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import llama_cpp
import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from autoprune.data import validation_windows
from autoprune.measure import perplexity
from autoprune.models import load_model
from autoprune.study import RefineConfig, find_trial, refine_trial, run_search
from conftest import run_cli, tiny_config

STUDY = "tiny"


@pytest.fixture(scope="module")
def gguf_study(gguf_llama_dir, data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-search")
    config = tiny_config(gguf_llama_dir, data_dir, folder, space="gguf", sparsity_range=None, trials=30,
                         database=True)
    run_search(config, progress=False)
    return config


def complete(config) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_trials_are_priced_in_gguf_bytes_from_the_known_mixes(gguf_study, capsys):
    trials = complete(gguf_study)
    labels = {t.user_attrs.get("baseline") for t in trials}
    assert {"uniform-f16", "uniform-q4_0", "uniform-q3_k", "llama.cpp-Q4_K_M", "llama.cpp-Q2_K"} <= labels
    for trial in trials:
        assert trial.values == [trial.user_attrs["size"]["gguf_bytes"], trial.user_attrs["ppl"]]
    by_label = {t.user_attrs.get("baseline"): t for t in trials}
    assert by_label["uniform-q4_0"].values[0] < by_label["llama.cpp-Q4_K_M"].values[0] < by_label["uniform-f16"].values[0]
    code, out, _ = run_cli(capsys, "front", "--storage", gguf_study.storage, "--study", STUDY, "--format", "json")
    rows = json.loads(out)
    assert code == 0 and rows
    assert all({"trial", "gguf_bytes", "ppl"} <= row.keys() and row["gguf_bytes"] for row in rows)


def exported(config, trial: int, out: Path, capsys) -> dict:
    code, stdout, err = run_cli(capsys, "export", "--storage", config.storage, "--study", STUDY, "--trial", trial,
                                "--out", out, "--cache-dir", config.cache_dir, "--format", "gguf")
    assert code == 0, err
    return {line.split()[0]: line for line in stdout.splitlines()}


def test_an_exported_trial_is_the_file_the_study_measured(gguf_study, tmp_path, capsys):
    trial = min((t for t in complete(gguf_study) if t.params["imatrix"]), key=lambda t: t.values[0])
    out = tmp_path / "export"
    exported(gguf_study, trial.number, out, capsys)
    path = out / "model.gguf"
    assert path.stat().st_size == trial.user_attrs["size"]["gguf_bytes"]
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    windows = validation_windows(gguf_study.data, load_model(gguf_study.model).tokenizer, gguf_study.seq_len,
                                 gguf_study.eval_windows)  # the study's own windows
    assert perplexity(model, windows) == pytest.approx(trial.user_attrs["ppl"], rel=1e-4)
    llm = llama_cpp.Llama(str(path), n_ctx=gguf_study.seq_len, logits_all=True, verbose=False, n_threads=1)
    total = 0.0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
    llama_ppl = math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
    assert llama_ppl == pytest.approx(trial.user_attrs["ppl"], rel=0.01)


def test_refinement_moves_bits_between_tensors_at_no_more_bytes(gguf_study):
    parent = next(t for t in complete(gguf_study) if t.user_attrs.get("baseline") == "llama.cpp-Q4_K_M")
    config = RefineConfig(storage=gguf_study.storage, study=STUDY, trial=parent.number, generations=3,
                          offspring=3, pool_windows=6, screen_tokens=16, cache_dir=gguf_study.cache_dir,
                          database=True)
    summary = refine_trial(config)
    study = optuna.load_study(study_name=STUDY, storage=gguf_study.storage)
    refined = find_trial(study, summary.trial)
    assert refined.user_attrs["refined_from"] == parent.number
    budget = parent.user_attrs["size"]["gguf_bytes"]
    assert 0.99 * budget <= refined.values[0] <= budget
    types = refined.user_attrs["plan"]["quantization"]
    assert types["imatrix"] is False and types != parent.user_attrs["plan"]["quantization"]


def test_a_quantized_trial_refuses_another_type_and_settings_it_has_no_use_for(gguf_study, tmp_path, capsys):
    trial = complete(gguf_study)[0].number
    out = tmp_path / "export"
    code, _, err = run_cli(capsys, "export", "--storage", gguf_study.storage, "--study", STUDY, "--trial", trial,
                           "--out", out, "--format", "gguf", "--gguf-type", "q8_0")
    assert code == 2 and "leave out --gguf-type" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "refine", "--storage", gguf_study.storage, "--study", STUDY, "--trial", trial,
                           "--method", "admm")
    assert code == 2 and "refined on its GGUF types" in err
    assert not out.exists()


def bad_recipe(folder: Path, model: Path, data: Path, **quantization) -> Path:
    recipe = {"model": str(model), "calibration": {"source": str(data), "n_samples": 4, "seq_len": 32},
              "plan": {"schema_version": 3, "quantization": quantization}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"default": "q4_2"}, "GGUF type 'q4_2' is not one llama.cpp both writes and runs"),
        ({"layers": {"model.layers.0.mlp.up_proj": "tq1_0"}}, "GGUF type 'tq1_0' is not one llama.cpp"),
        ({"embeddings": "q4_k"}, "stores the token embeddings as q4_k, whose blocks of 256 weights do not divide its rows of 320"),
        ({"layers": {"model.layers.0.self_attn.q_proj": "q2_k"}}, "model.layers.0.self_attn.q_proj as q2_k"),
    ],
)
def test_a_type_llama_cpp_cannot_run_or_the_file_cannot_hold_is_one_line(
    gguf_llama_dir, data_dir, tmp_path, capsys, quantization, message
):
    recipe = bad_recipe(tmp_path, gguf_llama_dir, data_dir, **quantization)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", "--recipe", recipe, "--out", out, "--cache-dir", tmp_path / "cache")
    lines = [line for line in err.strip().splitlines() if line.startswith("autoprune:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # refused before calibrating


def test_subnet_gguf_trials_are_cut_then_typed(gguf_llama_dir, data_dir, tmp_path):
    config = tiny_config(gguf_llama_dir, data_dir, tmp_path, space="subnet-gguf", sparsity_range=None,
                         trials=16, database=True)
    run_search(config, progress=False)
    trials = complete(config)
    labels = {t.user_attrs.get("baseline") for t in trials}
    assert {"uniform-f16@0.0", "llama.cpp-Q4_K_M@0.0"} <= labels
    cut = [t for t in trials if t.user_attrs["plan"]["structure"] and t.user_attrs["size"]["sparsity"] > 0.05]
    assert cut
    for trial in cut:
        plan = trial.user_attrs["plan"]
        widths = {int(b): w.get("ffn") for b, w in plan["structure"]["blocks"].items()}
        for name, kind in plan["quantization"]["layers"].items():
            block = int(name.split(".")[2])
            if name.endswith("down_proj") and widths.get(block) and widths[block] % 256:
                assert kind not in ("q6_k", "q5_k", "q4_k", "q3_k", "q2_k")  # llama.cpp's fallback
