"""``autoprune search``: run or resume a multi-objective study, then print its front.

Every :class:`SearchConfig` key is also a flag (``sparsity_range`` is ``--sparsity-range LO HI``);
flags override the ``--config`` YAML. The flags are generated from the config's fields, so the two
can never disagree.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

import optuna

from autoprune.cli._common import add_format, render
from autoprune.study import SearchConfig, run_search


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="search the Pareto front of size against quality")
    parser.add_argument("--config", type=Path, help="YAML file of search settings (flags override)")
    for name, field in SearchConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        nargs = _nargs(field.annotation)
        metavar = ("LO", "HI") if nargs == 2 else None
        parser.add_argument(flag, dest=name, nargs=nargs, metavar=metavar, help=field.description)
    add_format(parser, ("table", "json", "csv"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in SearchConfig.model_fields}
    config = SearchConfig.load(args.config, {k: v for k, v in flags.items() if v is not None})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary = run_search(config, progress=True)
    print(summary.line(), file=sys.stderr)
    print(render(summary.front, args.format))
    return 0


def _nargs(annotation: object) -> int | str | None:
    """2 for a pair, ``+`` for a list, None for a single value (optional or not)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return len(typing.get_args(annotation))
    return "+" if origin is list else None
