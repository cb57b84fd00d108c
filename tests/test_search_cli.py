"""`autoprune search` / `front` / `export` on the tiny LLaMA: the front's formats and plot, an
exported trial that plain transformers reloads with the recorded quality and non-zeros, its recipe
rebuilding the same model, and bad input answered in one line with the study untouched."""

from __future__ import annotations

import hashlib
import json

import optuna
import pytest
import torch
import yaml
from conftest import TRIALS_ONLY, copy_study_folder, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.cli import main
from autoprune.data import validation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.models import ArchitectureAdapter

STUDY = "cli"


@pytest.fixture(scope="module")
def searched_source(tiny_llama_dir, data_dir, tmp_path_factory):
    """A finished study over layer-wise sparsity and block removal, made through the CLI. Its seed
    is one whose few sampled trials include a block removal (the export test needs one); the
    draws are deterministic, so that holds until the space or the sampler changes."""
    folder = tmp_path_factory.mktemp("cli")
    config = {
        "model": str(tiny_llama_dir), "data": str(data_dir), "storage": f"sqlite:///{folder / 's.db'}",
        "study": STUDY, "trials": 10, "seeded": False, "population": 4, "space": "depth_layerwise", "seed": 6,
        "method": "sparsegpt", "sparsity_range": [0.3, 0.7], "eval_windows": 3, "min_windows": 1,
        "seq_len": 32, "calib_samples": 8, "cache_dir": str(folder / "cache"), **TRIALS_ONLY,
    }
    (folder / "search.yaml").write_text(yaml.safe_dump(config))
    assert main(["search", "--config", str(folder / "search.yaml"), "--format", "json"]) == 0
    return folder, config


@pytest.fixture
def searched(searched_source, tmp_path):
    """This test's own copy of the study's folder (and the config pointing into it): the files a
    test writes there, no other test finds."""
    folder, config = searched_source
    copy = tmp_path / "cli"
    config = copy_study_folder(folder, copy, config)
    (copy / "search.yaml").write_text(yaml.safe_dump(config))
    return copy, config


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_front_lists_the_non_dominated_trials(capsys, searched, fmt):
    folder, config = searched
    code, out, _ = run_cli(capsys, "front", "--storage", config["storage"], "--study", STUDY, "--format", fmt)
    assert code == 0
    best = optuna.load_study(study_name=STUDY, storage=config["storage"]).best_trials
    if fmt == "json":
        rows = json.loads(out)
        assert {row["trial"] for row in rows} == {t.number for t in best}
        for row in rows:
            assert {"trial", "sparsity", "nonzeros", "ppl", "plan"} <= row.keys()
            assert {"mean_layer_sparsity", "removed_blocks"} <= row["plan"].keys()
            assert 0.3 - 0.005 <= row["sparsity"] <= 0.7 + 0.005
    else:
        assert len(out.strip().splitlines()) == len(best) + 1
        assert out.split()[0] == "trial" or out.startswith("trial,")


