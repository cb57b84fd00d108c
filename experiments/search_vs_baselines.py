"""The searched front against uniform and OWL baselines, on WikiText-2 test windows the search
never saw (SmolLM2-135M).

1. A study over ``--sparsity-range`` (default 40-80%) runs for ``--budget-minutes`` or ``--trials``
   (whichever ends first; rerunning resumes it). It scores candidates on validation windows, cut
   from the held-out tail of the calibration split.
2. Every front member and every baseline is then measured on the first ``--test-windows`` windows
   of the WikiText-2 *test* split: uniform Wanda, uniform SparseGPT, OWL with Wanda and with the
   search's method, at each ``--targets`` sparsity. Uniform rows measured by ``baselines.py`` on the
   same test windows are read from ``results/baselines.json`` when it exists: llm-compressor's
   Wanda/SparseGPT and autoprune's ``--sequential`` SparseGPT (llm-compressor's pipeline).
3. At each baseline's non-zeros, the front's perplexity is the best test perplexity among front
   members with at least that sparsity (less :data:`SPARSITY_TOLERANCE`; the headline number),
   and, for reference, that envelope interpolated linearly in log-perplexity against sparsity.
4. At each ``--sequential-targets`` sparsity, the front member chosen in 3 is pruned again with
   ``--sequential`` (the same plan, so the same non-zeros; what ``autoprune prune --recipe R
   --sequential`` gives a user) and measured on the same test windows.

Writes ``search_vs_baselines.json``, ``.md`` and ``.png`` under ``--out``.

    python experiments/search_vs_baselines.py --budget-minutes 110
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
import torch

from autoprune import PlanRequest, Pruner, prepare
from autoprune.data import calibration_windows, evaluation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.pruner import prune_sequentially
from autoprune.study import (
    SearchConfig,
    front_trials,
    load_existing_study,
    run_search,
    trial_plan,
)
from predictors import PredictorProposer

HERE = Path(__file__).resolve().parent
#: The issue's bar: at 60% and 70%, at least this much lower perplexity than the best uniform.
REQUIRED_REDUCTION = 0.25
#: "At least the baseline's sparsity" allows this much less: uniform plans round every layer on
#: its own (60% comes out as 60.06%), searched plans land on the target's exact budget.
SPARSITY_TOLERANCE = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared/data/wikitext-2"))
    parser.add_argument("--storage", default="sqlite:///runs/search_vs_baselines.db")
    parser.add_argument("--study", default="search-vs-baselines")
    parser.add_argument("--space", default="layerwise")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sampler", default="nsga2")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--sparsity-range", nargs=2, type=float, default=(0.4, 0.8))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--budget-minutes", type=float, default=110.0)
    parser.add_argument("--objective", choices=("ppl", "kl"), default="ppl",
                        help="validation score the study minimizes (see proxy_check.py)")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--sequential-targets", nargs="*", type=float, default=[0.6, 0.7])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--predictor", choices=("on", "off"), default="off",
                        help="screen candidates with the accuracy predictor (may change on resume)")
    parser.add_argument("--no-search", action="store_true", help="only evaluate the existing study")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    config = SearchConfig(
        model=args.model, data=args.data, storage=args.storage, study=args.study,
        trials=args.trials, timeout_minutes=args.budget_minutes, sampler=args.sampler,
        population=args.population, space=args.space, method=args.method,
        sparsity_range=tuple(args.sparsity_range), baseline_targets=args.targets,
        objective=args.objective, eval_windows=args.eval_windows, seq_len=args.seq_len,
        calib_samples=args.calib_samples,
        threads=args.threads, predictor=args.predictor,
    )
    if not args.no_search:
        screening = PredictorProposer.for_search if config.predictor == "on" else None
        run_search(config, progress=True, proposer_factory=screening)
    study = load_existing_study(config.storage, config.study)

    loaded, stats, _ = prepare(config.model, config.calibration())
    pruner = Pruner(loaded, stats)
    windows = evaluation_windows(config.data, loaded.tokenizer, config.seq_len, args.test_windows)
    dense_linear = pruner.dense_linear_params

    def test(plan: Plan) -> dict:
        with pruner.applied(plan) as model:
            size = measure_size(model, loaded.adapter, dense_linear)
            ppl = perplexity(model, windows, progress=True)
        return {"test_ppl": ppl, "sparsity": size.sparsity, "linear_nonzeros": size.linear_nonzeros}

    front = [
        {"trial": t.number, "validation_ppl": t.user_attrs["ppl"], **test(trial_plan(t))}
        for t in front_trials(study)
    ]
    kinds = [("uniform", "wanda"), ("uniform", "sparsegpt")]
    kinds += [("owl", method) for method in sorted({"wanda", args.method})]
    baselines = [
        {"kind": kind, "tool": "autoprune", "method": method, "target": target,
         **test(PlanRequest(method, target, owl=kind == "owl").build(loaded, stats))}
        for target in args.targets
        for kind, method in kinds
    ]
    baselines += recorded_rows(args.targets, args.test_windows, args.seq_len)
    calib = calibration_windows(
        config.data, loaded.tokenizer, config.calib_samples, config.seq_len, config.calib_seed
    )
    sequential, resequenced = [], {}
    for target in args.sequential_targets:
        member = front_member_at(front, target)
        if member is None:
            continue
        if member["trial"] not in resequenced:  # one member may stand for several targets
            plan = trial_plan(study.trials[member["trial"]])
            pruned = prune_sequentially(load_model(config.model), calib, plan)
            resequenced[member["trial"]] = perplexity(pruned, windows, progress=True)
            del pruned
        sequential.append({"trial": member["trial"], "target": target, "sparsity": member["sparsity"],
                           "one_shot_test_ppl": member["test_ppl"],
                           "test_ppl": resequenced[member["trial"]]})

    result = {
        "model": config.model,
        "study": config.study,
        "search": config.settings().stored(),
        "trials_in_study": len(study.trials),
        "trials_screened": sum(bool(t.user_attrs.get("proposed")) for t in study.trials),
        "test_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "front": front,
        "front_sequential": sequential,
        "baselines": baselines,
        "comparison": compare(front, sequential, baselines, args.targets),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_vs_baselines.json").write_text(json.dumps(result, indent=2))
    (args.out / "search_vs_baselines.md").write_text(markdown(result))
    plot(result, args.out / "search_vs_baselines.png")
    print(markdown(result))


def recorded_rows(targets: list[float], test_windows: int, seq_len: int) -> list[dict]:
    """Uniform rows ``baselines.py`` measured on the same windows (llm-compressor's, autoprune's
    ``--sequential``), from ``results/baselines.json`` when it exists."""
    path = HERE / "results" / "baselines.json"
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text())
    if (recorded.get("eval_windows"), recorded.get("seq_len")) != (test_windows, seq_len):
        return []
    settings = {f"{round(100 * t)}%": t for t in targets}
    return [
        {"kind": "uniform", "tool": row["tool"], "method": row["method"],
         "target": settings[row["setting"]], "test_ppl": row["ppl"], "sparsity": row["sparsity"],
         "linear_nonzeros": row["linear_nonzeros"]}
        for row in recorded["rows"]
        if (row["tool"] == "autoprune --sequential" or row["tool"].startswith("llm-compressor"))
        and row["method"] in ("wanda", "sparsegpt")
        and row["setting"] in settings
    ]


def front_member_at(front: list[dict], sparsity: float) -> dict | None:
    """The front member with the best test perplexity among those with at least ``sparsity``."""
    at_least = [row for row in front if row["sparsity"] >= sparsity - SPARSITY_TOLERANCE]
    return min(at_least, key=lambda row: row["test_ppl"]) if at_least else None


def front_at(front: list[dict], sparsity: float) -> tuple[float | None, float | None]:
    """The front's test perplexity at ``sparsity``: best member with at least that sparsity, and
    that envelope interpolated in log-perplexity (None outside the front's span)."""
    member = front_member_at(front, sparsity)
    conservative = member["test_ppl"] if member else None
    points = sorted((row["sparsity"], row["test_ppl"]) for row in front)
    envelope = [(s, min(p for s2, p in points if s2 >= s)) for s, _ in points]
    for (s0, p0), (s1, p1) in zip(envelope, envelope[1:]):
        if s0 <= sparsity <= s1 and s1 > s0:
            w = (sparsity - s0) / (s1 - s0)
            return conservative, math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return conservative, None


def compare(
    front: list[dict], sequential: list[dict], baselines: list[dict], targets: list[float]
) -> list[dict]:
    rows = []
    for target in targets:
        here = [b for b in baselines if b["target"] == target]
        uniform = min((b for b in here if b["kind"] == "uniform"), key=lambda b: b["test_ppl"])
        owl = min((b for b in here if b["kind"] == "owl"), key=lambda b: b["test_ppl"])
        front_ppl, interpolated = front_at(front, uniform["sparsity"])
        front_at_owl, _ = front_at(front, owl["sparsity"])
        resequenced = next((row for row in sequential if row["target"] == target), None)
        # The sequential re-prune is the member chosen at ``target``; it stands in the comparison
        # only when it has at least the best uniform's sparsity too.
        if resequenced and resequenced["sparsity"] < uniform["sparsity"] - SPARSITY_TOLERANCE:
            resequenced = None
        measured = [front_ppl, resequenced["test_ppl"] if resequenced else None]
        best = min((ppl for ppl in measured if ppl is not None), default=None)
        reduction = None if best is None else 1 - best / uniform["test_ppl"]
        rows.append({
            "target": target,
            "best_uniform": f"{uniform['tool']} {uniform['method']}",
            "best_uniform_ppl": uniform["test_ppl"],
            "best_owl": f"owl+{owl['method']}",
            "best_owl_ppl": owl["test_ppl"],
            "front_ppl": front_ppl,
            "front_ppl_interpolated": interpolated,
            "front_sequential_ppl": resequenced["test_ppl"] if resequenced else None,
            "reduction_vs_best_uniform": reduction,
            "meets_25pct": reduction is not None and reduction >= REQUIRED_REDUCTION,
            "beats_owl": front_at_owl is not None and front_at_owl < owl["test_ppl"],
        })
    return rows


def markdown(result: dict) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"{result['model']}: front of study `{result['study']}` ({result['trials_in_study']} trials, "
        f"{result.get('trials_screened', 0)} of them proposed by predictor screening, "
        f"space {result['search']['space']}, method {result['search']['method']}) against baselines, "
        f"WikiText-2 test perplexity on {result['test_windows']} windows of {result['seq_len']} tokens "
        "(never seen by the search). Front perplexity at a baseline's non-zeros = best front member "
        "with at least its sparsity, as the study measured it (one-shot from the cached dense "
        "statistics) and that member pruned again with `--sequential`; the reduction takes the "
        "better of the two.",
        "",
        "| target | best uniform | its ppl | best OWL | its ppl | front ppl | front (interp.) | "
        "front --sequential | reduction vs uniform | >= 25% | beats OWL |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for row in result["comparison"]:
        reduction = row["reduction_vs_best_uniform"]
        lines.append(
            f"| {row['target']:.0%} | {row['best_uniform']} | {number(row['best_uniform_ppl'])} | "
            f"{row['best_owl']} | {number(row['best_owl_ppl'])} | {number(row['front_ppl'])} | "
            f"{number(row['front_ppl_interpolated'])} | {number(row['front_sequential_ppl'])} | "
            f"{'-' if reduction is None else f'{reduction:.1%}'} | "
            f"{'yes' if row['meets_25pct'] else 'no'} | {'yes' if row['beats_owl'] else 'no'} |"
        )
    lines += ["", "| baseline | tool | method | target | sparsity | test ppl |", "|---|---|---|---:|---:|---:|"]
    for b in result["baselines"]:
        lines.append(f"| {b['kind']} | {b['tool']} | {b['method']} | {b['target']:.0%} | "
                     f"{b['sparsity']:.4f} | {b['test_ppl']:.2f} |")
    resequenced = {row["trial"]: row["test_ppl"] for row in result["front_sequential"]}
    lines += ["", "| front trial | sparsity | validation ppl | test ppl | test ppl, --sequential |",
              "|---:|---:|---:|---:|---:|"]
    for f in sorted(result["front"], key=lambda row: row["sparsity"]):
        lines.append(f"| {f['trial']} | {f['sparsity']:.4f} | {f['validation_ppl']:.2f} | "
                     f"{f['test_ppl']:.2f} | {number(resequenced.get(f['trial']))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    front = sorted(result["front"], key=lambda row: row["sparsity"])
    axes.plot([r["sparsity"] for r in front], [r["test_ppl"] for r in front], "o-", label="searched front")
    if result["front_sequential"]:
        axes.scatter([r["sparsity"] for r in result["front_sequential"]],
                     [r["test_ppl"] for r in result["front_sequential"]], marker="*", s=120,
                     color="tab:red", zorder=3, label="front member, --sequential")
    groups: dict[str, list[dict]] = {}
    for b in result["baselines"]:
        tool = "" if b["tool"] == "autoprune" else f" ({b['tool']})"
        groups.setdefault(f"{b['kind']} {b['method']}{tool}", []).append(b)
    for (label, rows), marker in zip(groups.items(), "sdv^<>P*X", strict=False):
        axes.scatter([r["sparsity"] for r in rows], [r["test_ppl"] for r in rows], marker=marker,
                     s=40, label=label)
    axes.legend(fontsize=8)
    axes.set(xlabel="sparsity (decoder linear weights removed)", ylabel="WikiText-2 test perplexity",
             yscale="log", title=f"{result['model']}: searched front vs baselines")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
