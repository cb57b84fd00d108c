"""`autoprune prune` / `autoprune eval` on tiny models: checkpoints that plain transformers loads,
exact per-row sparsity, valid N:M groups, reported perplexity reproduced, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import prune_args, run_cli
from transformers import AutoModelForCausalLM

from autoprune.data import evaluation_windows
from autoprune.measure import perplexity
from autoprune.methods import PruningMethod
from autoprune.models import ArchitectureAdapter


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("method", PruningMethod.available())
def test_pruned_checkpoint_reloads_with_plain_transformers(
    request, capsys, data_dir, tmp_path, fixture, method
):
    model_dir = request.getfixturevalue(fixture)
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, *prune_args(model_dir, data_dir, out, "--method", method, "--sparsity", "0.6"))
    assert code == 0
    report = json.loads(stdout)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    adapter = ArchitectureAdapter.for_model(reloaded)
    for name in adapter.all_layer_names(reloaded):
        weight = reloaded.get_submodule(name).weight
        zeros = (weight == 0).sum(dim=1)
        assert torch.all((zeros - round(0.6 * weight.shape[1])).abs() <= 1), name
    from transformers import AutoTokenizer

    windows = evaluation_windows(str(data_dir), AutoTokenizer.from_pretrained(out), 32, 4)
    assert perplexity(reloaded, windows) == pytest.approx(report["ppl"], rel=0.005)
    assert report["sparsity"] == pytest.approx(0.6, abs=0.01)
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(out), "--data", str(data_dir),
                              "--seq-len", "32", "--eval-windows", "4", "--format", "json")
    evaluated = json.loads(stdout)[0]
    assert evaluated["ppl"] == pytest.approx(report["ppl"], rel=0.005)
    assert evaluated["linear_nonzeros"] == report["linear_nonzeros"]


def test_nm_checkpoint_has_at_most_n_per_group(capsys, tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "nm"
    code, _, _ = run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, out, "--method", "sparsegpt", "--nm", "2:4"))
    assert code == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name in ArchitectureAdapter.for_model(reloaded).all_layer_names(reloaded):
        groups = (reloaded.get_submodule(name).weight != 0).reshape(-1, 4).sum(dim=1)
        assert int(groups.max()) <= 2


def test_same_logits_after_reload(capsys, tiny_llama_dir, data_dir, tmp_path):
    from autoprune import CalibrationConfig, PlanRequest, Pruner, prepare

    out = tmp_path / "w"
    assert run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, out, "--sparsity", "0.5"))[0] == 0
    loaded, stats, cached = prepare(str(tiny_llama_dir), CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32), progress=False)
    assert cached  # the CLI's calibration is reused
    pruner = Pruner(loaded, stats)
    ids = torch.arange(20).unsqueeze(0)
    with pruner.applied(PlanRequest("wanda", 0.5).build(loaded, stats)) as model, torch.no_grad():
        expected = model(ids).logits
    with torch.no_grad():
        actual = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(actual, expected)


def test_owl_prune_keeps_the_average_sparsity(capsys, tiny_llama_dir, data_dir, tmp_path):
    code, stdout, _ = run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, tmp_path / "o", "--owl", "--sparsity", "0.5"))
    assert code == 0
    assert json.loads(stdout)["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "no-such-model", "--sparsity", "0.5"], "unknown model 'no-such-model'"),
        (["--model", "org/definitely-not-cached", "--sparsity", "0.5"], "cannot load model"),
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--sparsity", "half"], "sparsity must be a number"),
        (["--nm", "4:2"], "invalid N:M pattern '4:2'"),
        (["--nm", "2:4", "--owl"], "OWL"),
        (["--sparsity", "0.5", "--data", "/no/such/data"], "data path not found: /no/such/data"),
        (["--sparsity", "0.5", "--recipe", "/no/recipe.yaml"], "recipe file not found"),
        (["--sparsity", "0.5", "--device", "gpu"], "unknown device 'gpu'"),
        (["--sparsity", "0.5", "--device", "cuda:64"], "device 'cuda:64' is not on this machine"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_llama_dir, data_dir, tmp_path, flags, message):
    args = ["prune", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--out", str(tmp_path / "o")]
    code, stdout, stderr = run_cli(capsys, *args, *flags)
    assert code == 2
    assert stderr.count("\n") == 1 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_never_overwritten(capsys, tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, stderr = run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, out, "--sparsity", "0.5"))
    assert code == 2 and "already exists and is not empty" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_eval_refuses_a_device_it_lacks_before_loading(capsys, tiny_llama_dir, data_dir):
    code, _, stderr = run_cli(capsys, "eval", "--model", str(tiny_llama_dir), "--data", str(data_dir),
                              "--device", "cuda:64")
    assert code == 2 and stderr.count("\n") == 1 and "device 'cuda:64' is not on this machine" in stderr


def test_broken_recipe_yaml_is_one_line(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: [unclosed\n")
    code, _, stderr = run_cli(capsys, "prune", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and "not valid YAML" in stderr and stderr.count("\n") == 1


@pytest.mark.slow
def test_the_installed_command_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "autoprune", "prune", "--model", "nope", "--sparsity", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["autoprune: error: sparsity must be in [0, 1), got 2"]
