"""``autoprune refine``: give each linear layer of one trial its own sparsity, at the same size
(or, for a sub-network trial, each block its own FFN width and head count, within one level).

Runs the level-switch evolution of :mod:`autoprune.study.refine` on ``--trial``'s plan and adds the
result to the study as a new trial (``refined_from`` names the parent), which ``front`` lists and
``export`` writes like any other. Every :class:`RefineConfig` key is a flag.
"""

from __future__ import annotations

import argparse
import sys

import optuna

from autoprune.cli._common import add_field_flags, add_format, given_field_flags, render
from autoprune.study import RefineConfig, refine_trial


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "refine", help="per-layer (or per-block width) evolution of one trial's plan, added to its study"
    )
    add_field_flags(parser, RefineConfig)
    add_format(parser, ("table", "json", "csv"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = RefineConfig.model_validate(given_field_flags(args, RefineConfig))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary = refine_trial(config, progress=True)
    print(summary.line(), file=sys.stderr)
    print(render([summary.row], args.format))
    return 0
