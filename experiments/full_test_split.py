"""A study's trials against uniform SparseGPT on the whole WikiText-2 test split, not its first
16 windows (SmolLM2-135M).

The other experiments report perplexity on the first 16 windows of 512 tokens (8k tokens), a
compromise with a CPU's speed; the literature reports the whole split. This
measures, on every window of it, the given ``--trials`` as the study measured them (one-shot,
from the study's statistics) and uniform SparseGPT at ``--target``: ``--sequential`` by default
(the best uniform baseline on SmolLM2), with ``--uniform one-shot`` also as a search trial prunes;
``--owl one-shot`` (as the study's OWL baselines) and ``--owl sequential`` add OWL's allocation of
SparseGPT; ``--uniform-admm`` adds uniform ADMM (one-shot), the method of trials refined with
``--method admm``. The table compares every trial with the best uniform plan of each method. A
model costs hundreds of window evaluations; results are written after each one, and a run into the
same ``--out`` (same model, target and windows) reuses the rows already there, so a
stopped run resumes and a new row costs only its own model.

    python experiments/full_test_split.py --trials 257 --target 0.6 --threads 2
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    RESULTS,
    Column,
    Measured,
    column,
    load_study_setup,
    measure_one_shot,
    measure_sequential,
    parse,
    study_parser,
    table,
    write_results,
)

from autoprune import PlanRequest
from autoprune.plan import Plan
from autoprune.study import trial_plan

#: How rows name the pruning methods.
LABELS = {"sparsegpt": "SparseGPT", "admm": "ADMM"}


def main() -> None:
    arguments = study_parser(__doc__, out=RESULTS / "full_test_split")
    arguments.add_argument("--trials", nargs="+", type=int, required=True)
    arguments.add_argument("--target", type=float, required=True, help="uniform baselines' sparsity")
    arguments.add_argument("--uniform", nargs="+", choices=("sequential", "one-shot"),
                           default=["sequential"], help="uniform SparseGPT variants to measure")
    arguments.add_argument("--owl", nargs="+", choices=("sequential", "one-shot"), default=[],
                           help="OWL allocations of SparseGPT to measure")
    arguments.add_argument("--uniform-admm", action="store_true",
                           help="also uniform ADMM, one-shot (the method refine --method admm prunes with)")
    args = parse(arguments)

    setup = load_study_setup(args.storage, args.study)
    settings, loaded, pruner, windows = setup.settings, setup.loaded, setup.pruner, setup.windows
    stats = pruner.stats
    uniform = PlanRequest("sparsegpt", args.target).build(loaded, stats)
    result = {"model": settings.model, "test_windows": len(windows),
              "test_tokens": int(windows.numel()), "target": args.target, "rows": []}
    result["rows"] = earlier_rows(args.out, result)

    def record(name: str, measure: Callable[[], Measured]) -> None:
        if any(row["model"] == name for row in result["rows"]):
            print(f"{name}: measured before, kept", flush=True)
            return
        start = time.perf_counter()
        ppl, size, prune_seconds = measure()
        result["rows"].append({
            "model": name, "ppl": ppl, "sparsity": round(size.sparsity, 6),
            "linear_nonzeros": size.linear_nonzeros, "seconds": round(time.perf_counter() - start),
            "prune_seconds": round(prune_seconds, 1),
        })
        write(result, args.out)
        print(f"{name}: ppl {ppl:.2f} at {size.linear_nonzeros} non-zeros", flush=True)

    def one_shot(plan: Plan) -> Callable[[], Measured]:
        return lambda: measure_one_shot(pruner, plan, windows)

    def sequential(plan: Plan) -> Callable[[], Measured]:
        return lambda: measure_sequential(settings.model, setup.calib, plan, windows,
                                          pruner.dense_linear_params)

    for number in args.trials:
        plan = trial_plan(setup.study.trials[number])
        # a trial pruned with another method than the study's (refine --method) says which
        method = "" if plan.method == settings.method else f" ({LABELS.get(plan.method, plan.method)})"
        record(f"trial {number}{method}", one_shot(plan))
    owl = PlanRequest("sparsegpt", args.target, owl=True).build(loaded, stats)
    for label, plan, variants in (("uniform", uniform, args.uniform), ("OWL", owl, args.owl)):
        for variant in variants:
            measure = sequential(plan) if variant == "sequential" else one_shot(plan)
            suffix = "--sequential" if variant == "sequential" else "one-shot"
            record(f"{label} SparseGPT {args.target:.0%} {suffix}", measure)
    if args.uniform_admm:
        record(f"uniform ADMM {args.target:.0%} one-shot",
               one_shot(PlanRequest("admm", args.target).build(loaded, stats)))


def earlier_rows(out: Path, result: dict) -> list[dict]:
    """The rows an earlier run wrote into ``out`` for the same model, target and windows."""
    path = out / "full_test_split.json"
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    same = all(earlier[key] == result[key] for key in ("model", "test_windows", "test_tokens", "target"))
    return earlier["rows"] if same else []


def write(result: dict, out: Path) -> None:
    """JSON and a markdown table with each model's reduction against the best uniform plan of each
    method measured so far (prune seconds: rows measured before they were recorded have none)."""
    write_results(result, out, "full_test_split", markdown(result))


def markdown(result: dict) -> str:
    """The table of ``write``, from the JSON it writes."""
    best: dict[str, float] = {}
    for row in result["rows"]:
        for method in LABELS.values():
            if row["model"].startswith(f"uniform {method} "):
                best[method] = min(best.get(method, float("inf")), row["ppl"])

    def below(ppl: float) -> Callable[[dict], str]:
        return lambda row: "" if row["model"].startswith("uniform") else f"{100 * (1 - row['ppl'] / ppl):.1f}%"

    columns = [column("model", "model", align="---"), column("ppl", "ppl", ".2f"),
               column("sparsity", "sparsity", ".4f"), column("non-zeros", "linear_nonzeros"),
               Column("prune s", lambda row: row.get("prune_seconds", ""))]
    columns += [Column(f"below best uniform {method}", below(ppl)) for method, ppl in best.items()]
    return "\n".join([
        f"{result['model']}, every window of the WikiText-2 test split ({result['test_windows']} "
        f"windows, {result['test_tokens']} tokens), target {result['target']:.0%}.",
        "",
        *table(result["rows"], columns),
    ]) + "\n"


if __name__ == "__main__":
    main()
