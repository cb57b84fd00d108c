"""Sequential pruning (``prune --sequential``): block after block from the pruned model's own
statistics. Block 0 sees the same inputs either way; every later layer reconstructs its dense
output, on the inputs the pruned model really gives it, better than the one-shot weights pruned
from dense statistics; and a sequential recipe reproduces its checkpoint."""

from __future__ import annotations

import pytest
import torch
import yaml

from autoprune import CalibrationConfig, PlanRequest, Pruner, prepare, prune
from autoprune.cli import main
from autoprune.data import calibration_windows
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.pruner import prune_sequentially


def _setup(model_dir, data_dir, tmp_path):
    config = CalibrationConfig(source=str(data_dir), n_samples=16, seq_len=64)
    loaded, stats, _ = prepare(str(model_dir), config, tmp_path, progress=False)
    windows = calibration_windows(config.source, loaded.tokenizer, 16, 64, 0)
    return loaded, stats, windows


def _layer_inputs(model: torch.nn.Module, names: list[str], windows: torch.Tensor) -> dict:
    """Every token's input to each named linear layer, flattened to ``[tokens, in_features]``."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_sequential_keeps_the_plan_and_fits_the_inputs_it_will_see(tiny_llama_dir, data_dir, tmp_path, method):
    loaded, stats, windows = _setup(tiny_llama_dir, data_dir, tmp_path)
    plan = PlanRequest(method, 0.7).build(loaded, stats)
    pruner = Pruner(loaded, stats)
    one_shot_weights = pruner.pruned_weights(plan)
    dense_weights = {name: loaded.model.get_submodule(name).weight.data for name in one_shot_weights}

    sequential = prune_sequentially(load_model(str(tiny_llama_dir)), windows, plan, progress=False)
    weights = {name: sequential.get_submodule(name).weight.data for name in one_shot_weights}
    for name, weight in weights.items():
        zeros_per_row = (weight == 0).sum(dim=1)
        assert torch.all((zeros_per_row - round(0.7 * weight.shape[1])).abs() <= 1), name
    first_block = [name for name in weights if ".layers.0." in name]
    later = [name for name in weights if ".layers.0." not in name]
    for name in first_block:  # same inputs, same statistics, same method: the same weights
        torch.testing.assert_close(weights[name], one_shot_weights[name], rtol=1e-4, atol=1e-6)
    inputs = _layer_inputs(sequential, later, windows)
    errors = {"sequential": 0.0, "one-shot": 0.0}
    for name in later:
        x, dense = inputs[name], dense_weights[name]
        errors["sequential"] += float(((x @ (dense - weights[name]).T) ** 2).sum())
        errors["one-shot"] += float(((x @ (dense - one_shot_weights[name]).T) ** 2).sum())
    assert errors["sequential"] < 0.95 * errors["one-shot"]  # measured: 0.91


def test_sequential_skips_and_removes_the_plans_blocks(tiny_llama_dir, data_dir, tmp_path):
    loaded, stats, windows = _setup(tiny_llama_dir, data_dir, tmp_path)
    plan = Plan.model_validate(
        {**PlanRequest("wanda", 0.5).build(loaded, stats).model_dump(), "removed_blocks": [2]}
    )
    model = prune_sequentially(loaded, windows, plan, progress=False)
    assert model.config.num_hidden_layers == 3
    assert len(loaded.adapter.blocks(model)) == 3


def test_sequential_recipe_reproduces_its_checkpoint(tiny_llama_dir, data_dir, tmp_path):
    config = CalibrationConfig(source=str(data_dir), n_samples=16, seq_len=64)
    report = prune(str(tiny_llama_dir), config, PlanRequest("sparsegpt", 0.6), tmp_path / "first",
                   progress=False, sequential=True)
    assert report.recipe.sequential and report.as_dict()["sequential"]
    recipe = tmp_path / "recipe.yaml"
    report.recipe.save(recipe)
    assert yaml.safe_load(recipe.read_text())["sequential"] is True
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "again"),
                 "--data", str(data_dir), "--format", "json"]) == 0
    first = load_model(str(tmp_path / "first")).model
    again = load_model(str(tmp_path / "again")).model
    for (name, a), (_, b) in zip(first.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
