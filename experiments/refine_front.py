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

import json

import optuna
from _common import (
    REQUIRED_REDUCTION,
    RESULTS,
    Column,
    load_study_setup,
    measure_one_shot,
    measure_sequential,
    number,
    parse,
    study_parser,
    table,
    write_results,
)
from optuna.trial import FrozenTrial, TrialState

from autoprune.methods import PruningMethod
from autoprune.study import RefineConfig, load_existing_study, refine_trial, trial_plan


def main() -> None:
    arguments = study_parser(__doc__)
    arguments.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.7])
    arguments.add_argument("--parents", nargs="+", type=int, default=None,
                           help="trial to refine at each target (default: the best validation score)")
    refine_default = {name: field.default for name, field in RefineConfig.model_fields.items()}
    arguments.add_argument("--generations", type=int, default=refine_default["generations"])
    arguments.add_argument("--offspring", type=int, default=refine_default["offspring"])
    arguments.add_argument("--seed", type=int, default=refine_default["seed"])
    arguments.add_argument("--select-windows", type=int, default=refine_default["select_windows"])
    arguments.add_argument("--pool-windows", type=int, default=refine_default["pool_windows"],
                           help="validation windows candidates are ranked on (drawn from afresh)")
    arguments.add_argument("--sequential-every", type=int, default=None,
                           help="refine for the --sequential recipe (statistics refreshed every N generations)")
    arguments.add_argument("--method", default=None, choices=PruningMethod.available(),
                           help="prune the refined allocation with this method instead of the parent's")
    arguments.add_argument("--test-windows", type=int, default=16)
    args = parse(arguments)

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

    setup = load_study_setup(args.storage, args.study, args.test_windows)
    settings, pruner, windows = setup.settings, setup.pruner, setup.windows
    baselines = recorded_comparison(args.study, settings.model)

    rows = []
    for target, (parent_trial, child_trial) in refined.items():
        parent = measure_one_shot(pruner, trial_plan(parent_trial), windows)
        child = measure_one_shot(pruner, trial_plan(child_trial), windows)
        assert child.size.linear_nonzeros == parent.size.linear_nonzeros, \
            "a refined plan must keep its parent's size"
        sequential_ppl = measure_sequential(settings.model, setup.calib, trial_plan(child_trial), windows,
                                            pruner.dense_linear_params).ppl
        reference = baselines.get(round(target, 4), {})
        uniform = reference.get("best_uniform_ppl")
        best = min(child.ppl, sequential_ppl)
        rows.append({
            "target": target, "sparsity": parent.size.sparsity, "linear_nonzeros": parent.size.linear_nonzeros,
            "parent": parent_trial.number, "refined": child_trial.number,
            "accepted": child_trial.user_attrs["refine"]["accepted"],
            "refine_seconds": child_trial.user_attrs["refine"]["seconds"],
            "parent_validation": parent_trial.values[1], "refined_validation": child_trial.values[1],
            "parent_test_ppl": parent.ppl, "refined_test_ppl": child.ppl,
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
    print(write_results(result, args.out, "refine_front", markdown(result)), end="")


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
    path = RESULTS / "search_vs_baselines.json"
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    if (recorded.get("study"), recorded.get("model")) != (study, model):
        return {}
    return {round(row["target"], 4): row for row in recorded["comparison"]}


def markdown(result: dict) -> str:
    """The header saying how the refinement ran, and one row per target."""
    every = result.get("sequential_every")
    sequential = (
        f", ranked for `--sequential` on statistics refreshed every {every} generations" if every else ""
    )
    method = f", pruned with {result['method']}" if result.get("method") else ""

    def reduction(row: dict) -> str:
        value = row["reduction_vs_best_uniform"]
        return "-" if value is None else f"{value:.1%}"

    def meets(row: dict) -> str:
        value = row["reduction_vs_best_uniform"]
        return "yes" if value is not None and value >= REQUIRED_REDUCTION else "no"

    columns = [
        Column("target", lambda row: f"{row['target']:.0%}"),
        Column("parent (test ppl)", lambda row: f"{row['parent']} ({row['parent_test_ppl']:.2f})"),
        Column("refined (test ppl)", lambda row: f"{row['refined']} ({row['refined_test_ppl']:.2f})"),
        Column("refined `--sequential`", lambda row: f"{row['refined_sequential_test_ppl']:.2f}"),
        Column("best uniform", lambda row: f"{row['best_uniform'] or ''} {number(row['best_uniform_ppl'])}"),
        Column("best OWL", lambda row: number(row["best_owl_ppl"])),
        Column("searched front (one-shot / seq.)", lambda row: (
            f"{number(row['searched_front_ppl'])} / {number(row['searched_front_sequential_ppl'])}")),
        Column("reduction vs best uniform", reduction),
        Column(">= 25%", meets, ":-:"),
    ]
    return "\n".join([
        f"Study `{result['study']}` (objective {result['objective']}): one trial at each target "
        f"({result['parent_choice']}{method}) refined per layer ({result['generations']} generations of "
        f"{result['offspring']} offspring, finalists on {result['select_windows']} of "
        f"{result['pool_windows']} pool windows, "
        f"seed {result['seed']}{sequential}), WikiText-2 test perplexity on "
        f"{result['test_windows']} windows; best uniform, OWL and the searched front (its member "
        "chosen on test, one-shot / `--sequential`) from `search_vs_baselines.py` on the same windows.",
        "",
        *table(result["rows"], columns),
    ]) + "\n"

if __name__ == "__main__":
    main()
