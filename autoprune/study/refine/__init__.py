"""``autoprune refine``, its own stage: per-layer evolution of one trial's allocation, at its exact size.

A study's search spaces are a few dozen numbers (a target, per-block and per-projection offsets)
cast into per-layer sparsities: coarse enough for a sampler to learn, too coarse to give each of
the hundreds of linear layers its own level. Refinement takes one measured plan and moves
sparsity between individual layers, EvoPress-style (Sieberling et al., 2025): a (1 + lambda)
evolutionary search whose only mutation is a *level switch*, which prunes one layer more and
another less by the same number of weights, so every candidate keeps the parent's exact non-zeros.

Why it is affordable: a layer's pruned weight depends only on its own statistics and its prune
count, so the parent's pruned layers are kept and a candidate prunes only the few layers its
switches touched; it costs its forward passes, not a whole-model prune.

Why it does not overfit the study's validation windows: candidates are ranked by KL to the dense
model (which predicts held-out perplexity better than perplexity does, see
``experiments/proxy_check.py``) on windows drawn afresh every generation from a pool that excludes
the study's own windows, parent and offspring always on the same windows. The result is then
measured like any trial (the study's objective, its windows, a fresh prune) and added to the
study, so ``front`` and ``export`` treat it like the rest.

For the sequential recipe (``prune --sequential``, what a user exports), an allocation tuned on
one-shot weights is tuned for the wrong model: sequential pruning helps a uniform plan far more
than a plan refined on one-shot weights (``experiments/refine_front.py``). ``sequential_every`` ranks
candidates on weights pruned from the parent's sequential statistics instead (the inputs each layer
sees once the blocks before it are pruned to the parent's plan), recomputed from the current parent
every that many generations: near the parent, those weights are nearly each candidate's own
sequential weights, at a one-shot prune's cost per candidate and one calibration pass per refresh.

A sub-network plan (one with a structure: heads, KV groups, FFN channels kept per block) is
refined on its widths instead, as DarwinLM does: a switch moves one block's FFN width or head count
down one level and another's up, keeping the decoder linear weights within one level of the
trial's; candidates are measured as the sub-networks they cut.

A quantized plan (GGUF types per tensor) is refined on its types: a switch moves one tensor's
type a rung down and others' up (or the reverse) at the trial's bytes, never above them.

The stage in modules: ``_config`` (what it takes and reports), ``_allocation`` (prune counts and
level switches), ``_widths`` (a sub-network's width levels and their switches), ``_types`` (a
quantized plan's type rungs and their switches), ``_subnet`` (what a
sub-network plan's refinement refuses), ``_checkpoint`` (the state kept after every generation),
``_evolution`` (the search itself), ``_record`` (the result as a trial of the study) and ``_run``
(all of it, from a trial to a new trial).
"""

from autoprune.study.refine._allocation import Allocation, LevelSwitch, refinable_layers
from autoprune.study.refine._checkpoint import (
    CHECKPOINT_PREFIX,
    EvolutionState,
    checkpoint_key,
    load_checkpoint,
    save_checkpoint,
)
from autoprune.study.refine._config import (
    FINALISTS,
    PATH_SETTINGS,
    RECORDED_SETTINGS,
    SCREEN_WINDOWS,
    SWITCH_COUNTS,
    RefineConfig,
    RefineSummary,
)
from autoprune.study.refine._evolution import LevelSwitchEvolution, check_refinable
from autoprune.study.refine._record import find_refinement, record_refinement
from autoprune.study.refine._run import refine_trial
from autoprune.study.refine._types import TypeAllocation, type_ladders
from autoprune.study.refine._widths import FFN_LEVELS, WidthAllocation, gqa_head_counts, width_levels

__all__ = [
    "CHECKPOINT_PREFIX",
    "FFN_LEVELS",
    "FINALISTS",
    "PATH_SETTINGS",
    "RECORDED_SETTINGS",
    "SCREEN_WINDOWS",
    "SWITCH_COUNTS",
    "Allocation",
    "TypeAllocation",
    "EvolutionState",
    "LevelSwitch",
    "LevelSwitchEvolution",
    "RefineConfig",
    "RefineSummary",
    "WidthAllocation",
    "check_refinable",
    "checkpoint_key",
    "find_refinement",
    "gqa_head_counts",
    "load_checkpoint",
    "record_refinement",
    "refinable_layers",
    "refine_trial",
    "save_checkpoint",
    "type_ladders",
    "width_levels",
]
