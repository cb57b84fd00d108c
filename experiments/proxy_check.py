"""Which validation score predicts test perplexity among plans of one size: perplexity or KL?

A study ranks the candidates of one target (equal non-zeros) by its objective on a few validation
windows; what matters is their order on text the search never saw. For every complete trial of the
study at each ``--targets`` sparsity, this re-prunes its plan and measures, on the study's own
validation windows, the KL to the dense model (from the same forward passes as perplexity), and on
the first ``--test-windows`` WikiText-2 test windows the perplexity; then the Spearman correlation of
each validation score with test perplexity, and which trial each would pick.

Writes ``results/proxy_check.json`` and ``.md``.

    python experiments/proxy_check.py --storage sqlite:///runs/search_vs_baselines.db \
        --study search-vs-baselines --targets 0.6 0.65
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from scipy.stats import spearmanr

from autoprune.data import evaluation_windows
from autoprune.measure import kl_to_reference, perplexity
from autoprune.study import TrialWorker, load_existing_study, study_settings, trial_plan

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="sqlite:///runs/search_vs_baselines.db")
    parser.add_argument("--study", default="search-vs-baselines")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.65])
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    study = load_existing_study(args.storage, args.study)
    settings = study_settings(study)
    calibration = settings.calibration
    worker = TrialWorker(settings.model_copy(update={"objective": "kl"}).worker_spec())
    test = evaluation_windows(calibration.source, worker.loaded.tokenizer, settings.eval_seq_len,
                              args.test_windows)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows, summary = [], []
    for target in args.targets:
        group = [t for t in complete if abs(t.params.get("target", -1.0) - target) < 1e-9]
        for trial in group:
            with worker.pruner.applied(trial_plan(trial)) as model:
                row = {"target": target, "trial": trial.number, "validation_ppl": trial.values[1],
                       "validation_kl": kl_to_reference(model, worker.windows, worker.reference),
                       "test_ppl": perplexity(model, test)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        here = [row for row in rows if row["target"] == target]
        if len(here) < 3:
            continue
        test_ppl = [row["test_ppl"] for row in here]
        summary.append({
            "target": target,
            "trials": len(here),
            "spearman_validation_ppl": float(spearmanr([r["validation_ppl"] for r in here], test_ppl)[0]),
            "spearman_validation_kl": float(spearmanr([r["validation_kl"] for r in here], test_ppl)[0]),
            "best_on_test": min(here, key=lambda r: r["test_ppl"])["trial"],
            "picked_by_ppl": min(here, key=lambda r: r["validation_ppl"])["trial"],
            "picked_by_kl": min(here, key=lambda r: r["validation_kl"])["trial"],
        })
    result = {"study": args.study, "validation_windows": int(worker.windows.shape[0]),
              "test_windows": int(test.shape[0]), "summary": summary, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proxy_check.json").write_text(json.dumps(result, indent=2))
    (args.out / "proxy_check.md").write_text(markdown(result, {r["trial"]: r for r in rows}))
    print(markdown(result, {r["trial"]: r for r in rows}))


def markdown(result: dict, by_trial: dict[int, dict]) -> str:
    lines = [
        f"Study `{result['study']}`: complete trials of one target, validation score "
        f"({result['validation_windows']} windows) against WikiText-2 test perplexity "
        f"({result['test_windows']} windows).",
        "",
        "| target | trials | Spearman, validation ppl | Spearman, validation KL | best on test | "
        "picked by ppl (its test ppl) | picked by KL (its test ppl) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        best, by_ppl, by_kl = (by_trial[row[key]] for key in ("best_on_test", "picked_by_ppl", "picked_by_kl"))
        lines.append(
            f"| {row['target']:.0%} | {row['trials']} | {row['spearman_validation_ppl']:.2f} | "
            f"{row['spearman_validation_kl']:.2f} | {best['trial']} ({best['test_ppl']:.2f}) | "
            f"{by_ppl['trial']} ({by_ppl['test_ppl']:.2f}) | {by_kl['trial']} ({by_kl['test_ppl']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
