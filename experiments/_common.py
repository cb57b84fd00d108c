"""What the experiment scripts share: their common arguments, reading a study's settings and
preparing its model, measuring a plan one-shot or ``--sequential``, and writing results.

Each script keeps only what is its own (which rows it measures, how it compares them); the rest
lives here once, so that two scripts cannot measure "the same" thing in two different ways and a
change of the library's API is made in one place.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

import optuna
import torch

from autoprune import Pruner
from autoprune.api import prepare_with_windows
from autoprune.data import evaluation_windows
from autoprune.measure import SizeReport, measure_size, perplexity
from autoprune.models import LoadedModel, load_model
from autoprune.plan import Plan
from autoprune.pruner import prune_sequentially
from autoprune.study import StudySettings, load_existing_study, study_settings

# the arguments and results writing that need no torch, re-exported: scripts import them from here
from _writing import (  # noqa: F401
    HERE, RESULTS, Column, add_out, add_threads, column, number, out_option, parser, table, write_results,
)

#: WikiText-2 in its raw layout, beside the repository (``/work/shared/data/wikitext-2``).
DEFAULT_DATA = str(HERE.parent.parent / "shared/data/wikitext-2")
#: The study ``search_vs_baselines.py`` makes, which the later experiments read.
DEFAULT_STORAGE = "sqlite:///runs/search_vs_baselines.db"
DEFAULT_STUDY = "search-vs-baselines"
#: The project's bar: at 60% and 70%, at least this much lower perplexity than the best uniform.
REQUIRED_REDUCTION = 0.25


# --- arguments (``parser``, ``add_out``, ``add_threads``: in ``_writing``) ---------------------

def add_study(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--storage`` and ``--study``: an existing study made by ``autoprune search``."""
    defaults = {"required": True} if required else {}
    parser.add_argument("--storage", **(defaults or {"default": DEFAULT_STORAGE}))
    parser.add_argument("--study", **(defaults or {"default": DEFAULT_STUDY}))


def add_model_data(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--data``: SmolLM2-135M and the local WikiText-2 by default."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=DEFAULT_DATA)


def study_parser(doc: str | None, required: bool = False, out: Path = RESULTS) -> argparse.ArgumentParser:
    """A parser with the arguments of every script that reads a study: ``--storage``/``--study``,
    ``--threads`` and ``--out``."""
    arguments = parser(doc)
    add_study(arguments, required)
    add_threads(arguments)
    add_out(arguments, out)
    return arguments


def parse(arguments: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments, with :func:`apply_threads` applied."""
    args = arguments.parse_args()
    apply_threads(args)
    return args


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's threads from ``--threads`` (when given) and keep Optuna's log to warnings, so
    a script's own progress lines are readable."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- a study's settings and model -------------------------------------------------------------

class StudySetup(NamedTuple):
    """A study with its model prepared as the study measured it, and WikiText-2 test windows."""

    study: optuna.Study
    settings: StudySettings
    loaded: LoadedModel
    calib: torch.Tensor
    pruner: Pruner
    windows: torch.Tensor


def load_study_setup(storage: str, name: str, test_windows: int | None = None) -> StudySetup:
    """Load the study, its model and cached calibration statistics, a pruner on them, and the
    first ``test_windows`` windows of the test split (all of it when None)."""
    study = load_existing_study(storage, name)
    settings = study_settings(study)
    prepared = prepare_with_windows(settings.model, settings.calibration, None, True)
    loaded = prepared.loaded
    windows = evaluation_windows(settings.calibration.source, loaded.tokenizer, settings.eval_seq_len,
                                 test_windows)
    return StudySetup(study, settings, loaded, prepared.windows, Pruner(loaded, prepared.stats), windows)


# --- measuring a plan -----------------------------------------------------------------------

class Measured(NamedTuple):
    """A pruned model's perplexity, size and the seconds its pruning took."""

    ppl: float
    size: SizeReport
    prune_seconds: float


def measure_one_shot(pruner: Pruner, plan: Plan, windows: torch.Tensor, progress: bool = True) -> Measured:
    """``plan`` pruned from the pruner's cached statistics, as a search trial prunes it (the
    first call of a method also builds its per-model caches, counted in its prune seconds)."""
    start = time.perf_counter()
    with pruner.applied(plan) as model:  # a sub-network plan: the cut model
        prune_seconds = time.perf_counter() - start
        size = measure_size(model, pruner.loaded.adapter, pruner.dense_linear_params)
        return Measured(perplexity(model, windows, progress=progress), size, prune_seconds)


def measure_sequential(
    model: str, calib: torch.Tensor, plan: Plan, windows: torch.Tensor, dense_linear: int,
    progress: bool = True,
) -> Measured:
    """``autoprune prune --sequential``: a fresh copy of ``model`` pruned block after block from
    the statistics of the already-pruned blocks; the prune seconds include that calibration pass."""
    loaded = load_model(model)
    start = time.perf_counter()
    pruned = prune_sequentially(loaded, calib, plan)
    prune_seconds = time.perf_counter() - start
    size = measure_size(pruned, loaded.adapter, dense_linear)
    return Measured(perplexity(pruned, windows, progress=progress), size, prune_seconds)
