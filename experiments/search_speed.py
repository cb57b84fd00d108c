"""Where a search trial's time goes on SmolLM2-135M: pruning vs evaluation vs bookkeeping.

For each method, a short study over the layer-wise space runs through the real driver and storage
(a throw-away SQLite file), with early stopping off so every trial evaluates every window. Each
trial's recorded ``seconds`` split (prune / evaluate / bookkeeping, the last including the driver's
ask/cast/record time) is summarised over the steady-state trials; the first trial is reported on its
own because it also builds each method's per-model caches (SparseGPT's inverse-Hessian factors).
The issue's target: prune + bookkeeping under 25% of a trial's wall time. Writes
``results/search_speed.json`` and ``results/search_speed.md``.

    python experiments/search_speed.py [--methods wanda sparsegpt] [--trials 6] [--eval-windows 8]
        [--device cuda] [--eval-batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from autoprune.study import SearchConfig, run_search

HERE = Path(__file__).resolve().parent
PARTS = ("prune", "evaluate", "bookkeeping", "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared/data/wikitext-2"))
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the trials run (cpu, cuda)")
    parser.add_argument("--eval-batch", type=int, default=1, help="validation windows per forward")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    result = {
        "model": args.model,
        "eval_windows": args.eval_windows,
        "eval_batch": args.eval_batch,
        "seq_len": args.seq_len,
        "calib_samples": args.calib_samples,
        "threads": torch.get_num_threads(),
        "device": device_name(args.device),
        "methods": {method: measure(method, args) for method in args.methods},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "search_speed.md").write_text(markdown(result))
    print(markdown(result))


def measure(method: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(
            model=args.model, data=args.data, storage=f"sqlite:///{tmp}/speed.db", study=method,
            trials=args.trials, space="layerwise", method=method, eval_windows=args.eval_windows,
            seq_len=args.seq_len, calib_samples=args.calib_samples, early_stop_margin=None,
            threads=args.threads, device=args.device, eval_batch=args.eval_batch,
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
        "caches, excluded).",
        "",
        "| method | trials | prune s | evaluate s | bookkeeping s | total s | prune+bookkeeping share "
        "| s per window | first trial s | start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in result["methods"].items():
        mean = row["steady_mean"]
        lines.append(
            f"| {method} | {row['trials']} | {mean['prune']:.2f} | {mean['evaluate']:.2f} | "
            f"{mean['bookkeeping']:.2f} | {mean['total']:.2f} | "
            f"{100 * row['prune_and_bookkeeping_share']:.1f}% | {row['evaluate_seconds_per_window']:.2f} | "
            f"{row['first_trial']['total']:.2f} | {row['startup_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
