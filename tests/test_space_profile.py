"""The ``profile`` space: its depth curve, its influence share and its grouped-query seeds."""

from __future__ import annotations

import pytest

from autoprune import CalibrationConfig, prepare
from search_spaces import TARGET, SearchSpace, SpaceContext
from search_spaces._profile import KNOTS, SPARE, block_offsets, knot_param


@pytest.fixture(scope="module")
def ctx(data_dir, tiny_llama_dir, tmp_path_factory):
    config = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=16)
    loaded, stats, _ = prepare(str(tiny_llama_dir), config, tmp_path_factory.mktemp("cache"), False)
    return SpaceContext.from_model(loaded, stats, "wanda", (0.4, 0.8))


def _block_sparsity(plan, ctx: SpaceContext, projection: str) -> list[float]:
    return [
        plan.layers[name].sparsity
        for name, info in sorted(ctx.layers.items(), key=lambda item: item[1].block)
        if info.projection == projection
    ]


def test_the_depth_curve_passes_through_its_knots_and_spares_influential_blocks(ctx):
    space = SearchSpace.named("profile")
    params = space.baselines(ctx, [0.6])["uniform@0.60"]
    rising = {**params, **{knot_param(k): 0.1 * k - 0.15 for k in range(KNOTS)}}
    offsets = block_offsets(rising, ctx)
    assert offsets[0] == pytest.approx(-0.15) and offsets[-1] == pytest.approx(0.15)
    assert offsets == sorted(offsets)
    spared = block_offsets({**params, SPARE: 0.1}, ctx)
    most = max(range(ctx.num_blocks), key=ctx.block_influence.__getitem__)
    assert spared[most] == pytest.approx(-0.1) and min(spared) == spared[most]
    plan = space.cast(rising, ctx)
    down = _block_sparsity(plan, ctx, "down_proj")
    assert down[0] < down[-1]


def test_grouped_query_seeds_keep_key_and_value_denser_at_the_same_size(ctx):
    space = SearchSpace.named("profile")
    assert ctx.dims is not None and ctx.dims.heads_per_group > 1  # the tiny LLaMA uses GQA
    seeds = space.seeds(ctx, [0.6])
    assert {"ramp0.2@0.60", "ramp0.2+kv@0.60", "ramp0.4@0.60", "ramp0.4+kv@0.60"} == set(seeds)
    plain, grouped = space.cast(seeds["ramp0.4@0.60"], ctx), space.cast(seeds["ramp0.4+kv@0.60"], ctx)
    for projection in ("k_proj", "v_proj"):
        assert sum(_block_sparsity(grouped, ctx, projection)) < sum(_block_sparsity(plain, ctx, projection))
    assert sum(_block_sparsity(grouped, ctx, "q_proj")) > sum(_block_sparsity(plain, ctx, "q_proj"))
    assert abs(ctx.nonzeros(grouped) - ctx.nonzeros(plain)) / ctx.dense_linear_params < 0.002
    assert seeds["ramp0.4+kv@0.60"][TARGET] == 0.6
