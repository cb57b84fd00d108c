"""Per-layer refinement (``autoprune refine``) of a study's plans, on WikiText-2 test windows the
search never saw (SmolLM2-135M).

For each ``--targets`` sparsity, the complete trial of the study at exactly that target with the
best validation score, or the ``--parents`` trial given for it (chosen without looking at test
data, e.g. by validation KL with ``proxy_check.py``), is refined: level-switch evolution
for ``--generations`` generations, ranked by KL on validation windows the study did not use; the
result is added to the study as a trial of its own. Parent and refined plan are then measured on the
first ``--test-windows`` windows of the test split, one-shot (what the study measured) and pruned
again with ``--sequential`` (the same plan and non-zeros, calibrated on the already-pruned blocks).
The best uniform and OWL baselines at each target are read from
``results/search_vs_baselines.json``, measured on the same windows.

A rerun reuses a refined trial of the same parent and settings instead of refining again.
Writes ``refine_front.json`` and ``.md`` under ``--out``.

    python experiments/refine_front.py --targets 0.6 0.7 --parents 151 10 --generations 100 --threads 2

``--method admm`` prunes the refined allocation with ADMM instead of the parent's method (a costlier
prune than a search trial affords, here only the layers a candidate changes).

``--sequential-every N`` refines for the ``--sequential`` recipe instead (``autoprune refine
--sequential-every``): candidates pruned from the parent's sequential statistics, refreshed every N
generations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autoprune import Pruner
from autoprune.api import prepare_with_windows
from autoprune.data import evaluation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.methods import PruningMethod
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.pruner import prune_sequentially
from autoprune.study import (
    RefineConfig,
    load_existing_study,
    refine_trial,
    study_settings,
    trial_plan,
)

HERE = Path(__file__).resolve().parent
REQUIRED_REDUCTION = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="sqlite:///runs/search_vs_baselines.db")
    parser.add_argument("--study", default="search-vs-baselines")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.7])
    parser.add_argument("--parents", nargs="+", type=int, default=None,
                        help="trial to refine at each target (default: the best validation score)")
    refine_default = {name: field.default for name, field in RefineConfig.model_fields.items()}
    parser.add_argument("--generations", type=int, default=refine_default["generations"])
    parser.add_argument("--offspring", type=int, default=refine_default["offspring"])
    parser.add_argument("--seed", type=int, default=refine_default["seed"])
    parser.add_argument("--select-windows", type=int, default=refine_default["select_windows"])
    parser.add_argument("--pool-windows", type=int, default=refine_default["pool_windows"],
                        help="validation windows candidates are ranked on (drawn from afresh)")
    parser.add_argument("--sequential-every", type=int, default=None,
                        help="refine for the --sequential recipe (statistics refreshed every N generations)")
    parser.add_argument("--method", default=None, choices=PruningMethod.available(),
                        help="prune the refined allocation with this method instead of the parent's")
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if args.parents is not None and len(args.parents) != len(args.targets):
        raise SystemExit("--parents needs one trial per target")
    refined = {}
    for index, target in enumerate(args.targets):
        study = load_existing_study(args.storage, args.study)
        parent = best_at(study, target) if args.parents is None else study.trials[args.parents[index]]
        config = RefineConfig(storage=args.storage, study=args.study, trial=parent.number,
                              generations=args.generations, offspring=args.offspring, seed=args.seed,
                              select_windows=args.select_windows, pool_windows=args.pool_windows,
                              sequential_every=args.sequential_every, method=args.method,
                              threads=args.threads)
        summary = refine_trial(config, progress=True)  # finds an earlier run with these settings
        print(summary.line(), flush=True)
        child = load_existing_study(args.storage, args.study).trials[summary.trial]
        refined[target] = (parent, child)

    study = load_existing_study(args.storage, args.study)
    settings = study_settings(study)
    calibration = settings.calibration
    loaded, calib, stats, _ = prepare_with_windows(settings.model, calibration, None, True)
    pruner = Pruner(loaded, stats)
    windows = evaluation_windows(calibration.source, loaded.tokenizer, settings.eval_seq_len,
                                 args.test_windows)
    baselines = recorded_comparison(args.study, settings.model)

    def one_shot(plan: Plan) -> tuple[float, float, int]:
        with pruner.applied(plan) as model:
            size = measure_size(model, loaded.adapter, pruner.dense_linear_params)
            return perplexity(model, windows, progress=True), size.sparsity, size.linear_nonzeros

    rows = []
    for target, (parent, child) in refined.items():
        parent_ppl, sparsity, nonzeros = one_shot(trial_plan(parent))
        child_ppl, child_sparsity, child_nonzeros = one_shot(trial_plan(child))
        assert child_nonzeros == nonzeros, "a refined plan must keep its parent's size"
        pruned = prune_sequentially(load_model(settings.model), calib, trial_plan(child))
        sequential_ppl = perplexity(pruned, windows, progress=True)
        del pruned
        reference = baselines.get(round(target, 4), {})
        uniform = reference.get("best_uniform_ppl")
        best = min(child_ppl, sequential_ppl)
        rows.append({
            "target": target, "sparsity": sparsity, "linear_nonzeros": nonzeros,
            "parent": parent.number, "refined": child.number,
            "accepted": child.user_attrs["refine"]["accepted"],
            "refine_seconds": child.user_attrs["refine"]["seconds"],
            "parent_validation": parent.values[1], "refined_validation": child.values[1],
            "parent_test_ppl": parent_ppl, "refined_test_ppl": child_ppl,
            "refined_sequential_test_ppl": sequential_ppl,
            "best_uniform": reference.get("best_uniform"), "best_uniform_ppl": uniform,
            "best_owl_ppl": reference.get("best_owl_ppl"),
            "searched_front_ppl": reference.get("front_ppl"),
            "searched_front_sequential_ppl": reference.get("front_sequential_ppl"),
            "reduction_vs_best_uniform": None if uniform is None else 1 - best / uniform,
        })
        print(json.dumps(rows[-1]), flush=True)
    choice = "best validation score" if args.parents is None else "given by --parents"
    result = {"study": args.study, "objective": settings.objective, "parent_choice": choice,
              "generations": args.generations,
              "offspring": args.offspring, "seed": args.seed,
              "select_windows": args.select_windows, "pool_windows": args.pool_windows,
              "sequential_every": args.sequential_every, "method": args.method,
              "test_windows": int(windows.shape[0]),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refine_front.json").write_text(json.dumps(result, indent=2))
    (args.out / "refine_front.md").write_text(markdown(result))
    print(markdown(result))


def best_at(study: optuna.Study, target: float) -> FrozenTrial:
    """The complete, unrefined trial at exactly ``target`` with the best validation score."""
    here = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if abs(t.params.get("target", -1.0) - target) < 1e-9 and "refined_from" not in t.user_attrs
    ]
    if not here:
        raise SystemExit(f"no complete trial at target {target}")
    return min(here, key=lambda t: t.values[1])


def recorded_comparison(study: str, model: str) -> dict[float, dict]:
    """``search_vs_baselines.py``'s comparison rows (best uniform, OWL, searched front) by target,
    when they were measured for this study and model."""
    path = HERE / "results" / "search_vs_baselines.json"
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    if (recorded.get("study"), recorded.get("model")) != (study, model):
        return {}
    return {round(row["target"], 4): row for row in recorded["comparison"]}


def markdown(result: dict) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    every = result.get("sequential_every")
    sequential = (
        f", ranked for `--sequential` on statistics refreshed every {every} generations" if every else ""
    )
    method = f", pruned with {result['method']}" if result.get("method") else ""
    lines = [
        f"Study `{result['study']}` (objective {result['objective']}): one trial at each target "
        f"({result['parent_choice']}{method}) refined per layer ({result['generations']} generations of "
        f"{result['offspring']} offspring, finalists on {result['select_windows']} of "
        f"{result['pool_windows']} pool windows, "
        f"seed {result['seed']}{sequential}), WikiText-2 test perplexity on "
        f"{result['test_windows']} windows; best uniform, OWL and the searched front (its member "
        "chosen on test, one-shot / `--sequential`) from `search_vs_baselines.py` on the same windows.",
        "",
        "| target | parent (test ppl) | refined (test ppl) | refined `--sequential` | best uniform | "
        "best OWL | searched front (one-shot / seq.) | reduction vs best uniform | >= 25% |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for row in result["rows"]:
        reduction = row["reduction_vs_best_uniform"]
        lines.append(
            f"| {row['target']:.0%} | {row['parent']} ({row['parent_test_ppl']:.2f}) | "
            f"{row['refined']} ({row['refined_test_ppl']:.2f}) | {row['refined_sequential_test_ppl']:.2f} | "
            f"{row['best_uniform'] or ''} {number(row['best_uniform_ppl'])} | {number(row['best_owl_ppl'])} | "
            f"{number(row['searched_front_ppl'])} / {number(row['searched_front_sequential_ppl'])} | "
            f"{'-' if reduction is None else f'{reduction:.1%}'} | "
            f"{'yes' if reduction is not None and reduction >= REQUIRED_REDUCTION else 'no'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
