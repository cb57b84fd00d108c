"""What the ``subnet`` space's parameters mean on the tiny LLaMA: each baseline is the structure it
names, offsets move width between blocks at an equal weight budget, a sub-block pushed below its
narrowest width is dropped, and cut models built twice (the second time from the pruner's cache)
are the same model."""

from __future__ import annotations

import pytest
import torch

from autoprune import CalibrationConfig, Plan, Pruner, prepare
from autoprune.structure import BlockWidths, ModelDims, resolve_blocks
from search_spaces import TARGET, SearchSpace, SpaceContext
from search_spaces._subnet import N_REMOVED, Widths, attn_key, ffn_key


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, data_dir, tmp_path_factory):
    config = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=16)
    loaded, stats, _ = prepare(str(tiny_llama_dir), config, tmp_path_factory.mktemp("cache"), False)
    ctx = SpaceContext.from_model(loaded, stats, "wanda", (0.1, 0.4))
    return Pruner(loaded, stats), ctx, SearchSpace.named("subnet")


def shapes(plan: Plan, dims: ModelDims):
    return resolve_blocks(plan.structure, plan.removed_blocks, dims)


def test_baselines_are_the_structures_they_name(setup):
    _, ctx, space = setup
    dims = ctx.dims
    baselines = space.baselines(ctx, [0.25])
    ffn_only = shapes(space.cast(baselines["uniform-ffn@0.25"], ctx), dims)
    assert all(s.heads == dims.num_heads and s.ffn < dims.ffn for s in ffn_only)
    assert max(s.ffn for s in ffn_only) - min(s.ffn for s in ffn_only) <= Widths.of(dims).ffn[1]
    blocks = space.cast(baselines["blocks@0.25"], ctx)
    assert blocks.removed_blocks == ctx.least_influential_blocks(1)
    assert all(s.heads == dims.num_heads and s.ffn == dims.ffn for s in shapes(blocks, dims) if s)
    uniform = shapes(space.cast(baselines["uniform@0.25"], ctx), dims)
    assert len({s.heads for s in uniform}) <= 2 and all(s.heads < dims.num_heads or s.ffn < dims.ffn for s in uniform)
    flap = space.cast(baselines["flap@0.25"], ctx)
    assert flap != space.cast(baselines["uniform@0.25"], ctx)  # unit scores differ between blocks


def test_offsets_move_width_between_blocks_at_an_equal_budget(setup):
    _, ctx, space = setup
    zero = space.baselines(ctx, [0.25])["uniform@0.25"]
    favoured = {**zero, ffn_key(0): 0.4, ffn_key(3): -0.4}
    plan, base = space.cast(favoured, ctx), space.cast(zero, ctx)
    moved = shapes(plan, ctx.dims)
    assert moved[0].ffn > moved[3].ffn
    assert abs(ctx.nonzeros(plan) - ctx.nonzeros(base)) / ctx.dense_linear_params <= space.target_tolerance
    assert ctx.sparsity(plan) >= 0.25 - 1e-9  # never over the budget


def test_a_sub_block_below_its_narrowest_width_is_dropped(setup):
    _, ctx, space = setup
    params = {**space.baselines(ctx, [0.25])["uniform@0.25"], attn_key(2): -1.0}
    plan = space.cast(params, ctx)
    assert plan.structure.widths(2) == BlockWidths(drop_attention=True, ffn=plan.structure.widths(2).ffn)
    both = {**params, ffn_key(2): -1.0}
    assert 2 in space.cast(both, ctx).removed_blocks  # nothing left: the block is removed


def test_depth_never_exceeds_the_target(setup):
    _, ctx, space = setup
    params = {**space.baselines(ctx, [0.1])["uniform@0.1"], N_REMOVED: 1, TARGET: 0.1}
    assert space.cast(params, ctx).removed_blocks == []  # one of 4 blocks is 25% > 10%


def test_cached_cuts_give_the_same_model(setup):
    pruner, ctx, space = setup
    plan = space.cast(space.baselines(ctx, [0.25])["flap@0.25"], ctx)
    ids = torch.arange(20).unsqueeze(0)
    with pruner.applied(Plan()) as dense:
        before = dense(ids).logits
    with pruner.applied(plan) as first:
        once = first(ids).logits
    with pruner.applied(plan) as second:
        again = second(ids).logits
    assert torch.equal(once, again)
    with pruner.applied(Plan()) as dense:  # the dense weights were never touched
        assert torch.equal(dense(ids).logits, before)
    assert not torch.allclose(before, once)
