"""`autoprune refine` on sub-network plans: width switches keep the size within one level and the
widths GQA-consistent, candidates are measured as their sub-networks, the refined trial joins the
study measured as its sub-network, and what a sub-network's refinement cannot do is refused in one
line with the study untouched."""

from __future__ import annotations

import hashlib
import math
import random

import optuna
import pytest
from conftest import REFINE_STUDY, run_cli
from optuna.trial import TrialState

from autoprune.measure import reference_logprobs, window_losses
from autoprune.plan import LayerSpec, Plan
from autoprune.structure import (
    BlockWidths,
    ModelDims,
    Structure,
    build_subnet,
    decoder_linear_params,
    resolve_blocks,
)
from autoprune.study import TrialRequest, TrialWorker, WorkerSpec, refine_trial, trial_plan
from autoprune.study.refine import (
    LevelSwitchEvolution,
    WidthAllocation,
    gqa_head_counts,
    width_levels,
)

SMOLLM2 = ModelDims(num_blocks=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden=576, ffn=1536)
#: A sub-network of the tiny LLaMA (4 blocks, 2 KV groups of 2 heads, FFN 128).
TINY_STRUCTURE = Structure(blocks={
    0: BlockWidths(ffn=80), 1: BlockWidths(ffn=100, kv_groups=2, heads_per_group=1),
    2: BlockWidths(kv_groups=1, heads_per_group=2), 3: BlockWidths(drop_attention=True),
})


def params(plan: Plan, dims: ModelDims) -> int:
    return decoder_linear_params(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims)


def test_width_switches_keep_the_size_within_one_level_and_gqa():
    widths = {block: BlockWidths(ffn=1152, kv_groups=3, heads_per_group=2) for block in range(30)}
    widths[3] = BlockWidths(drop_attention=True, ffn=768)
    widths[7] = BlockWidths(kv_groups=1, heads_per_group=3, ffn=1536)  # 3 heads as 1 group of 3
    del widths[5]
    base = Plan(structure=Structure(blocks=widths), removed_blocks=[5])
    parent = WidthAllocation(width_levels(base, SMOLLM2), base, SMOLLM2)
    assert "3.heads" not in parent.counts and "5.ffn" not in parent.counts and len(parent.counts) == 57
    assert gqa_head_counts(SMOLLM2) == [1, 2, 3, 4, 6, 9]
    budget, level = params(base, SMOLLM2), 3 * 576 * 128
    rng, child, moved = random.Random(0), parent, set()
    for _ in range(300):
        child = child.mutated(rng, 3)
        plan = child.plan(base)
        shapes = resolve_blocks(plan.structure, plan.removed_blocks, SMOLLM2)  # a valid plan
        assert abs(params(plan, SMOLLM2) - budget) <= level
        assert shapes[5] is None and shapes[3].heads == 0 and plan.removed_blocks == [5]
        assert all(s.ffn % 128 == 0 and 128 <= s.ffn <= 1536 for s in shapes if s is not None)
        assert all(s.heads in (0, 1, 2, 3, 4, 6, 9) for s in shapes if s is not None)
        moved |= {key for key, value in child.counts.items() if value != parent.counts[key]}
    assert len(moved) > 20 and any(key.endswith(".heads") for key in moved)
    # a block no switch moved keeps the trial's own widths, its 1 x 3 heads included
    untouched = parent.with_counts({**parent.counts, "0.ffn": 1024, "1.ffn": 1280}).plan(base)
    assert untouched.structure.blocks[7] == widths[7] and untouched.structure.blocks[2] == widths[2]
    assert untouched.structure.blocks[0].ffn == 1024 and params(untouched, SMOLLM2) == budget
    assert parent.plan(base).structure.blocks == widths  # the parent is the trial's own plan


def test_a_switch_that_would_leave_the_budget_is_not_taken():
    base = Plan(structure=Structure(every_block=BlockWidths(kv_groups=1, heads_per_group=1, ffn=128)))
    stuck = WidthAllocation(width_levels(base, SMOLLM2), base, SMOLLM2)  # everything at its lowest level
    assert stuck.mutated(random.Random(0), 5).counts == stuck.counts


def worker_for(studied) -> TrialWorker:
    folder, config = studied
    return TrialWorker(WorkerSpec(model=config.model, calibration=config.calibration(), objective="kl",
                                  eval_seq_len=32, eval_windows=3, cache_dir=str(folder / "cache")))


