"""What the experiment scripts share that needs neither torch nor autoprune: the arguments every
script has (``--out``, ``--threads``) and writing results (a JSON file and a markdown table).

Apart from ``_common`` (which re-exports all of it) so that a script running in an environment
without torch (``llamacpp_speed.py``, in the llama.cpp one) writes its tables the same way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# --- arguments -------------------------------------------------------------------------------

def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").splitlines()[0])


def add_out(parser: argparse.ArgumentParser, default: Path = RESULTS) -> None:
    """``--out``: the folder the results' JSON and markdown go to."""
    parser.add_argument("--out", type=Path, default=default)


def add_threads(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--threads``: torch's CPU threads (default: torch's own choice)."""
    parser.add_argument("--threads", type=int, default=default, help="torch threads")


# --- writing results --------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One column of a markdown table: its title, the cell of a row, and its alignment."""

    title: str
    cell: Callable[[dict], Any]
    align: str = "---:"


def column(title: str, key: str, spec: str = "", align: str = "---:") -> Column:
    """A column showing ``row[key]`` formatted by ``spec`` (``format(value, spec)``)."""
    return Column(title, lambda row: format(row[key], spec), align)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> list[str]:
    """The lines of a markdown table of ``rows``."""
    lines = ["| " + " | ".join(c.title for c in columns) + " |",
             "|" + "|".join(c.align for c in columns) + "|"]
    lines += ["| " + " | ".join(str(c.cell(row)) for c in columns) + " |" for row in rows]
    return lines


def out_option(settings: dict) -> str:
    """`` --out DIR`` when a run wrote elsewhere than ``results/`` (runs recorded before a script
    had ``--out`` lack it), for the command a table shows."""
    out = Path(settings.get("out", RESULTS))
    return "" if out.resolve() == RESULTS.resolve() else f" --out {settings['out']}"


def number(value: float | None, spec: str = ".2f") -> str:
    """``value`` formatted, or ``-`` where it was not measured."""
    return "-" if value is None else format(value, spec)


def write_results(result: Any, out: Path, name: str, markdown: str | Sequence[str]) -> str:
    """Write ``out/name.json`` (the result, indented) and ``out/name.md`` (``markdown``, text or
    lines), creating ``out``; returns the markdown text, which scripts also print."""
    text = markdown if isinstance(markdown, str) else "\n".join(markdown) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    return text
