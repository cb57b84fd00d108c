"""Sub-networks: per-block attention heads, FFN width, sub-block drops and depth, on a size budget.

whittle's shape: a flat parameter dict and a ``cast``. The parameters are a ``target`` (the
fraction of the dense decoder linear weights removed, as in the other spaces), ``n_removed`` (the
least influential blocks removed whole, ShortGPT's order) and, per block, an offset of its
attention's and its MLP's kept fraction (``attn_<b>``, ``ffn_<b>``, in [-1, 1]). Casting keeps, in
every kept block, ``base + offset`` of each sub-block (clipped to [0, 1]), rounded down to the
nearest width the block can take — a GQA-consistent head count (whole KV groups, the same query
heads in each) or a multiple of :data:`FFN_STEPS` of the FFN; zero drops the sub-block — with the
common ``base`` found by bisection so the kept weights fit the budget, then blocks raised one
width at a time (largest offset first) while they still fit. Every candidate of one target is thus
at the same size up to one width step of one block, and the search is about where width goes.

Baselines at each target: uniform width of both sub-blocks (Minitron's uniform setting), uniform
FFN width with every head kept, FLAP-style adaptive widths (unit scores standardized within each
block, one global threshold), and block removal (ShortGPT / SLEB: blocks alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from autoprune.structure import BlockWidths, ModelDims, Structure
from search_spaces._base import TARGET, Params, SearchSpace, SpaceContext

N_REMOVED = "n_removed"
#: FFN widths a block can take: multiples of the FFN divided into this many steps.
FFN_STEPS = 24
#: At most this share of the blocks is removed whole.
MAX_DEPTH_SHARE = 0.25
_BISECTION_STEPS = 60


def attn_key(block: int) -> str:
    return f"attn_{block}"


def ffn_key(block: int) -> str:
    return f"ffn_{block}"


@dataclass(frozen=True)
class Widths:
    """The widths one block can take: attention as (KV groups, heads per group), FFN channels,
    each with its decoder linear weights, cheapest first (the first of each keeps nothing)."""

    attention: tuple[tuple[int, int], ...]
    attention_params: np.ndarray
    ffn: tuple[int, ...]
    ffn_params: np.ndarray

    @classmethod
    def of(cls, dims: ModelDims) -> Widths:
        def attention_params(groups: int, per_group: int) -> int:
            return dims.hidden * dims.head_dim * 2 * (groups * per_group + groups)

        shapes = {(0, 0)} | {
            (g, p) for g in range(1, dims.num_kv_heads + 1) for p in range(1, dims.heads_per_group + 1)
        }
        # Of two shapes with equal weights keep the one with more KV groups (more distinct keys).
        by_params: dict[int, tuple[int, int]] = {}
        for shape in sorted(shapes):
            by_params[attention_params(*shape)] = shape
        attention = tuple(by_params[p] for p in sorted(by_params))
        step = max(1, dims.ffn // FFN_STEPS)
        ffn = tuple(sorted({*range(0, dims.ffn, step), dims.ffn}))
        return cls(
            attention=attention,
            attention_params=np.array([attention_params(*s) for s in attention], dtype=np.float64),
            ffn=ffn,
            ffn_params=np.array([3 * dims.hidden * w for w in ffn], dtype=np.float64),
        )


def subnet_widths(dims: ModelDims) -> tuple[list[tuple[int, int]], list[int]]:
    """The widths the space cuts a block to, full and empty ones left out: attention as (KV groups,
    query heads per group), FFN channels; what ``autoprune database build --cuts`` builds ahead."""
    widths = Widths.of(dims)
    full = (dims.num_kv_heads, dims.heads_per_group)
    return ([shape for shape in widths.attention if shape not in ((0, 0), full)],
            [width for width in widths.ffn if 0 < width < dims.ffn])


class SubnetSpace(SearchSpace):
    """Per-block heads and FFN widths, sub-block drops and removed blocks, under a weight budget."""

    name = "subnet"
    default_range = (0.1, 0.4)
    unstructured = False
    target_tolerance = 0.01

    def applies_to(self, ctx: SpaceContext) -> bool:
        return ctx.dims is not None

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        dims = _dims(ctx)
        offsets = {
            key(block): FloatDistribution(-1.0, 1.0)
            for block in range(dims.num_blocks)
            for key in (attn_key, ffn_key)
        }
        most = max(1, int(MAX_DEPTH_SHARE * dims.num_blocks))
        return {TARGET: ctx.target_distribution(), N_REMOVED: IntDistribution(0, most), **offsets}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        dims = _dims(ctx)
        count = min(params[N_REMOVED], int(params[TARGET] * dims.num_blocks))
        removed = ctx.least_influential_blocks(count)
        kept = [b for b in range(dims.num_blocks) if b not in removed]
        attn = np.array([params[attn_key(b)] for b in kept], dtype=np.float64)
        ffn = np.array([params[ffn_key(b)] for b in kept], dtype=np.float64)
        budget = (1.0 - params[TARGET]) * ctx.dense_linear_params
        widths = Widths.of(dims)
        attn_level, ffn_level = _allocate(attn, ffn, widths, budget)
        emptied = (attn_level == 0) & (ffn_level == 0)
        if emptied.all():  # a budget below one block's narrowest MLP: keep that, in the favoured block
            ffn_level[int(np.argmax(attn + ffn))] = 1
            emptied = (attn_level == 0) & (ffn_level == 0)
        removed = sorted([*removed, *(b for b, gone in zip(kept, emptied.tolist(), strict=True) if gone)])
        blocks = {}
        for block, a, f in zip(kept, attn_level.tolist(), ffn_level.tolist(), strict=True):
            if block in removed:
                continue
            groups, per_group = widths.attention[a]
            full_attention = (groups, per_group) == (dims.num_kv_heads, dims.heads_per_group)
            blocks[block] = BlockWidths(
                kv_groups=None if full_attention or not groups else groups,
                heads_per_group=None if full_attention or not groups else per_group,
                ffn=None if widths.ffn[f] in (0, dims.ffn) else widths.ffn[f],
                drop_attention=groups == 0,
                drop_mlp=widths.ffn[f] == 0,
            )
        dense = BlockWidths()
        structure = Structure(blocks={b: w for b, w in blocks.items() if w != dense})
        return Plan(method=ctx.method, removed_blocks=removed, structure=structure)

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        dims = _dims(ctx)
        baselines: dict[str, Params] = {}
        for target in targets:
            zero = {key(b): 0.0 for b in range(dims.num_blocks) for key in (attn_key, ffn_key)}
            baselines[f"uniform@{target}"] = {TARGET: target, N_REMOVED: 0, **zero}
            ffn_only = {**zero, **{attn_key(b): 1.0 for b in range(dims.num_blocks)}}
            baselines[f"uniform-ffn@{target}"] = {TARGET: target, N_REMOVED: 0, **ffn_only}
            baselines[f"flap@{target}"] = {TARGET: target, N_REMOVED: 0, **_flap_offsets(ctx, dims, target)}
            full = {key(b): 1.0 for b in range(dims.num_blocks) for key in (attn_key, ffn_key)}
            blocks = min(math.ceil(target * dims.num_blocks - 1e-9), self.distributions(ctx)[N_REMOVED].high)
            baselines[f"blocks@{target}"] = {TARGET: target, N_REMOVED: blocks, **full}
        return baselines

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """Widths following block influence (blocks that change their input least keep least), with
        and without a few blocks removed: a structured guess for the sampler to refine."""
        dims = _dims(ctx)
        influence = np.array(ctx.block_influence, dtype=np.float64)
        spread = (influence - influence.mean()) / (influence.std() or 1.0)
        offsets = np.clip(0.15 * spread, -1.0, 1.0)
        per_block = {key(b): float(offsets[b]) for b in range(dims.num_blocks) for key in (attn_key, ffn_key)}
        seeds: dict[str, Params] = {}
        for target in targets:
            seeds[f"influence@{target}"] = {TARGET: target, N_REMOVED: 0, **per_block}
            seeds[f"influence-depth@{target}"] = {
                TARGET: target, N_REMOVED: max(1, round(target * dims.num_blocks / 3)), **per_block
            }
        return seeds


def _dims(ctx: SpaceContext) -> ModelDims:
    if ctx.dims is None:
        raise AutopruneError("the subnet space needs a LLaMA-family model (heads and FFN widths to cut)")
    return ctx.dims


def _allocate(
    attn: np.ndarray, ffn: np.ndarray, widths: Widths, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """Width indices per kept block: ``base + offset`` of each sub-block's weights, rounded down to
    a width, the largest base that fits ``budget``, then single raises in order of offset."""
    attn_fraction = widths.attention_params / widths.attention_params[-1]
    ffn_fraction = widths.ffn_params / widths.ffn_params[-1]

    def levels(base: float) -> tuple[np.ndarray, np.ndarray]:
        a = np.searchsorted(attn_fraction, np.clip(base + attn, 0.0, 1.0) + 1e-12, side="right") - 1
        f = np.searchsorted(ffn_fraction, np.clip(base + ffn, 0.0, 1.0) + 1e-12, side="right") - 1
        return a, f

    def weights(a: np.ndarray, f: np.ndarray) -> float:
        return float(widths.attention_params[a].sum() + widths.ffn_params[f].sum())

    low, high = -1.0, 2.0  # everything dropped / everything kept
    if weights(*levels(high)) <= budget:
        return levels(high)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if weights(*levels(middle)) <= budget:
            low = middle
        else:
            high = middle
    a, f = levels(low)
    spare = budget - weights(a, f)
    # Raise blocks one width at a time, most favoured first, while the budget allows.
    order = sorted(
        [(-attn[i], 0, i) for i in range(len(a))] + [(-ffn[i], 1, i) for i in range(len(f))]
    )
    for _, kind, i in order:
        levels_of, params = (a, widths.attention_params) if kind == 0 else (f, widths.ffn_params)
        if levels_of[i] + 1 < len(params):
            cost = params[levels_of[i] + 1] - params[levels_of[i]]
            if cost <= spare:
                levels_of[i] += 1
                spare -= cost
    return a, f


def _standardized(scores: np.ndarray) -> np.ndarray:
    """Each block's (row's) scores minus their mean, over their standard deviation."""
    spread = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)


def _flap_offsets(ctx: SpaceContext, dims: ModelDims, target: float) -> dict[str, float]:
    """FLAP's adaptive structure: unit scores standardized within each block and kind (heads,
    FFN channels), as FLAP standardizes each layer's, one global threshold that meets the budget;
    returned as this space's offsets (each block's kept fraction minus the mean, so casting
    reproduces it). Standardized across blocks instead, early blocks' attention (small outputs,
    yet vital) went first and the model collapsed."""
    heads = _standardized(np.array([ctx.unit_scores[b][0] for b in range(dims.num_blocks)]))
    channels = _standardized(np.array([ctx.unit_scores[b][1] for b in range(dims.num_blocks)]))
    budget = (1.0 - target) * ctx.dense_linear_params
    widths = Widths.of(dims)
    head_params = widths.attention_params[-1] / dims.num_heads
    channel_params = widths.ffn_params[-1] / dims.ffn

    def kept(threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return (heads > threshold).sum(1), (channels > threshold).sum(1)

    low = float(min(heads.min(), channels.min())) - 1.0
    high = float(max(heads.max(), channels.max())) + 1.0
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        h, c = kept(middle)
        if h.sum() * head_params + c.sum() * channel_params > budget:
            low = middle
        else:
            high = middle
    h, c = kept(high)
    attn_fraction = h / dims.num_heads
    ffn_fraction = c / dims.ffn
    centre = float(np.concatenate([attn_fraction, ffn_fraction]).mean())
    offsets = {}
    for b in range(dims.num_blocks):
        offsets[attn_key(b)] = float(np.clip(attn_fraction[b] - centre, -1.0, 1.0))
        offsets[ffn_key(b)] = float(np.clip(ffn_fraction[b] - centre, -1.0, 1.0))
    return offsets
