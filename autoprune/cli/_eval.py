"""``autoprune eval``: perplexity and size of a checkpoint as plain transformers loads it."""

from __future__ import annotations

import argparse

from autoprune.api import evaluate
from autoprune.cli._common import add_device_flag, add_format, render
from autoprune.config import EvaluationConfig
from autoprune.data import check_source


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="perplexity and size of a model")
    parser.add_argument("--model", required=True, help="checkpoint folder, hub id, .gguf or alias")
    parser.add_argument("--data", default="wikitext2", help="evaluation text: PATH or wikitext2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N test windows")
    add_device_flag(parser)
    add_format(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_source(args.data)
    config = EvaluationConfig(source=args.data, seq_len=args.seq_len, max_windows=args.eval_windows)
    print(render([evaluate(args.model, config, device=args.device)], args.format))
    return 0
