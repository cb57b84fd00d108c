"""Hypervolume against real evaluations: NSGA-II, TPE and predictor-screened search (SmolLM2-135M).

Every run is a real ``run_search`` study (layer-wise space, Wanda, 40-80% sparsity, early stopping
off) in one SQLite file, all sharing one in-process worker whose results are memoized by plan
digest: the baselines and seeds every study starts with are measured once per experiment, and a
run's count of evaluations is still every trial it submitted. Fidelity is cheap but real: each
candidate is pruned and its perplexity measured on ``--eval-windows`` validation windows of
``--eval-seq-len`` tokens (calibration statistics stay the cached 128 x 512-token ones).

- Hypervolume: of the complete trials' (kept fraction of decoder linear weights, ln perplexity),
  both minimized, against a fixed reference point: kept fraction ``1 - LO + 0.02`` and the
  uniform@HI baseline's ln perplexity plus 0.1 (the same measured plan in every run, so the point
  is the same for every method and seed), computed by moocore.
- The bar: predictor-screened search reaches the median (over seeds) of NSGA-II's hypervolume after
  ``--evaluations`` evaluations within ``--bar-evaluations`` evaluations, median of the seeds.
- The predictor's quality: ``quality_report`` (30% held out, 5-fold) on each NSGA-II study.

Budget (defaults): 3 seeds of NSGA-II (120 evaluations), TPE (80, a reference) and screened search
(60: the 12 baselines and seeds, 4 random warm-up trials, then screened picks), several hundred
distinct plans (what they cost is in ``experiments/README.md``). Resumable: rerunning continues the studies (the memo starts empty again). Writes
``predictor_efficiency.json``, ``.md`` and ``.png`` under ``--out``.

    nice -n 15 python experiments/predictor_efficiency.py --threads 1
    # smoke test (minutes): add --seeds 0 --evaluations 12 --tpe-evaluations 12
    #     --predictor-evaluations 24 --storage sqlite:////tmp/pe_smoke.db --out /tmp/pe_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any

import moocore
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from _common import (
    Column,
    add_model_data,
    add_out,
    add_threads,
    apply_threads,
    table,
    write_results,
)
from _common import parser as parser_for

from autoprune.plan import MethodName
from autoprune.study import (
    Executor,
    InProcessExecutor,
    SearchConfig,
    TrialResult,
    WorkerSpec,
    load_existing_study,
    run_search,
    trial_plan,
)
from autoprune.study._driver import plan_digest
from autoprune.study._records import ORPHANED
from predictors import Featurizer, PredictorProposer, quality_report, training_set
from predictors.screening import ENSEMBLE, EXPLORE_SHARE, MIN_CANDIDATES, PESSIMISM
from search_spaces import SearchSpace, SpaceContext

METHODS = ("nsga2", "predictor", "tpe")
#: Margins of the reference point beyond the worst kept fraction and the uniform@HI ln perplexity.
REFERENCE_MARGINS = (0.02, 0.1)


class MemoizedExecutor(InProcessExecutor):
    """The in-process executor, but a plan measured before (by digest) is answered from memory.

    A trial is the worker's own pruning and perplexity measurement; its size is the plan's exact
    non-zero count (:meth:`SpaceContext.nonzeros`), which skips the worker's byte accounting of
    every layer: that accounting costs as much as the pruning and no objective reads it.
    """

    def __init__(self, spec: WorkerSpec, method: MethodName, sparsity_range: tuple[float, float]) -> None:
        super().__init__(spec, progress=True)
        self.worker = self._worker
        self.ctx = self.worker.space_context(method, sparsity_range)
        self.memo: dict[str, TrialResult] = {}
        self.measured = 0

    def results(self, timeout: float | None = None) -> list[TrialResult]:
        if not self._pending:
            return []
        request = self._pending.popleft()
        digest = plan_digest(request.plan)
        if digest not in self.memo:
            start = time.perf_counter()
            nonzeros = self.ctx.nonzeros(request.plan)
            size = {"linear_nonzeros": nonzeros, "sparsity": round(self.ctx.sparsity(request.plan), 6)}
            with self.worker.pruner.applied(request.plan) as model:
                result = self.worker._measure(model, request, size)  # the worker's measurement
            result.seconds = {"total": round(time.perf_counter() - start, 4)}
            self.memo[digest] = result
            self.measured += 1
        return [dataclasses.replace(self.memo[digest], number=request.number)]

    def space_context(self, method: MethodName, sparsity_range: tuple[float, float]) -> SpaceContext:
        if (method, tuple(sparsity_range)) == (self.ctx.method, self.ctx.sparsity_range):
            return self.ctx
        return self.worker.space_context(method, sparsity_range)


def main() -> None:
    parser = parser_for(__doc__)
    add_model_data(parser)
    parser.add_argument("--storage", default="sqlite:///runs/predictor_efficiency.db")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--evaluations", type=int, default=120, help="per NSGA-II run")
    parser.add_argument("--tpe-evaluations", type=int, default=80, help="per TPE run (a reference)")
    parser.add_argument("--predictor-evaluations", type=int, default=60, help="per screened run")
    parser.add_argument("--bar-evaluations", type=int, default=40)
    parser.add_argument("--population", type=int, default=16, help="NSGA-II population, TPE start-up")
    parser.add_argument("--predictor-population", type=int, default=4, help="random warm-up trials")
    parser.add_argument("--candidates", type=int, default=MIN_CANDIDATES,
                        help="candidates screened per round (at least 20 per pick)")
    parser.add_argument("--explore", type=float, default=EXPLORE_SHARE, help="random share of picks")
    parser.add_argument("--ensemble", type=int, default=ENSEMBLE, help="predictors fitted per round")
    parser.add_argument("--pessimism", type=float, default=PESSIMISM,
                        help="ensemble standard deviations added to the predicted log-ppl")
    parser.add_argument("--sparsity-range", nargs=2, type=float, default=(0.4, 0.8))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window tokens")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    add_threads(parser, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_out(parser)
    args = parser.parse_args()
    apply_threads(args)
    started = time.perf_counter()

    base = SearchConfig(
        model=args.model, data=args.data, storage=args.storage, space="layerwise", method="wanda",
        sparsity_range=tuple(args.sparsity_range), eval_windows=args.eval_windows,
        early_stop_margin=None, threads=args.threads, population=args.population,
        calib_samples=args.calib_samples, seq_len=args.seq_len, database=False, refine_targets=[],
    )
    spec = base.worker_spec().model_copy(update={"eval_seq_len": args.eval_seq_len})
    executor = MemoizedExecutor(spec, base.method, base.sparsity_range)
    space, ctx = SearchSpace.named(base.space), executor.ctx
    featurizer = Featurizer.from_model(executor.worker.loaded, executor.worker.stats, ctx)
    setup_seconds = time.perf_counter() - started

    runs: dict[str, dict[int, dict[str, Any]]] = {method: {} for method in args.methods}
    for method in args.methods:
        for seed in args.seeds:
            config = run_config(base, method, seed, args)
            proposer = None
            if method == "predictor":
                proposer = PredictorProposer(
                    space, ctx, featurizer, space.distributions(ctx), config.population, seed=seed,
                    min_candidates=args.candidates, explore=args.explore, ensemble=args.ensemble,
                    pessimism=args.pessimism,
                )
            study = run_until_evaluated(config, executor, proposer)
            runs[method][seed] = {"study": config.study, "trials": evaluated(study)}
            print(f"{config.study}: {len(runs[method][seed]['trials'])} evaluations, "
                  f"{executor.measured} plans measured in this invocation", flush=True)

    reference = reference_point(runs, args.sparsity_range)
    curves = {m: {s: hypervolume_curve(r["trials"], ctx, reference) for s, r in seeds.items()}
              for m, seeds in runs.items()}
    reports = {}
    for seed, run in runs.get("nsga2", {}).items():
        study = load_existing_study(base.storage, run["study"])
        reports[run["study"]] = quality_report(training_set(study, featurizer), featurizer.schema)
    result = {
        "model": args.model,
        "space": base.space,
        "method": base.method,
        "sparsity_range": list(args.sparsity_range),
        "eval_windows": args.eval_windows,
        "eval_seq_len": args.eval_seq_len,
        "calibration": base.calibration().model_dump(),
        "threads": args.threads,
        "seeds": args.seeds,
        "population": args.population,
        "predictor_population": args.predictor_population,
        "candidates_per_round": args.candidates,
        "screening": {"explore": args.explore, "ensemble": args.ensemble, "pessimism": args.pessimism},
        "reference_point": list(reference),
        "hypervolume": curves,
        "bar": bar(curves, args.evaluations, args.bar_evaluations),
        "quality_reports": reports,
        **costs(runs),
        "setup_seconds": round(setup_seconds, 1),
        "invocation_seconds": round(time.perf_counter() - started, 1),
    }
    text = write_results(result, args.out, "predictor_efficiency", markdown(result))
    plot(result, args.out / "predictor_efficiency.png")
    print(text, end="")


def run_config(base: SearchConfig, method: str, seed: int, args: argparse.Namespace) -> SearchConfig:
    """NSGA-II and TPE as configured; predictor-screened search warms up with NSGA-II's random
    first generation of ``--predictor-population`` trials."""
    screened = method == "predictor"
    return base.model_copy(update={
        "study": f"{method}-s{seed}",
        "sampler": "nsga2" if screened else method,
        "seed": seed,
        "trials": {"predictor": args.predictor_evaluations, "tpe": args.tpe_evaluations}.get(
            method, args.evaluations
        ),
        "population": args.predictor_population if screened else args.population,
    })


def run_until_evaluated(
    config: SearchConfig, executor: Executor, proposer: PredictorProposer | None
) -> optuna.Study:
    """Run (or resume) the study until it holds ``config.trials`` evaluations: a duplicate plan is
    told FAIL unmeasured yet counts toward the driver's budget, so the budget grows by the gap."""
    wanted = config.trials
    while True:
        run_search(config, executor=executor, proposer=proposer, progress=False)
        study = load_existing_study(config.storage, config.study)
        gap = wanted - len(evaluated(study))
        if gap <= 0:
            return study
        config = config.model_copy(update={"trials": config.trials + gap})


