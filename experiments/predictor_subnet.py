"""The predictor on sub-network plans of SmolLM2-135M: held-out rank correlation with width features.

Random sub-network plans (per block: query heads kept consistently with grouped-query attention,
FFN channels kept on a grid of 1/12 of the FFN, now and then a dropped attention or MLP sub-block,
sometimes a few removed blocks; decoder linear weights between about half and all of the dense
model's) are cut with :func:`autoprune.structure.build_subnet` from the cached calibration
statistics (128 x 512 tokens of WikiText-2's validation split, seed 0, default structured method
and correction) and measured on ``--eval-windows`` validation windows, as a study's trials are. Three
kinds of plans: ``uniform`` (the same widths in every block), ``random`` (each block's widths drawn
around the plan's target) and ``influence`` (blocks of low influence cut more, with noise).

The predictor (:mod:`predictors`, featurized with the width features) is then scored by the quality
report (held-out 30% and 5-fold cross-validation) and beside it the size alone (Spearman of the
kept fraction on the same held-out plans), so the table says what the width features add.
Measurements go to ``results/predictor_subnet_plans.json`` as they come (a stopped run resumes);
the report to ``results/predictor_subnet.{json,md}``.

    nice -n 10 python experiments/predictor_subnet.py [--plans 72] [--eval-windows 4] [--threads 1]
    python experiments/predictor_subnet.py --report-only   # the report from the stored measurements
"""

from __future__ import annotations

import json
import time

import numpy as np
from scipy.stats import kendalltau, spearmanr

from autoprune import CalibrationConfig, prepare
from autoprune.data import validation_windows
from autoprune.measure import perplexity
from autoprune.plan import Plan
from autoprune.structure import (
    BlockWidths,
    ModelDims,
    Structure,
    build_subnet,
    decoder_linear_params,
    heads_to_groups,
    model_dims,
    resolve_blocks,
)
from autoprune.study.refine import gqa_head_counts
from predictors import Featurizer, TrainingSet, quality_report
from predictors.model import KEPT_FEATURE
from search_spaces import SpaceContext

from _common import DEFAULT_DATA as DATA
from _common import RESULTS, add_threads, column, parse, parser, table, write_results

MODEL = "smollm2-135m"
FFN_LEVELS = 12
MODES = ("uniform", "random", "influence")
PLANS_FILE = RESULTS / "predictor_subnet_plans.json"


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--plans", type=int, default=72)
    arguments.add_argument("--eval-windows", type=int, default=4)
    arguments.add_argument("--seed", type=int, default=0)
    arguments.add_argument("--report-only", action="store_true", help="no measuring: report the stored plans")
    add_threads(arguments, 1)
    args = parse(arguments)
    calibration = CalibrationConfig(source=DATA)
    loaded, stats, _ = prepare(MODEL, calibration, progress=False)
    stored = json.loads(PLANS_FILE.read_text()) if PLANS_FILE.is_file() else {"rows": []}
    rows = stored["rows"]
    if not args.report_only:
        rows = measure(loaded, stats, args, rows, calibration)
    ctx = SpaceContext.from_model(loaded, stats, "wanda", (0.0, 0.5), outlier_thresholds=())
    featurizer = Featurizer.from_model(loaded, stats, ctx, widths=True)
    result = report(rows, featurizer, args.seed)
    result["settings"] = {"model": MODEL, "eval_windows": stored.get("eval_windows", args.eval_windows),
                          "plans": len(rows), "seed": args.seed}
    print(write_results(result, RESULTS, "predictor_subnet", markdown(result)))


