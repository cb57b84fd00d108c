from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from autoprune import CalibrationConfig, LayerSpec, NMPattern, Plan, Pruner, Recipe, prepare
from autoprune.allocation import owl_plan, uniform_plan
from autoprune.errors import AutopruneError
from autoprune.measure import count_nonzeros, expected_linear_nonzeros, is_two_of_four, measure_size


@pytest.fixture(scope="module")
def llama_pruner(tiny_llama_dir, data_dir, tmp_path_factory):
    config = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=16)
    loaded, stats, _ = prepare(str(tiny_llama_dir), config, tmp_path_factory.mktemp("c"), False)
    return Pruner(loaded, stats)


def test_recipe_round_trips_exactly_through_yaml(tmp_path):
    plan = Plan(
        method="sparsegpt",
        layers={"model.layers.0.mlp.up_proj": LayerSpec(sparsity=0.625), "x": LayerSpec(nm=NMPattern(n=2, m=4))},
        removed_blocks=[3, 1],
    )
    recipe = Recipe(model="m", calibration=CalibrationConfig(source="d"), plan=plan)
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.removed_blocks == [1, 3]


def test_plans_reject_unknown_keys_newer_schemas_and_bad_values():
    with pytest.raises(ValidationError):
        Plan.model_validate({"layers": {}, "heads": {}})
    with pytest.raises(ValidationError, match="newer"):
        Plan.model_validate({"schema_version": 99})
    with pytest.raises(ValidationError):
        LayerSpec(sparsity=1.0)
    with pytest.raises(AutopruneError, match="1 <= N < M"):
        NMPattern.parse("4:4")


@pytest.mark.parametrize(
    "plan_kind", ["uniform", "nm", "removed", "mixed"]
)
def test_size_from_plan_matches_the_pruned_tensors(llama_pruner, plan_kind):
    loaded = llama_pruner.loaded
    names = llama_pruner.layer_names
    if plan_kind == "uniform":
        plan = uniform_plan(loaded, "wanda", 0.37)
    elif plan_kind == "nm":
        plan = uniform_plan(loaded, "sparsegpt", nm=NMPattern(n=2, m=4))
    elif plan_kind == "removed":
        plan = Plan(method="magnitude", layers={n: LayerSpec(sparsity=0.5) for n in names}, removed_blocks=[1, 2])
    else:
        plan = Plan(
            method="sparsegpt",
            layers={n: LayerSpec(sparsity=0.1 * (i % 9)) for i, n in enumerate(names)},
            removed_blocks=[0],
        )
    block_of = {n: loaded.adapter.split_layer_name(n)[0] for n in names}
    expected = expected_linear_nonzeros(plan, llama_pruner.layer_shapes(), block_of)
    dense_total = sum(r * c for r, c in llama_pruner.layer_shapes().values())
    with llama_pruner.applied(plan) as model:
        size = measure_size(model, loaded.adapter, dense_total)
        assert len(loaded.adapter.blocks(model)) == 4 - len(plan.removed_blocks)
    assert size.linear_nonzeros == expected
    assert size.sparsity == pytest.approx(1 - expected / dense_total)
    assert len(loaded.adapter.blocks(loaded.model)) == 4  # blocks come back after the trial


def test_tied_embeddings_are_counted_once(llama_pruner):
    model = llama_pruner.loaded.model
    size = measure_size(model, llama_pruner.loaded.adapter)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert size.total_params == sum(unique.values())
    assert size.bytes_dense_fp16 == 2 * size.total_params


def test_sparse_bytes_use_the_24_layout_where_it_applies(llama_pruner):
    loaded = llama_pruner.loaded
    with llama_pruner.applied(uniform_plan(loaded, "wanda", nm=NMPattern(n=2, m=4))) as model:
        size = measure_size(model, loaded.adapter)
    linear = size.linear_params
    other = size.total_params - linear
    assert size.bytes_sparse == 2 * other + linear + linear // 8


def test_owl_keeps_the_target_on_average_and_varies_by_block(llama_pruner):
    loaded, stats = llama_pruner.loaded, llama_pruner.stats
    plan = owl_plan(loaded, stats, "wanda", 0.6, outlier_threshold=2.0, lam=0.1)
    per_block = {}
    for name, spec in plan.layers.items():
        per_block[loaded.adapter.split_layer_name(name)[0]] = spec.sparsity
    values = torch.tensor(list(per_block.values()))
    assert float(values.mean()) == pytest.approx(0.6, abs=1e-6)
    assert float(values.max() - values.min()) == pytest.approx(0.2, abs=1e-6)


def test_plan_for_another_model_is_refused(llama_pruner):
    with pytest.raises(AutopruneError, match="does not have"):
        llama_pruner.pruned_weights(Plan(layers={"decoder.layers.0.fc1": LayerSpec(sparsity=0.5)}))
    with pytest.raises(AutopruneError, match="removes block 7"):
        llama_pruner.pruned_weights(Plan(removed_blocks=[7]))


def test_two_of_four_is_judged_on_the_whole_tensor_not_only_its_first_groups():
    two_of_four = torch.tensor([1.0, 0.0, 2.0, 0.0]).repeat(64 * 64).reshape(64, 256)
    assert is_two_of_four(two_of_four, probe_groups=16)
    broken_late = two_of_four.clone()
    broken_late[-1, -3] = 3.0  # only the last group holds three non-zeros
    assert not is_two_of_four(broken_late, probe_groups=16)
    assert not is_two_of_four(broken_late[:, :-1])  # rows that do not split into groups of 4


def test_count_nonzeros_agrees_with_torch():
    tensor = torch.tensor([0.0, -0.0, 1.0, float("nan"), -2.0, 0.0])
    assert count_nonzeros(tensor) == int(torch.count_nonzero(tensor)) == 3
