"""Where a search trial's time goes on SmolLM2-135M: pruning vs evaluation vs bookkeeping.

For each method, a short study over the layer-wise space runs through the real driver and storage
(a throw-away SQLite file), with early stopping off so every trial evaluates every window. Each
trial's recorded ``seconds`` split (prune / evaluate / bookkeeping, the last including the driver's
ask/cast/record time) is summarised over the steady-state trials; the first trial is reported on its
own because it also builds each method's per-model caches (SparseGPT's inverse-Hessian factors).
The issue's target: prune + bookkeeping under 25% of a trial's wall time. Writes
``results/search_speed.json`` and ``results/search_speed.md``.

    python experiments/search_speed.py [--methods wanda sparsegpt] [--trials 6] [--eval-windows 8]
        [--device cuda] [--eval-batch 8] [--database]

With ``--database`` each method's study runs twice on one fresh variant database: the first run
prunes and stores the layers its plans ask for, the second (same seed, so the same plans) reads
them, which is what a trial costs once the database holds its levels (a search's later trials,
``autoprune database build``, or any later search on the same model and calibration).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import optuna
import torch
from optuna.trial import TrialState

from _common import (
    Column,
    add_model_data,
    add_out,
    add_threads,
    apply_threads,
    parser,
    table,
    write_results,
)

from autoprune.study import SearchConfig, run_search

PARTS = ("prune", "evaluate", "bookkeeping", "total")
#: One row per method; the means are of the steady-state trials.
COLUMNS = [
    Column("method", lambda row: row["method"], "---"), Column("trials", lambda row: row["trials"]),
    *(Column(f"{part} s", lambda row, part=part: f"{row[part]:.2f}") for part in PARTS),
    Column("prune+bookkeeping share", lambda row: f"{100 * row['prune_and_bookkeeping_share']:.1f}%"),
    Column("s per window", lambda row: f"{row['evaluate_seconds_per_window']:.2f}"),
    Column("first trial s", lambda row: f"{row['first_trial']['total']:.2f}"),
    Column("start-up s", lambda row: f"{row['startup_seconds']:.1f}"),
]


def main() -> None:
    arguments = parser(__doc__)
    add_model_data(arguments)
    arguments.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    arguments.add_argument("--trials", type=int, default=6)
    arguments.add_argument("--eval-windows", type=int, default=8)
    arguments.add_argument("--calib-samples", type=int, default=128)
    arguments.add_argument("--seq-len", type=int, default=512)
    add_threads(arguments)
    arguments.add_argument("--device", default="cpu", help="where the trials run (cpu, cuda)")
    arguments.add_argument("--eval-batch", type=int, default=1, help="validation windows per forward")
    arguments.add_argument("--database", action="store_true",
                           help="trials from a variant database: each method's study runs twice on one "
                           "fresh database, first building the layers it asks for, then reading them")
    add_out(arguments)
    args = arguments.parse_args()
    apply_threads(args)

    result = {
        "model": args.model,
        "eval_windows": args.eval_windows,
        "eval_batch": args.eval_batch,
        "seq_len": args.seq_len,
        "calib_samples": args.calib_samples,
        "threads": torch.get_num_threads(),
        "device": device_name(args.device),
        "database": args.database,
        "methods": measure_all(args),
    }
    print(write_results(result, args.out, "search_speed", markdown(result)), end="")


def measure_all(args: argparse.Namespace) -> dict[str, dict]:
    """A row per method; with ``--database``, two: the study that builds its variants, and the
    same study (same seed, same plans) again once the database holds them."""
    if not args.database:
        return {method: measure(method, args) for method in args.methods}
    rows = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="autoprune-db-") as folder:
            rows[f"{method}, database building"] = measure(method, args, folder)
            rows[f"{method}, database built"] = measure(method, args, folder)
    return rows


def measure(method: str, args: argparse.Namespace, database: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(
            model=args.model, data=args.data, storage=f"sqlite:///{tmp}/speed.db", study=method,
            trials=args.trials, space="layerwise", method=method, eval_windows=args.eval_windows,
            seq_len=args.seq_len, calib_samples=args.calib_samples, early_stop_margin=None,
            threads=args.threads, device=args.device, eval_batch=args.eval_batch,
            database=database is not None, database_dir=database, refine_targets=[],
        )
        start = time.perf_counter()
        run_search(config, progress=True)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=method, storage=config.storage)
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seconds = [trial.user_attrs["seconds"] for trial in trials]
    steady = seconds[1:] or seconds
    means = {part: statistics.fmean(s[part] for s in steady) for part in PARTS}
    return {
        "trials": len(trials),
        "first_trial": seconds[0],
        "steady_mean": {part: round(value, 3) for part, value in means.items()},
        "steady_median_total": round(statistics.median(s["total"] for s in steady), 3),
        "prune_and_bookkeeping_share": round((means["prune"] + means["bookkeeping"]) / means["total"], 3),
        "evaluate_seconds_per_window": round(means["evaluate"] / args.eval_windows, 3),
        "startup_seconds": round(wall - sum(s["total"] for s in seconds), 1),
    }


def device_name(device: str) -> str:
    """The device as a reader of the results needs it: the GPU's model, or the CPU."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']}, layer-wise space, {result['eval_windows']} validation windows of "
        f"{result['seq_len']} tokens per trial ({result['eval_batch']} per forward pass), "
        f"{result['threads']} torch threads, device "
        f"{result['device']}; steady-state means (first trial, which builds per-model "
        "caches, excluded)"
        + ("; plans assembled from a variant database." if result.get("database") else "."),
        "",
    ]
    rows = [{"method": method, **row, **row["steady_mean"]} for method, row in result["methods"].items()]
    lines += table(rows, COLUMNS)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
