"""A study's trials against uniform SparseGPT on the whole WikiText-2 test split, not its first
16 windows (SmolLM2-135M).

The other experiments report perplexity on the first 16 windows of 512 tokens (8k tokens), a
compromise with this machine's speed; the literature reports the whole split (~290k tokens). This
measures, on every window of it, the given ``--trials`` as the study measured them (one-shot,
from the study's statistics) and uniform SparseGPT at ``--target``: ``--sequential`` by default
(the best uniform baseline on SmolLM2), with ``--uniform one-shot`` also as a search trial prunes;
``--owl one-shot`` (as the study's OWL baselines) and ``--owl sequential`` add OWL's allocation of
SparseGPT; ``--uniform-admm`` adds uniform ADMM (one-shot), the method of trials refined with
``--method admm``. The table compares every trial with the best uniform plan of each method. A
model costs ~15 minutes of evaluation here; results are written after each one, and a run into the
same ``--out`` (same model, target and windows) reuses the rows already there, so a
stopped run resumes and a new row costs only its own model.

    python experiments/full_test_split.py --trials 257 --target 0.6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from autoprune import PlanRequest, Pruner
from autoprune.api import prepare_with_windows
from autoprune.data import evaluation_windows
from autoprune.measure import SizeReport, measure_size, perplexity
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.pruner import prune_sequentially
from autoprune.study import load_existing_study, study_settings, trial_plan

HERE = Path(__file__).resolve().parent
#: How rows name the pruning methods.
LABELS = {"sparsegpt": "SparseGPT", "admm": "ADMM"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="sqlite:///runs/search_vs_baselines.db")
    parser.add_argument("--study", default="search-vs-baselines")
    parser.add_argument("--trials", nargs="+", type=int, required=True)
    parser.add_argument("--target", type=float, required=True, help="uniform baselines' sparsity")
    parser.add_argument("--uniform", nargs="+", choices=("sequential", "one-shot"),
                        default=["sequential"], help="uniform SparseGPT variants to measure")
    parser.add_argument("--owl", nargs="+", choices=("sequential", "one-shot"), default=[],
                        help="OWL allocations of SparseGPT to measure")
    parser.add_argument("--uniform-admm", action="store_true",
                        help="also uniform ADMM, one-shot (the method refine --method admm prunes with)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "full_test_split")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    study = load_existing_study(args.storage, args.study)
    settings = study_settings(study)
    calibration = settings.calibration
    loaded, calib, stats, _ = prepare_with_windows(settings.model, calibration, None, True)
    pruner = Pruner(loaded, stats)
    windows = evaluation_windows(calibration.source, loaded.tokenizer, settings.eval_seq_len)
    uniform = PlanRequest("sparsegpt", args.target).build(loaded, stats)
    result = {"model": settings.model, "test_windows": len(windows),
              "test_tokens": int(windows.numel()), "target": args.target, "rows": []}
    result["rows"] = earlier_rows(args.out, result)

    def record(name: str, measure: Callable[[], tuple[float, SizeReport, float]]) -> None:
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

    def one_shot(plan: Plan) -> Callable[[], tuple[float, SizeReport, float]]:
        def measure() -> tuple[float, SizeReport, float]:
            start = time.perf_counter()
            weights = pruner.pruned_weights(plan)
            prune_seconds = time.perf_counter() - start
            with pruner.pointed(weights, plan.removed_blocks) as model:
                size = measure_size(model, loaded.adapter, pruner.dense_linear_params)
                return perplexity(model, windows, progress=True), size, prune_seconds
        return measure

    def sequential(plan: Plan) -> Callable[[], tuple[float, SizeReport, float]]:
        def measure() -> tuple[float, SizeReport, float]:
            start = time.perf_counter()
            model = prune_sequentially(load_model(settings.model), calib, plan)
            prune_seconds = time.perf_counter() - start
            size = measure_size(model, loaded.adapter, pruner.dense_linear_params)
            return perplexity(model, windows, progress=True), size, prune_seconds
        return measure

    for number in args.trials:
        plan = trial_plan(study.trials[number])
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
    best: dict[str, float] = {}
    for row in result["rows"]:
        for method in LABELS.values():
            if row["model"].startswith(f"uniform {method} "):
                best[method] = min(best.get(method, float("inf")), row["ppl"])
    lines = [
        f"{result['model']}, every window of the WikiText-2 test split ({result['test_windows']} "
        f"windows, {result['test_tokens']} tokens), target {result['target']:.0%}.",
        "",
        "| model | ppl | sparsity | non-zeros | prune s |"
        + "".join(f" below best uniform {method} |" for method in best),
        "|---|---:|---:|---:|---:|" + "---:|" * len(best),
    ]
    for row in result["rows"]:
        below = "".join(
            "  |" if row["model"].startswith("uniform") else f" {100 * (1 - row['ppl'] / ppl):.1f}% |"
            for ppl in best.values()
        )
        lines.append(f"| {row['model']} | {row['ppl']:.2f} | {row['sparsity']:.4f} | "
                     f"{row['linear_nonzeros']} | {row.get('prune_seconds', '')} |{below}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_test_split.json").write_text(json.dumps(result, indent=2))
    (out / "full_test_split.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
