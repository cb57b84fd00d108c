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

import json

from _common import Column, parse, study_parser, table, write_results
from optuna.trial import TrialState
from scipy.stats import spearmanr

from autoprune.data import evaluation_windows
from autoprune.measure import kl_to_reference, perplexity
from autoprune.study import TrialWorker, load_existing_study, study_settings, trial_plan


def main() -> None:
    arguments = study_parser(__doc__)
    arguments.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.65])
    arguments.add_argument("--test-windows", type=int, default=16)
    args = parse(arguments)

    study = load_existing_study(args.storage, args.study)
    settings = study_settings(study)
    worker = TrialWorker(settings.worker_spec().model_copy(update={"objective": "kl"}))
    test = evaluation_windows(settings.calibration.source, worker.loaded.tokenizer,
                              settings.eval_seq_len, args.test_windows)
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
    print(write_results(result, args.out, "proxy_check", markdown(result)), end="")


def markdown(result: dict) -> str:
    """The summary table, each pick with its test perplexity."""
    by_trial = {row["trial"]: row for row in result["rows"]}

    def pick(title: str, key: str) -> Column:
        return Column(title, lambda row: f"{row[key]} ({by_trial[row[key]]['test_ppl']:.2f})")

    columns = [
        Column("target", lambda row: f"{row['target']:.0%}"),
        Column("trials", lambda row: row["trials"]),
        Column("Spearman, validation ppl", lambda row: f"{row['spearman_validation_ppl']:.2f}"),
        Column("Spearman, validation KL", lambda row: f"{row['spearman_validation_kl']:.2f}"),
        pick("best on test", "best_on_test"),
        pick("picked by ppl (its test ppl)", "picked_by_ppl"),
        pick("picked by KL (its test ppl)", "picked_by_kl"),
    ]
    return "\n".join([
        f"Study `{result['study']}`: complete trials of one target, validation score "
        f"({result['validation_windows']} windows) against WikiText-2 test perplexity "
        f"({result['test_windows']} windows).",
        "",
        *table(result["summary"], columns),
    ]) + "\n"

if __name__ == "__main__":
    main()
