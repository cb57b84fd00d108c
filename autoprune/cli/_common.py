"""Pieces every subcommand shares: one-line errors, output formats, common flags."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from autoprune.errors import AutopruneError
from autoprune.export import DTYPES
from autoprune.variants import DatabaseSettings, check_grid


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line naming the command, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise AutopruneError(f"{self.prog}: {message}")


def add_format(parser: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json")) -> None:
    parser.add_argument("--format", choices=choices, default="table", help="output format")


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the checkpoint's weights (default: the source model's; "
                        "bfloat16 for a GGUF)")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model computes (cpu, cuda, cuda:N)")


def add_workers_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--workers`` and ``--ray-address``: training data-parallel on Ray Train."""
    parser.add_argument("--workers", type=int, default=None,
                        help="train data-parallel on this many Ray Train workers (a GPU each with "
                        "--device cuda); --batch-size must split over them")
    parser.add_argument("--ray-address", default=None,
                        help="with --workers: auto or HOST:PORT of a Ray cluster (unset: a local Ray)")


def join_workers(workers: int | None, batch_size: int, address: str | None) -> None:
    """Check ``--workers`` against the batch and join the Ray it trains on (nothing when unset)."""
    if workers is None:
        return
    if workers < 1:
        raise AutopruneError(f"--workers must be at least 1, got {workers}")
    if batch_size % workers:
        raise AutopruneError(f"--batch-size {batch_size} does not split over {workers} workers")
    from autoprune.study import connect_ray  # only a run on Ray loads it

    connect_ray(address)


def add_field_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], exclude: frozenset[str] = frozenset()
) -> None:
    """One flag per field of a pydantic settings model (``sparsity_range`` is ``--sparsity-range
    LO HI``) but those in ``exclude``, described by the field: generated, so flags and settings can
    never disagree. Values stay strings here; the model validates and converts them."""
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        nargs = _nargs(field.annotation)
        metavar = ("LO", "HI") if nargs == 2 else None
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, nargs=nargs, metavar=metavar, help=field.description)


def given_field_flags(
    args: argparse.Namespace, model: type[BaseModel], exclude: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The fields whose flags were given (of those :func:`add_field_flags` added)."""
    flags = {name: getattr(args, name) for name in model.model_fields if name not in exclude}
    return {name: value for name, value in flags.items() if value is not None}


def _nargs(annotation: object) -> int | str | None:
    """2 for a pair, ``*`` for a list (the flag alone: an empty one), None for a single value
    (optional or not)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return len(typing.get_args(annotation))
    return "*" if origin is list else None


def parse_fraction(text: str) -> float:
    """A sparsity in [0, 1); anything else is a one-line error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise AutopruneError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise AutopruneError(f"sparsity must be in [0, 1), got {text}")
    return value


def render(rows: list[dict], fmt: str) -> str:
    """Rows as an aligned table, JSON (a list of objects) or CSV."""
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    if not rows:
        return "(none)" if fmt == "table" else ""
    columns = list(rows[0])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in columns} for row in rows)
        return buffer.getvalue().rstrip("\n")
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def add_database_flags(parser: argparse.ArgumentParser, switch: bool = True) -> None:
    """``--database`` (with ``switch``), ``--database-dir`` and ``--database-grid``: assemble plans
    from a variant database of pruned layers (see :mod:`autoprune.variants`)."""
    if switch:
        parser.add_argument("--database", action="store_true",
                            help="read pruned layers from the variant database (adding what it lacks)")
    parser.add_argument("--database-dir", default=None,
                        help="variant database folder (default: variants/ in the cache folder)")
    parser.add_argument("--database-grid", type=int, default=None,
                        help="unstructured levels in steps of 1/GRID (default 32)")


def database_settings(args: argparse.Namespace, switch: bool = True) -> DatabaseSettings | None:
    """The :class:`autoprune.variants.DatabaseSettings` the flags ask for (None: no database)."""
    given = args.database_dir is not None or args.database_grid is not None
    if switch and not args.database:
        if given:
            raise AutopruneError("--database-dir and --database-grid need --database")
        return None
    grid = check_grid(args.database_grid) if args.database_grid is not None else None
    return DatabaseSettings(folder=args.database_dir, **({"grid": grid} if grid else {}))
