"""``autoprune export``: one trial of a study as a recipe and a pruned Hugging Face checkpoint, and
with ``--format gguf`` a GGUF file beside it (:func:`autoprune.study.export_trial`; this module only
parses and prints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoprune.cli._common import (
    add_database_flags,
    add_dtype_flag,
    add_format,
    database_settings,
    render,
)
from autoprune.errors import AutopruneError
from autoprune.export_gguf import GGUF_TYPES
from autoprune.study import DEFAULT_STORAGE, artifact_store, export_trial


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a trial as a recipe and a checkpoint")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL or path")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--trial", type=int, required=True, help="trial number (see autoprune front)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    add_dtype_flag(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="calibration cache folder")
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument(
        "--sequential", dest="sequential", action="store_const", const=True, default=None,
        help="prune block after block from the already-pruned model's statistics (the recipe "
        "keeps it). Default: the variant the study measured best (sequential for refinements that "
        "measured it better, one-shot for the rest)",
    )
    recipe.add_argument(
        "--one-shot", dest="sequential", action="store_const", const=False,
        help="prune from the dense model's statistics, as every search trial was measured",
    )
    parser.add_argument("--unhealed", action="store_true",
                        help="a trial the study healed: write its one-shot weights instead")
    parser.add_argument("--artifact-store", default=None,
                        help="folder of the study's healed weights (default: beside its file)")
    add_database_flags(parser)
    add_format(parser, ("table", "json", "gguf"))
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                        help="with --format gguf: f16 (default) or q8_0; a quantized trial is written "
                        "in its own types")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.gguf_type is not None and args.format != "gguf":
        raise AutopruneError("--gguf-type needs --format gguf")
    result = export_trial(
        args.storage, args.study, args.trial, args.out, sequential=args.sequential,
        cache_dir=args.cache_dir, gguf_type=args.gguf_type, database=database_settings(args),
        gguf=args.format == "gguf", healed=not args.unhealed,
        store=artifact_store(args.storage, args.artifact_store) if args.artifact_store else None,
        dtype=args.dtype,
    )
    for note in result.notes:
        print(f"autoprune: {note}", file=sys.stderr)
    print(render([result.row()], "table" if args.format == "gguf" else args.format))
    return 0
