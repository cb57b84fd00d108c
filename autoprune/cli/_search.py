"""``autoprune search``: run or resume a multi-objective study, then print its front.

Every :class:`SearchConfig` key is also a flag (``sparsity_range`` is ``--sparsity-range LO HI``);
flags override the ``--config`` YAML. The flags are generated from the config's fields, so the two
can never disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from autoprune.cli._common import add_field_flags, add_format, given_field_flags, render
from autoprune.study import SearchConfig, run_search
from predictors import PredictorProposer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="search the Pareto front of size against quality")
    parser.add_argument("--config", type=Path, help="YAML file of search settings (flags override)")
    add_field_flags(parser, SearchConfig)
    add_format(parser, ("table", "json", "csv"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = SearchConfig.load(args.config, given_field_flags(args, SearchConfig))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    screening = PredictorProposer.for_search if config.predictor == "on" else None
    summary = run_search(config, progress=True, proposer_factory=screening)
    print(summary.line(), file=sys.stderr)
    print(render(summary.front, args.format))
    return 0