def add_subnet_trial(studied, plan: Plan) -> int:
    """Add ``plan`` to the study as a complete trial measured as its sub-network (what a search
    of sub-networks records); its number."""
    study = optuna.load_study(study_name=REFINE_STUDY, storage=studied.config.storage)
    template = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    number = len(study.trials)
    worker = worker_for(studied)
    result = worker.run(TrialRequest(number, plan))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, params=template.params, distributions=template.distributions,
        values=[float(result.size["linear_nonzeros"]), float(result.quality)],
        user_attrs={"plan": plan.model_dump(mode="json"), **result.record()},
    ))
    return number


def test_candidates_are_measured_as_their_sub_networks(studied):
    base = Plan(method="sparsegpt", structure=TINY_STRUCTURE)
    config = studied.refine_config(generations=1)
    worker = worker_for(studied)
    evolution = LevelSwitchEvolution(worker, base, config)
    child = evolution.start.mutated(random.Random(1), 2)
    assert child.counts != evolution.start.counts
    windows = [0, 2]
    fitness = evolution._fitness(child, windows, 16)
    subnet = build_subnet(worker.loaded.model, worker.stats, child.plan(base).structure)
    pool = evolution.pool[windows, :16]
    reference = reference_logprobs(worker.loaded.model, pool)
    expected = sum(loss.kl for loss in window_losses(subnet, pool, reference)) / (2 * 16)
    assert fitness == pytest.approx(expected, rel=1e-5)
    assert fitness > 0


def test_a_refined_sub_network_joins_the_study_measured_as_its_sub_network(studied):
    base = Plan(method="sparsegpt", structure=TINY_STRUCTURE)
    number = add_subnet_trial(studied, base)
    config = studied.refine_config(trial=number, generations=4)
    summary = refine_trial(config)
    study = optuna.load_study(study_name=REFINE_STUDY, storage=studied.config.storage)
    parent, refined = study.trials[number], study.trials[summary.trial]
    assert refined.state == TrialState.COMPLETE and refined.user_attrs["refined_from"] == number
    plan = trial_plan(refined)
    dims = ModelDims(num_blocks=4, num_heads=4, num_kv_heads=2, head_dim=16, hidden=64, ffn=128)
    assert plan.structure is not None and plan.structure.blocks[3].drop_attention
    assert abs(params(plan, dims) - params(base, dims)) <= 3 * 64 * (128 // 12)
    # the recorded size and quality are the refined sub-network's, measured as a trial is
    worker = worker_for(studied)
    subnet = build_subnet(worker.loaded.model, worker.stats, plan.structure, plan.removed_blocks)
    assert refined.values[0] == params(plan, dims)
    nll_kl = list(window_losses(subnet, worker.windows, worker.reference))
    kl = sum(loss.kl for loss in nll_kl) / (worker.windows.shape[0] * worker.windows.shape[1])
    assert refined.values[1] == pytest.approx(kl, rel=1e-5) and math.isfinite(parent.values[1])
    assert refined.values[1] <= parent.values[1] * 1.5  # refined on other windows, but not worse by far


@pytest.mark.parametrize(
    ("flags", "plan", "message"),
    [
        (["--sequential-every", 2], Plan(structure=TINY_STRUCTURE), "--sequential recipe prunes per-layer"),
        (["--measure-sequential", "true"], Plan(structure=TINY_STRUCTURE), "leave out --sequential-every and --measure"),
        (["--method", "wanda"], Plan(structure=TINY_STRUCTURE), "--method prunes weights"),
        ([], Plan(structure=TINY_STRUCTURE, layers={"model.layers.0.mlp.up_proj": LayerSpec(sparsity=0.5)}),
         "also prunes weights of its kept blocks"),
    ],
)
def test_what_a_sub_network_refinement_cannot_do_is_one_line(capsys, studied, flags, plan, message):
    folder, config = studied
    study = optuna.load_study(study_name=REFINE_STUDY, storage=config.storage)
    template = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    study.add_trial(optuna.trial.create_trial(  # recorded as a trial; never measured here
        state=TrialState.COMPLETE, params=template.params, distributions=template.distributions,
        values=template.values, user_attrs={**template.user_attrs, "plan": plan.model_dump(mode="json")},
    ))
    number = len(study.trials) - 1
    before = hashlib.sha256((folder / "s.db").read_bytes()).hexdigest()
    code, _, err = run_cli(capsys, "refine", "--storage", config.storage, "--study", REFINE_STUDY,
                           "--trial", number, "--cache-dir", folder / "cache", *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert hashlib.sha256((folder / "s.db").read_bytes()).hexdigest() == before
