"""``autoprune front``: the non-dominated trials of a study, as a table, JSON or CSV, and a plot.

It only reads: the storage must exist and hold the study (nothing is ever created by a query).
``--tasks`` is the exception: it scores the front's members on lm-eval tasks and records the
scores in the study (``tasks:<trial>``); every later ``front`` shows them.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoprune.cli._common import add_device_flag, add_format, render
from autoprune.cli._eval import add_task_flags, check_task_flags
from autoprune.errors import AutopruneError
from autoprune.study import (
    DEFAULT_STORAGE,
    front_trials,
    load_existing_study,
    member_row,
    recorded_task_scores,
    score_trials_on_tasks,
    study_settings,
    trial_row,
)

PLOT_SUFFIXES = (".png", ".html")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("front", help="print the Pareto front of a study")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL or path")
    parser.add_argument("--study", required=True, help="study name")
    add_format(parser, ("table", "json", "csv"))
    parser.add_argument("--plot", type=Path, help="also plot all trials and the front (.png/.html)")
    add_task_flags(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="calibration cache (--tasks)")
    add_device_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_task_flags(args)
    if args.plot is not None:
        check_plot_path(args.plot)
    study = load_existing_study(args.storage, args.study)
    front = front_trials(study)
    if args.tasks is not None:
        score_trials_on_tasks(study, front, args.tasks, args.include_path, args.limit,
                              args.device, args.cache_dir)
    print(render([front_row(study, trial) for trial in front], args.format))
    if args.plot is not None:
        plot_front(study, front, args.plot)
    return 0


def front_row(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    """:func:`member_row` (the trial and its healed perplexity) with the trial's recorded task
    accuracies, one ``acc:<task>`` column each."""
    row = member_row(study, trial)
    for task, score in recorded_task_scores(study, trial.number).items():
        row[f"acc:{task}"] = score.get("acc")
    return row


def check_plot_path(path: Path) -> None:
    """Fail before any work on a plot we could not write."""
    if path.suffix not in PLOT_SUFFIXES:
        raise AutopruneError(f"--plot must end in {' or '.join(PLOT_SUFFIXES)}, got {path.name}")
    if path.suffix == ".html" and importlib.util.find_spec("plotly") is None:
        raise AutopruneError("--plot .html needs plotly (pip install plotly); .png needs nothing more")
    if not path.parent.is_dir():
        raise AutopruneError(f"--plot folder {path.parent} does not exist")


def plot_front(study: optuna.Study, front: list[optuna.trial.FrozenTrial], path: Path) -> None:
    """Perplexity against sparsity: every complete trial, the front joined, baselines labelled."""
    if path.suffix == ".html":
        figure = optuna.visualization.plot_pareto_front(
            study, target_names=["decoder linear non-zeros", "quality"]
        )
        figure.write_html(str(path))
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    complete = [trial_row(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    gguf = "gguf_bytes" in study_settings(study).costs
    x = (lambda row: row["gguf_bytes"] / 1e6) if gguf else (lambda row: row["sparsity"])
    rows = sorted((trial_row(t) for t in front), key=x)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter([x(r) for r in complete], [r["ppl"] for r in complete], s=12, color="0.7", label="complete trials")
    axes.plot([x(r) for r in rows], [r["ppl"] for r in rows], "o-", color="C0", label="front")
    for row in complete:
        if row["baseline"]:
            axes.annotate(row["baseline"], (x(row), row["ppl"]), fontsize=7, color="C3")
    xlabel = "GGUF file (MB)" if gguf else "sparsity (decoder linear weights removed)"
    axes.set(xlabel=xlabel, ylabel="validation perplexity", yscale="log", title=f"study {study.study_name}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
