"""The main job's front members against the best uniform and OWL plans, exported and measured on
held-out windows of the WikiText-2 test split (SmolLM2-135M).

For each ``--targets`` sparsity, the study's front member with the lowest sparsity at or above it
(after ``make search``: the refined member ADMM pruned) is written by ``autoprune export`` (from the
variant database where the study used one; block after block where the study measured that variant
better), loaded back with transformers and measured; uniform
ADMM, OWL-ADMM and uniform SparseGPT are pruned from the same cached statistics at the member's
own sparsity (the same non-zeros, up to rounding) and measured on the same windows. The
llm-compressor rows come from ``baselines.json`` where it was measured on the same windows.

    python experiments/main_job.py --storage sqlite:///runs/smollm2.db --study smollm2-default --threads 2
        [--test-windows N] [--trials N N] [--baselines-from results/main_job_64/main_job.json]

``--trials`` measures given trials instead (one per target: another refinement of the same study,
say), and ``--baselines-from`` reuses the baseline rows of an earlier run on the same windows.
``--sequential-baseline`` adds uniform ADMM pruned block after block (``prune --sequential``, a
calibration pass per target), the baseline to hold a member exported that way against as well.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from _common import (
    RESULTS, Column, column, load_study_setup, measure_one_shot, measure_sequential, parse, study_parser, table,
    write_results,
)
from transformers import AutoModelForCausalLM

from autoprune import PlanRequest
from autoprune.measure import perplexity
from autoprune.study import export_trial, member_at, trial_row
from autoprune.variants import DatabaseSettings

#: The uniform and OWL plans every member is compared with, by row label.
BASELINES = {
    "uniform ADMM": ("admm", False),
    "OWL ADMM": ("admm", True),
    "uniform SparseGPT": ("sparsegpt", False),
}
#: Uniform ADMM pruned block after block (``--sequential-baseline``).
SEQUENTIAL_BASELINE = "uniform ADMM --sequential"


def main() -> None:
    arguments = study_parser(__doc__, out=RESULTS / "main_job")
    arguments.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.7])
    arguments.add_argument("--test-windows", type=int, default=64,
                           help="first windows of the test split (the first 16 are harder than the split's average)")
    arguments.add_argument("--database-dir", default=None, help="the study's variant database folder (default: the cache's)")
    arguments.add_argument("--trials", nargs="+", type=int, default=None,
                           help="measure these trials (one per target) instead of the front members")
    arguments.add_argument("--baselines-from", type=Path, default=None,
                           help="take the baseline rows from this earlier main_job.json (same windows) "
                           "instead of pruning them again")
    arguments.add_argument("--sequential-baseline", action="store_true",
                           help="also measure uniform ADMM pruned block after block (prune --sequential)")
    args = parse(arguments)
    earlier = json.loads(args.baselines_from.read_text()) if args.baselines_from else None
    if earlier is not None and earlier["test_windows"] != args.test_windows:
        raise SystemExit(f"{args.baselines_from} was measured on {earlier['test_windows']} windows")
    if args.trials is not None and len(args.trials) != len(args.targets):
        raise SystemExit("--trials needs one trial per target")
    setup = load_study_setup(args.storage, args.study, args.test_windows)
    settings, pruner, windows = setup.settings, setup.pruner, setup.windows
    peer = llmcompressor_rows(len(windows))
    result = {"model": settings.model, "study": args.study, "test_windows": len(windows),
              "test_tokens": int(windows.numel()), "rows": []}
    for index, target in enumerate(args.targets):
        member = (setup.study.trials[args.trials[index]] if args.trials is not None
                  else member_at(setup.study.get_trials(deepcopy=False), target))
        if member is None:
            raise SystemExit(f"no front member at or above {target:.0%} sparsity")
        row = trial_row(member)
        sparsity = row["sparsity"]
        start = time.perf_counter()
        exported, sequential = measure_export(args.storage, args.study, member.number, windows, args.database_dir)
        label = f"{'front ' if args.trials is None else ''}trial {member.number}{' --sequential' if sequential else ''}"
        rows = [{"target": target, "model": label, "plan": row["plan"], "sequential": sequential,
                 "sparsity": sparsity, "nonzeros": row["nonzeros"], "ppl": exported,
                 "study_ppl": row["ppl_sequential"] if sequential else row["ppl"],
                 "seconds": round(time.perf_counter() - start)}]
        if earlier is not None:
            rows += [r for r in earlier["rows"]
                     if r["target"] == target and (r["model"] in BASELINES or r["model"] == SEQUENTIAL_BASELINE)]
        for label, (method, owl) in BASELINES.items() if earlier is None else ():
            start = time.perf_counter()
            plan = PlanRequest(method, sparsity, owl=owl).build(setup.loaded, pruner.stats)
            measured = measure_one_shot(pruner, plan, windows)
            rows.append({"target": target, "model": label, "sparsity": measured.size.sparsity,
                         "nonzeros": measured.size.linear_nonzeros, "ppl": measured.ppl,
                         "seconds": round(time.perf_counter() - start)})
        if args.sequential_baseline and not any(r["model"] == SEQUENTIAL_BASELINE for r in rows):
            start = time.perf_counter()
            plan = PlanRequest("admm", sparsity).build(setup.loaded, pruner.stats)
            measured = measure_sequential(settings.model, setup.calib, plan, windows, pruner.dense_linear_params)
            rows.append({"target": target, "model": SEQUENTIAL_BASELINE, "sparsity": measured.size.sparsity,
                         "nonzeros": measured.size.linear_nonzeros, "ppl": measured.ppl,
                         "seconds": round(time.perf_counter() - start)})
        if target in peer:
            rows.append({"target": target, "model": "llm-compressor SparseGPT (baselines.json)",
                         "sparsity": target, "ppl": peer[target]})
        admm = next(r["ppl"] for r in rows if r["model"] == "uniform ADMM")
        for r in rows:
            r["vs_uniform_admm"] = round(r["ppl"] / admm, 4)
        result["rows"] += rows
        print(json.dumps(rows), flush=True)
    print(write_results(result, args.out, "main_job", markdown(result)))


def measure_export(storage: str, study: str, trial: int, windows, database_dir: str | None) -> tuple[float, bool]:
    """Test perplexity of trial ``trial`` as ``autoprune export`` writes it by default and
    transformers loads it (pruned from the variant database in ``database_dir``, the cache's by
    default), and whether that export was the block-after-block variant."""
    with tempfile.TemporaryDirectory(prefix="autoprune-export-") as folder:
        result = export_trial(storage, study, trial, Path(folder) / "model", progress=False,
                              database=DatabaseSettings(folder=database_dir))
        model = AutoModelForCausalLM.from_pretrained(Path(folder) / "model", dtype=torch.float32)
        return perplexity(model.eval(), windows, progress=False), result.report.recipe.sequential


def llmcompressor_rows(test_windows: int) -> dict[float, float]:
    """llm-compressor SparseGPT's test perplexity by target (``setting``) from ``baselines.json``,
    where it was measured on as many windows (the first ones of the same split)."""
    path = RESULTS / "baselines.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("eval_windows") != test_windows:
        return {}
    return {
        float(row["setting"].rstrip("%")) / 100: row["ppl"] for row in data["rows"]
        if row["tool"].startswith("llm-compressor") and row["method"] == "sparsegpt"
        and row["setting"].endswith("%")
    }


def markdown(result: dict) -> str:
    columns = [column("target", "target", ".0%"), column("model", "model", align="---"),
               column("sparsity", "sparsity", ".4f"), column("ppl", "ppl", ".2f"),
               column("x uniform ADMM", "vs_uniform_admm", ".3f"),
               Column("study ppl (validation)", lambda r: f"{r['study_ppl']:.2f}" if "study_ppl" in r else ""),
               Column("seconds", lambda r: r.get("seconds", ""))]
    return "\n".join([
        f"{result['model']}, study {result['study']!r}: the first {result['test_windows']} windows of "
        f"the WikiText-2 test split ({result['test_tokens']} tokens).", "", *table(result["rows"], columns),
    ]) + "\n"


if __name__ == "__main__":
    main()