def evaluated(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial that cost an evaluation, in order: not duplicates (never measured) nor orphans
    (measured again as the trial that re-runs them)."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        if trial.user_attrs.get("reason") in ("duplicate", ORPHANED):
            continue
        rows.append(row(trial))
    return rows


def row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "complete": trial.state == TrialState.COMPLETE,
        "nonzeros": trial.values[0] if trial.values else None,
        "ppl": attrs.get("ppl"),
        "predicted_ppl": attrs.get("predicted_ppl"),
        "baseline": attrs.get("baseline"),
        "digest": plan_digest(trial_plan(trial)),
        "seconds": (attrs.get("seconds") or {}).get("total", 0.0),
        "started": trial.datetime_start.timestamp(),
        "finished": trial.datetime_complete.timestamp(),
    }


def costs(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Measurement time, read from the studies (so a resumed experiment reports the same): per
    distinct plan once, per run as if alone (memoized plans at their original cost), and each run's
    wall time from its first trial's start to its last trial's end (driver and proposer included)."""
    distinct: dict[str, float] = {}
    for seeds in runs.values():
        for run in seeds.values():
            for trial in run["trials"]:
                distinct.setdefault(trial["digest"], trial["seconds"])
    return {
        "distinct_plans_measured": len(distinct),
        "measurement_seconds": round(sum(distinct.values()), 1),
        "seconds_per_measurement": round(statistics.mean(distinct.values()), 2) if distinct else None,
        "run_seconds": {
            method: {
                seed: {"measurement": round(sum(t["seconds"] for t in run["trials"]), 1),
                       "wall": round(run["trials"][-1]["finished"] - run["trials"][0]["started"], 1)}
                for seed, run in seeds.items()
            }
            for method, seeds in runs.items()
        },
    }


def reference_point(
    runs: dict[str, dict[int, dict[str, Any]]], sparsity_range: tuple[float, float]
) -> tuple[float, float]:
    """Kept fraction just beyond the densest target; ln perplexity just above uniform@HI's."""
    label = f"uniform@{sparsity_range[1]:.2f}"
    worst = next(
        r["ppl"] for seeds in runs.values() for run in seeds.values() for r in run["trials"]
        if r["baseline"] == label
    )
    return (1.0 - sparsity_range[0] + REFERENCE_MARGINS[0], math.log(worst) + REFERENCE_MARGINS[1])


def hypervolume_curve(
    trials: list[dict[str, Any]], ctx: SpaceContext, reference: tuple[float, float]
) -> list[float]:
    """Hypervolume of the complete trials among the first k evaluations, for every k."""
    points: list[tuple[float, float]] = []
    curve = []
    for trial in trials:
        if trial["complete"] and trial["ppl"] is not None:
            point = (trial["nonzeros"] / ctx.dense_linear_params, math.log(trial["ppl"]))
            if point[0] < reference[0] and point[1] < reference[1]:
                points.append(point)
        curve.append(float(moocore.hypervolume(np.array(points), ref=reference)) if points else 0.0)
    return curve


def bar(curves: dict[str, dict[int, list[float]]], evaluations: int, limit: int) -> dict[str, Any]:
    """Evaluations predictor-screened search needs to reach NSGA-II's median hypervolume at
    ``evaluations``, per seed (None: not within its run), and whether the median is ``<= limit``."""
    if not curves.get("nsga2") or not curves.get("predictor"):
        return {}
    target = statistics.median(curve[min(evaluations, len(curve)) - 1] for curve in curves["nsga2"].values())
    reached = {seed: next((k + 1 for k, hv in enumerate(curve) if hv >= target), None)
               for seed, curve in curves["predictor"].items()}
    paired = {
        seed: next((k + 1 for k, hv in enumerate(curve)
                    if hv >= curves["nsga2"][seed][min(evaluations, len(curves["nsga2"][seed])) - 1]), None)
        for seed, curve in curves["predictor"].items() if seed in curves["nsga2"]
    }
    counts = [math.inf if n is None else n for n in reached.values()]
    median = statistics.median(counts)
    return {
        "nsga2_evaluations": evaluations,
        "nsga2_median_hypervolume": target,
        "predictor_evaluations_to_reach": reached,
        "predictor_evaluations_to_reach_same_seed": paired,
        "median_evaluations": None if math.isinf(median) else median,
        "limit": limit,
        "met": median <= limit,
    }


def markdown(result: dict[str, Any]) -> str:
    marks = [20, 40, 60, 80, 120]
    lines = [
        f"# Predictor-screened search vs NSGA-II and TPE ({result['model']})",
        "",
        f"Space `{result['space']}`, method `{result['method']}`, sparsity "
        f"{result['sparsity_range'][0]:.0%}-{result['sparsity_range'][1]:.0%}; every evaluation is a "
        f"real prune + perplexity on {result['eval_windows']} x {result['eval_seq_len']}-token "
        f"validation window(s). Hypervolume of (kept fraction, ln ppl) against the reference point "
        f"({result['reference_point'][0]:.3f}, {result['reference_point'][1]:.3f}); "
        f"{len(result['seeds'])} seeds per method.",
        "",
    ]
    curves = [{"method": method, "seed": seed, "curve": curve}
              for method, seeds in result["hypervolume"].items() for seed, curve in seeds.items()]
    lines += table(curves, [
        Column("method", lambda row: row["method"], "---"), Column("seed", lambda row: row["seed"], "---"),
        *(Column(f"HV@{m}", lambda row, m=m: f"{row['curve'][m - 1]:.4f}" if len(row["curve"]) >= m else "",
                 "---") for m in marks),
        Column("evaluations", lambda row: len(row["curve"]), "---"),
    ])
    found = result["bar"]
    if found:
        lines += [
            "",
            f"NSGA-II median hypervolume after {found['nsga2_evaluations']} evaluations: "
            f"{found['nsga2_median_hypervolume']:.4f}. Predictor-screened search reaches it after "
            f"{by_seed(found['predictor_evaluations_to_reach'])} evaluations (by seed; same-seed NSGA-II "
            f"targets: {by_seed(found['predictor_evaluations_to_reach_same_seed'])}); median "
            f"{found['median_evaluations']} (bar: <= {found['limit']}, "
            f"{'met' if found['met'] else 'NOT met'}).",
        ]
    reports = [{"study": name, **report} for name, report in result["quality_reports"].items()]
    lines += ["", *table(reports, [
        Column("study (held-out 30%)", lambda row: row["study"], "---"),
        Column("trials", lambda row: row["trials"], "---"),
        Column("Spearman", lambda row: f"{row['spearman']:.3f}", "---"),
        Column("Kendall", lambda row: f"{row['kendall']:.3f}", "---"),
        Column("MAPE", lambda row: f"{row['mape']:.1%}", "---"),
        Column("front in top quartile", lambda row: f"{row['front_top_quartile']:.2f}", "---"),
        Column("5-fold Spearman", lambda row: f"{row['kfold']['regression']['spearman']['mean']:.3f}", "---"),
    ])]
    walls = [s["wall"] for seeds in result["run_seconds"].values() for s in seeds.values()]
    lines += ["", f"{result['distinct_plans_measured']} distinct plans measured, "
              f"{result['seconds_per_measurement']} s each on {result['threads']} thread(s) (shared "
              f"CPU): {result['measurement_seconds'] / 60:.1f} minutes of measurement, "
              f"{sum(walls) / 60:.1f} minutes of run wall time in all."]
    return "\n".join(lines) + "\n"


def by_seed(values: dict) -> str:
    """``{seed: value}`` as Python prints it with integer seeds, also once JSON made them strings."""
    return "{" + ", ".join(f"{seed}: {value}" for seed, value in values.items()) + "}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for color, (method, seeds) in zip(("C0", "C3", "C2"), result["hypervolume"].items(), strict=False):
        length = min(len(curve) for curve in seeds.values())
        stacked = np.array([curve[:length] for curve in seeds.values()])
        x = np.arange(1, length + 1)
        axes.plot(x, np.median(stacked, axis=0), color=color, label=f"{method} (median of {len(seeds)})")
        axes.fill_between(x, stacked.min(axis=0), stacked.max(axis=0), color=color, alpha=0.2)
    found = result["bar"]
    if found:
        axes.axhline(found["nsga2_median_hypervolume"], color="0.4", ls="--", lw=1,
                     label=f"NSGA-II at {found['nsga2_evaluations']}")
        axes.axvline(found["limit"], color="0.6", ls=":", lw=1)
    axes.set(xlabel="real evaluations", ylabel="hypervolume (kept fraction, ln ppl)",
             title=f"{result['model']}: hypervolume against evaluations")
    bottom = min(min(c[len(c) // 8] for c in seeds.values()) for seeds in result["hypervolume"].values())
    axes.set_ylim(bottom=bottom)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
