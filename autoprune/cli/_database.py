"""``autoprune database build``: prune every layer to every level ahead, into the variant database
that trials, ``refine``, ``export`` and ``prune --recipe`` read with ``--database``; with
``--cuts``, cut every block to every width of the ``subnet`` space ahead instead."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autoprune.api import prepare_with_windows
from autoprune.cli._common import add_database_flags, add_device_flag, add_format, database_settings, render
from autoprune.cli._prune import calibration_config
from autoprune.data import check_source
from autoprune.errors import AutopruneError
from autoprune.methods import PruningMethod
from autoprune.models import compute_device
from autoprune.pruner import Pruner
from autoprune.structure import DEFAULT_STRUCTURED_METHOD, StructuredMethod, model_dims
from autoprune.variants import DEFAULT_GRID, BuildReport, build_cuts, build_database, parse_levels
from search_spaces import subnet_widths

#: Levels built when none are given: the grid's steps a layer-wise search between 40% and 80%
#: mostly asks for, and 2:4.
DEFAULT_LEVELS = ("0.25-0.95", "2:4")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("database", help="the variant database of pruned layers")
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    build = actions.add_parser("build", help="prune every layer to every level ahead (resumable)")
    build.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or alias")
    build.add_argument("--method", default=None, help="pruning method (default admm)")
    build.add_argument(
        "--levels", nargs="+", default=None,
        help="grid sparsities (0.5), ranges of grid steps (0.25-0.95) and N:M patterns (2:4); "
        f"default {' '.join(DEFAULT_LEVELS)}",
    )
    build.add_argument(
        "--cuts", action="store_true",
        help="instead of pruned levels, the sub-network cuts of every block at every head count "
        "and FFN width the subnet space takes (LLaMA family)",
    )
    build.add_argument("--structured-method", default=None,
                       help=f"with --cuts: how heads and channels are chosen (default {DEFAULT_STRUCTURED_METHOD})")
    build.add_argument("--data", default="wikitext2", help="calibration text: PATH, wikitext2 or self")
    build.add_argument("--calib-samples", type=int, default=128)
    build.add_argument("--seq-len", type=int, default=512)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--cache-dir", type=Path, default=None, help="calibration cache folder")
    add_database_flags(build, switch=False)
    add_device_flag(build)
    add_format(build)
    build.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    """Check everything the model is not needed for first, then load, calibrate (cached), build."""
    if args.cuts and (args.method or args.levels):
        raise AutopruneError("--cuts builds sub-network cuts; --method and --levels are for pruned levels")
    if not args.cuts and args.structured_method:
        raise AutopruneError("--structured-method needs --cuts")
    args.method = PruningMethod.check_name(args.method or "admm")
    args.levels = args.levels or list(DEFAULT_LEVELS)
    args.structured_method = StructuredMethod.get(args.structured_method or DEFAULT_STRUCTURED_METHOD).name
    settings = database_settings(args, switch=False)
    levels = parse_levels(args.levels, settings.grid if settings else DEFAULT_GRID)
    check_source(args.data)
    device = compute_device(args.device)
    if args.calib_samples < 1 or args.seq_len < 2:
        raise AutopruneError("--calib-samples must be at least 1 and --seq-len at least 2")
    # cuts need a LLaMA-family model: refused once it is loaded, before anything is computed
    check = (lambda loaded: model_dims(loaded.model)) if args.cuts else None
    prepared = prepare_with_windows(args.model, calibration_config(args), args.cache_dir, True, device, check)
    prepared.loaded.model.to(device)
    pruner = Pruner(prepared.loaded, prepared.stats, settings.open(prepared.stats, args.cache_dir))
    report = _build(pruner, args, levels)
    rows = report.levels
    total = {"level": "total", "layers": sum(r["layers"] for r in rows), "pruned": report.layers_pruned,
             "seconds": round(report.seconds, 3), "bytes_written": sum(r["bytes_written"] for r in rows)}
    what = "cuts" if args.cuts else args.method
    if args.format == "json":
        print(json.dumps({"folder": report.folder, "method": report.method, "levels": rows,
                          "disk_bytes": pruner.database.disk_bytes(what)}, indent=2))
    else:
        print(render([*rows, total], "table"))
        print(f"database: {report.folder} ({pruner.database.disk_bytes(what)} bytes of {what})")
    return 0


def _build(pruner: Pruner, args: argparse.Namespace, levels: list) -> BuildReport:
    """The pruned levels, or with ``--cuts`` the sub-network cuts."""
    if not args.cuts:
        return build_database(pruner, args.method, levels, progress=True)
    attention, ffn = subnet_widths(model_dims(pruner.loaded.model))
    return build_cuts(pruner, attention, ffn, args.structured_method, progress=True)
