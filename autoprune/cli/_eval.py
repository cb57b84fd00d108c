"""``autoprune eval``: perplexity and size of a checkpoint as plain transformers loads it, or with
``--tasks`` its zero-shot accuracy on lm-eval tasks (:mod:`autoprune.tasks`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from autoprune.api import evaluate
from autoprune.cli._common import add_device_flag, add_format, render
from autoprune.config import EvaluationConfig
from autoprune.data import check_source
from autoprune.errors import AutopruneError
from autoprune.tasks import evaluate_tasks, parse_tasks


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="perplexity and size of a model, or task accuracy")
    parser.add_argument("--model", required=True, help="checkpoint folder, hub id, .gguf or alias")
    parser.add_argument("--data", default="wikitext2", help="evaluation text: PATH or wikitext2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N test windows")
    add_task_flags(parser)
    add_device_flag(parser)
    add_format(parser)
    parser.set_defaults(run=run)


def add_task_flags(parser: argparse.ArgumentParser) -> None:
    """``--tasks``, ``--include-path``, ``--limit``: shared by ``eval`` and ``front``."""
    parser.add_argument("--tasks", type=parse_tasks, default=None,
                        help="lm-eval tasks T1,T2 (needs the eval extra): accuracy instead of perplexity")
    parser.add_argument("--include-path", type=Path, default=None,
                        help="folder of lm-eval custom task YAML (with --tasks)")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each task")


def check_task_flags(args: argparse.Namespace) -> None:
    """``--include-path`` and ``--limit`` only mean something with ``--tasks``."""
    if args.tasks is None and (args.include_path is not None or args.limit is not None):
        raise AutopruneError("--include-path and --limit need --tasks")


def run(args: argparse.Namespace) -> int:
    check_task_flags(args)
    if args.tasks is not None:
        rows = evaluate_tasks(args.model, args.tasks, args.include_path, args.limit, args.device)
        print(render(rows, args.format))
        return 0
    check_source(args.data)
    config = EvaluationConfig(source=args.data, seq_len=args.seq_len, max_windows=args.eval_windows)
    print(render([evaluate(args.model, config, device=args.device)], args.format))
    return 0
