"""The ``autoprune`` command line. Each subcommand is a module with ``add_parser`` and ``run``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from transformers.utils import logging as hf_logging

from autoprune.cli import (
    _database,
    _eval,
    _export,
    _front,
    _heal,
    _predictor,
    _prune,
    _refine,
    _search,
)
from autoprune.cli._common import OneLineParser
from autoprune.errors import AutopruneError
from autoprune.heap import retained_heap

DESCRIPTION = "Search, prune, measure and export compressed variants of causal language models."
SUBCOMMANDS = (_prune, _eval, _search, _refine, _front, _export, _heal, _predictor, _database)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="autoprune", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user mistakes become ``autoprune: error: ...`` and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # loading bars would bury a one-line error (and say nothing)
    try:
        args = build_parser().parse_args(argv)
        with retained_heap():
            return args.run(args)
    except AutopruneError as error:
        print(f"autoprune: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        print(f"autoprune: error: {_validation_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130


def _validation_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or error.title
    return f"invalid {where}: {first['msg']}"


if __name__ == "__main__":
    sys.exit(main())