def test_front_plots_a_png(capsys, searched, tmp_path):
    _, config = searched
    plot = tmp_path / "front.png"
    code, _, _ = run_cli(capsys, "front", "--storage", config["storage"], "--study", STUDY, "--plot", plot)
    assert code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_reloads_with_plain_transformers_at_the_recorded_quality(capsys, searched, tmp_path):
    folder, config = searched
    study = optuna.load_study(study_name=STUDY, storage=config["storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with_depth = [t for t in complete if t.user_attrs["plan"]["removed_blocks"]]
    assert with_depth, "the study removed no block"
    for trial in (study.best_trials[0], with_depth[0]):
        out = tmp_path / f"trial-{trial.number}"
        code, stdout, _ = run_cli(
            capsys, "export", "--storage", config["storage"], "--study", STUDY, "--trial",
            trial.number, "--out", out, "--cache-dir", folder / "cache", "--format", "json",
        )
        assert code == 0
        assert json.loads(stdout)[0]["nonzeros"] == trial.values[0]
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        windows = validation_windows(config["data"], AutoTokenizer.from_pretrained(out), 32, 3)
        assert perplexity(reloaded, windows) == pytest.approx(trial.user_attrs["ppl"], rel=0.01)
        size = measure_size(reloaded, ArchitectureAdapter.for_model(reloaded))
        assert size.linear_nonzeros == trial.user_attrs["size"]["linear_nonzeros"]
        recipe_text = (out / "recipe.yaml").read_text()
        assert "sqlite" not in recipe_text and "storage" not in recipe_text

    rebuilt = tmp_path / "rebuilt"
    code, _, _ = run_cli(capsys, "prune", "--recipe", out / "recipe.yaml", "--out", rebuilt,
                         "--cache-dir", folder / "cache", "--data", config["data"],
                         "--seq-len", "32", "--eval-windows", "1")
    assert code == 0
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    again = AutoModelForCausalLM.from_pretrained(rebuilt).state_dict()
    assert exported.keys() == again.keys()
    assert all(torch.equal(exported[key], again[key]) for key in exported)


def bad_commands(folder, config) -> dict[str, list]:
    storage = config["storage"]
    (folder / "unknown.yaml").write_text(yaml.safe_dump({**config, "trails": 3}))
    (folder / "wrong.yaml").write_text(yaml.safe_dump({**config, "trials": "many"}))
    (folder / "broken.yaml").write_text("trials: [3\n")
    (folder / "changed.yaml").write_text(yaml.safe_dump({**config, "space": "owl", "trials": 20}))
    return {
        "unknown key": (["search", "--config", folder / "unknown.yaml"], "unknown key 'trails'"),
        "wrong type": (["search", "--config", folder / "wrong.yaml"], "invalid trials"),
        "broken yaml": (["search", "--config", folder / "broken.yaml"], "not valid YAML"),
        "changed space": (["search", "--config", folder / "changed.yaml"], "space='depth_layerwise'"),
        "missing study": (["front", "--storage", storage, "--study", "nope"], "study 'nope' not found"),
        "export missing study": (
            ["export", "--storage", storage, "--study", "nope", "--trial", 0, "--out", folder / "x"],
            "study 'nope' not found",
        ),
        "missing trial": (
            ["export", "--storage", storage, "--study", STUDY, "--trial", 999, "--out", folder / "x"],
            "trial 999 is not in study",
        ),
        "missing storage": (["front", "--storage", folder / "none.db", "--study", STUDY], "not found"),
        "unreachable storage": (
            ["front", "--storage", "postgresql://me:hunter2@127.0.0.1:1/db", "--study", STUDY],
            "cannot open storage postgresql://me:***@127.0.0.1:1/db",
        ),
        "bad plot": (["front", "--storage", storage, "--study", STUDY, "--plot", folder / "f.gif"], "--plot"),
        "unknown device": (
            ["search", "--config", folder / "search.yaml", "--device", "gpu"], "unknown device 'gpu'"
        ),
        "absent device": (
            ["search", "--config", folder / "search.yaml", "--device", "cuda:64"],
            "device 'cuda:64' is not on this machine",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown key", "wrong type", "broken yaml", "changed space", "missing study",
     "export missing study", "missing trial", "missing storage", "unreachable storage", "bad plot",
     "unknown device", "absent device"],
)
def test_bad_input_is_one_line_exit_2_and_leaves_the_study_alone(capsys, searched, case):
    folder, _ = searched
    before = digest(folder / "s.db")
    args, message = bad_commands(folder, searched[1])[case]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("autoprune: error:") and len(err.strip().splitlines()) == 1, err
    assert message in err and "hunter2" not in err and "Traceback" not in err
    assert digest(folder / "s.db") == before
    assert not (folder / "none.db").exists() and not (folder / "x").exists()


def test_every_setting_is_a_flag_and_the_shipped_config_is_valid():
    from pathlib import Path

    from autoprune.cli import build_parser
    from autoprune.study import SearchConfig

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    flags = {option for action in search._actions for option in action.option_strings}
    assert {"--" + name.replace("_", "-") for name in SearchConfig.model_fields} <= flags
    config = SearchConfig.load(Path(__file__).parents[1] / "configs" / "smollm2-default.yaml", {})
    assert (config.space, config.sampler, config.storage) == ("layerwise", "nsga2", "sqlite:///runs/smollm2.db")
