"""The contract every search space keeps, checked on every registered space and on two families:
casts give valid plans, the same parameters give the same plan, targets are met exactly (by the
shape arithmetic and by the real pruned weights), plans round-trip through JSON, and the baselines a
space offers (and the seeds) are points of its own distributions."""

from __future__ import annotations

from dataclasses import replace

import optuna
import pytest

from autoprune import CalibrationConfig, Plan, Pruner, prepare
from autoprune.errors import AutopruneError
from autoprune.gguf_presets import gguf_context
from autoprune.measure import measure_size
from search_spaces import TARGET, SearchSpace, SpaceContext

SPACES = SearchSpace.available()
TARGETS = (0.45, 0.6, 0.75)


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_opt_dir", "gguf_llama_dir"])
def model_ctx(request, data_dir, tmp_path_factory):
    """A model, and what spaces know of it: with the GGUF context where GGUF can hold the model
    (the first tiny LLaMA's word-level tokenizer cannot be written: no space of GGUF types there)."""
    config = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=16)
    model_dir = request.getfixturevalue(request.param)
    cache = tmp_path_factory.mktemp("cache")
    loaded, stats, _ = prepare(str(model_dir), config, cache, False)
    ctx = SpaceContext.from_model(loaded, stats, "wanda", (0.4, 0.8))
    try:
        ctx = replace(ctx, gguf=gguf_context(loaded, cache_dir=cache))
    except AutopruneError:
        pass
    return Pruner(loaded, stats), ctx


def sampled_params(space: SearchSpace, ctx: SpaceContext, count: int = 6) -> list[dict]:
    """Random points of the space, plus its baselines: the points a study asks first. A space that
    cannot cut this family says so in one line instead, and the test has nothing more to check."""
    if not space.applies_to(ctx):
        with pytest.raises(AutopruneError, match="needs"):
            space.distributions(ctx)
        pytest.skip(f"the {space.name} space does not apply to this family")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    distributions = space.distributions(ctx)
    params = [study.ask(distributions).params for _ in range(count)]
    return params + list(space.baselines(ctx, TARGETS).values()) + list(space.seeds(ctx, TARGETS).values())


def test_registry_finds_every_space_by_name():
    assert {"uniform", "owl", "depth_ramp", "layerwise", "nm", "depth", "depth_layerwise"} <= set(SPACES)
    for name in SPACES:
        assert SearchSpace.named(name).name == name
    with pytest.raises(AutopruneError, match="unknown search space"):
        SearchSpace.named("nope")


@pytest.mark.parametrize("name", SPACES)
def test_casts_are_valid_deterministic_and_round_trip(name, model_ctx):
    pruner, ctx = model_ctx
    space = SearchSpace.named(name)
    for params in sampled_params(space, ctx):
        plan = space.cast(params, ctx)
        pruner.validate(plan)
        assert plan.method == "wanda"
        assert set(plan.layers) <= set(pruner.layer_names)
        assert not set(plan.removed_blocks) & {ctx.layers[n].block for n in plan.layers}
        assert SearchSpace.named(name).cast(dict(params), ctx) == plan
        assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("name", SPACES)
def test_targets_are_met_and_sizes_are_true(name, model_ctx):
    pruner, ctx = model_ctx
    space = SearchSpace.named(name)
    for index, params in enumerate(sampled_params(space, ctx)):
        plan = space.cast(params, ctx)
        if space.has_target:
            landed = ctx.sparsity(plan) - params[TARGET]
            assert -SearchSpace.target_tolerance <= landed <= space.target_tolerance
        if index % 3 == 0:  # the real weights agree with the shape arithmetic
            with pruner.applied(plan) as model:
                size = measure_size(model, pruner.adapter, ctx.dense_linear_params)
            # a quantized weight may round to zero: GGUF stores it like any other, so count weights
            kept = size.linear_nonzeros if plan.quantization is None else size.linear_params
            assert kept == ctx.nonzeros(plan)


@pytest.mark.parametrize("name", SPACES)
def test_baselines_and_seeds_are_points_of_the_space(name, model_ctx):
    _, ctx = model_ctx
    space = SearchSpace.named(name)
    sampled_params(space, ctx, count=0)
    distributions = space.distributions(ctx)
    baselines = space.baselines(ctx, TARGETS)
    assert baselines
    for params in [*baselines.values(), *space.seeds(ctx, TARGETS).values()]:
        assert params.keys() == distributions.keys()
        for key, value in params.items():
            dist = distributions[key]
            assert dist._contains(dist.to_internal_repr(value)), (key, value)


def test_layerwise_candidates_of_one_target_share_their_size(model_ctx):
    _, ctx = model_ctx
    space = SearchSpace.named("layerwise")
    sizes = {ctx.nonzeros(space.cast({**p, TARGET: 0.6}, ctx)) for p in sampled_params(space, ctx)}
    assert (max(sizes) - min(sizes)) / ctx.dense_linear_params < 0.002


def test_layerwise_projection_offsets_move_sparsity_between_projections(model_ctx):
    _, ctx = model_ctx
    space = SearchSpace.named("layerwise")
    uniform = space.baselines(ctx, [0.6])["uniform@0.60"]
    first, *rest = ctx.projections
    shifted = {**uniform, f"offset_{first}": -0.2, **{f"offset_{name}": 0.1 for name in rest}}
    plan = space.cast(shifted, ctx)
    for block in range(ctx.num_blocks):
        sparsity = {info.projection: plan.layers[name].sparsity for name, info in ctx.layers.items()
                    if info.block == block}
        assert all(sparsity[first] < sparsity[name] for name in rest)
    assert abs(ctx.nonzeros(plan) - ctx.nonzeros(space.cast(uniform, ctx))) / ctx.dense_linear_params < 0.002