def measure(loaded, stats, args, rows: list[dict], calibration: CalibrationConfig) -> list[dict]:
    """Measure plans ``len(rows)`` to ``args.plans`` (the same plans a fresh run would draw)."""
    dims = model_dims(loaded.model)
    windows = validation_windows(DATA, loaded.tokenizer, 512, args.eval_windows)
    rng = np.random.default_rng(args.seed)
    influence = np.asarray(stats.block_influence, dtype=float)
    for index in range(args.plans):
        mode = MODES[index % len(MODES)]
        plan = sample_plan(rng, dims, influence, mode)
        if index < len(rows):
            continue  # drawn again so later plans are the same as an uninterrupted run's
        start = time.perf_counter()
        subnet = build_subnet(loaded.model, stats, plan.structure, plan.removed_blocks)
        ppl = perplexity(subnet, windows)
        params = decoder_linear_params(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims)
        rows.append({"mode": mode, "plan": plan.model_dump(mode="json"), "params": params, "ppl": ppl,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(index, mode, params, round(ppl, 2), rows[-1]["seconds"], flush=True)
        PLANS_FILE.parent.mkdir(parents=True, exist_ok=True)
        PLANS_FILE.write_text(json.dumps({"model": MODEL, "calibration": calibration.model_dump(),
                                          "eval_windows": args.eval_windows, "seed": args.seed,
                                          "rows": rows}, indent=1) + "\n")
    return rows


def sample_plan(rng: np.random.Generator, dims: ModelDims, influence: np.ndarray, mode: str) -> Plan:
    """One random sub-network plan of ``mode`` (see the module doc)."""
    keep = rng.uniform(0.5, 0.95)
    removed: list[int] = []
    if rng.random() < 0.25:
        count = int(rng.integers(1, 4))
        least = np.argsort(influence, kind="stable")[: count + 2]
        removed = sorted(int(b) for b in rng.choice(least, size=count, replace=False))
    ranks = np.argsort(np.argsort(influence, kind="stable"), kind="stable") / max(1, dims.num_blocks - 1)
    heads_choices = gqa_head_counts(dims)
    uniform_level = keep + rng.normal(0.0, 0.05)
    blocks: dict[int, BlockWidths] = {}
    for block in range(dims.num_blocks):
        if block in removed:
            continue
        level = {"uniform": uniform_level, "random": keep + rng.normal(0.0, 0.15),
                 "influence": keep + 0.3 * (ranks[block] - 0.5) + rng.normal(0.0, 0.05)}[mode]
        head_level = level if mode == "uniform" else level + rng.normal(0.0, 0.1)
        ffn = int(np.clip(round(level * FFN_LEVELS), 1, FFN_LEVELS)) * (dims.ffn // FFN_LEVELS)
        heads = min(heads_choices, key=lambda h: abs(h / dims.num_heads - head_level))
        groups, per_group = heads_to_groups(heads, dims)
        drop_attention = mode != "uniform" and rng.random() < 0.04
        drop_mlp = mode != "uniform" and not drop_attention and rng.random() < 0.02
        blocks[block] = BlockWidths(kv_groups=groups, heads_per_group=per_group, ffn=ffn,
                                    drop_attention=drop_attention, drop_mlp=drop_mlp)
    return Plan(method="wanda", structure=Structure(blocks=blocks), removed_blocks=removed)


def report(rows: list[dict], featurizer: Featurizer, seed: int) -> dict:
    """The quality report on the measured plans, and the size alone on the same held-out plans."""
    plans = [Plan.model_validate(row["plan"]) for row in rows]
    quality = np.array([row["ppl"] for row in rows], dtype=float)
    data = TrainingSet(
        study="predictor_subnet", quality_name="ppl", trials=np.arange(len(rows)), plans=plans,
        nonzeros=np.array([row["params"] for row in rows], dtype=float), quality=quality,
        features=featurizer.transform(plans), complete=np.ones(len(rows), dtype=bool),
    )
    result = quality_report(data, featurizer.schema, seed=seed)
    order = np.random.default_rng(seed).permutation(len(data))
    held = order[: result["heldout_trials"]]
    kept = data.features[held, featurizer.names.index(KEPT_FEATURE)]
    result["size_only_spearman"] = float(spearmanr(-kept, quality[held]).statistic)
    result["size_only_kendall"] = float(kendalltau(-kept, quality[held]).statistic)
    result["ppl_range"] = [float(quality.min()), float(quality.max())]
    return result


COLUMNS = [
    column("split", "split", align="---"), column("objective", "objective", align="---"),
    column("Spearman", "spearman", ".3f"), column("Kendall", "kendall", ".3f"),
]


def markdown(result: dict) -> str:
    """The report's table, from the JSON alone."""
    settings = result["settings"]
    split = f"held-out {result['heldout_trials']}/{result['trials']}"
    rows = [{"split": split, "objective": name, **metrics} for name, metrics in result["heldout"].items()]
    rows += [{"split": f"{result['folds']}-fold mean", "objective": name,
              **{metric: spread["mean"] for metric, spread in metrics.items()}}
             for name, metrics in result["kfold"].items()]
    rows.append({"split": split, "objective": "size alone (kept fraction)",
                 "spearman": result["size_only_spearman"], "kendall": result["size_only_kendall"]})
    return (
        f"Command: `nice -n 10 python experiments/predictor_subnet.py --plans {settings['plans']} "
        f"--eval-windows {settings['eval_windows']} --seed {settings['seed']}`\n\n"
        f"{settings['plans']} random sub-network plans of SmolLM2-135M, perplexity "
        f"{result['ppl_range'][0]:.1f} to {result['ppl_range'][1]:.1f} on "
        f"{settings['eval_windows']} validation windows.\n\n" + "\n".join(table(rows, COLUMNS)) + "\n"
        + (f"\nWarning: {result['warning']}\n" if result["warning"] else "")
    )


if __name__ == "__main__":
    main()
