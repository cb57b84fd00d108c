"""The arrows between the project's packages point one way, checked on the sources:

    autoprune core <- search_spaces <- autoprune.study <- predictors <- autoprune.cli

(core: every module of ``autoprune`` outside ``autoprune.study`` and ``autoprune.cli``). Imports
are read with ``ast``, including those inside functions, so a lazy import counts too; and
``predictors``/``search_spaces`` use only the public (not ``_``-prefixed) modules of the packages
below them.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoprune", "search_spaces", "predictors")
#: Layers from the bottom up: each may import only the layers before it (and itself).
LAYERS = ("core", "search_spaces", "study", "predictors", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """(line, modules) of every import statement in ``path`` (whose source is ``text``), at any
    depth; ``from X import y`` names both ``X`` and ``X.y`` (``y`` may be a submodule), relative
    imports resolved."""
    tree = ast.parse(text, filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, [base, f"{base}.{alias.name}"]) for alias in node.names]
    return found


def layer_of(module: str) -> str | None:
    """The layer a module of the project belongs to; None for anything else (third party)."""
    top, _, rest = module.partition(".")
    if top in ("search_spaces", "predictors"):
        return top
    if top != "autoprune":
        return None
    sub = rest.partition(".")[0]
    if sub == "__main__":  # ``python -m autoprune``: the command line
        return "cli"
    return sub if sub in ("study", "cli") else "core"


def sources() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50, "the project's sources were not found"
    return files


def violations(read: Callable[[Path], str] = Path.read_text) -> list[str]:
    """Every import that breaks an arrow, as ``file:line imports module (why)``."""
    found = []
    for path in sources():
        importer = module_name(path)
        layer = layer_of(importer)
        allowed = LAYERS[: LAYERS.index(layer) + 1]
        for line, modules in imported_modules(path, read(path)):
            where = f"{path.relative_to(ROOT)}:{line} imports {modules[-1]}"
            targets = {layer_of(module) for module in modules} - {None}
            if targets - set(allowed):
                found.append(f"{where} ({layer} may import only {', '.join(allowed)})")
            elif layer in ("search_spaces", "predictors") and any(
                _private(module) for module in modules if layer_of(module) not in (None, layer)
            ):
                found.append(f"{where} (a private module)")
    return found


def _private(module: str) -> bool:
    """Whether ``module`` is, or is inside, a ``_``-prefixed module (``autoprune.study._storage``)."""
    return any(part.startswith("_") for part in module.split(".")[1:])


def test_imports_point_one_way_and_use_public_modules():
    assert violations() == []


@pytest.mark.parametrize(
    ("importer", "source", "why"),
    [
        ("autoprune/study/_driver.py", "def f():\n    from predictors import PredictorProposer\n",
         "study may import only"),
        ("autoprune/plan.py", "import autoprune.study\n", "core may import only"),
        ("autoprune/measure.py", "from search_spaces import SpaceContext\n", "core may import only"),
        ("search_spaces/_base.py", "from autoprune.study import SearchConfig\n", "search_spaces may"),
        ("predictors/model/_location.py", "from autoprune.study._storage import storage_url\n",
         "a private module"),
        ("predictors/model/_location.py", "from autoprune.study import _storage\n", "a private module"),
        ("predictors/model/_data.py", "from autoprune.cli import main\n", "predictors may import only"),
        ("search_spaces/_nm.py", "from ..predictors import Predictor\n", "search_spaces may"),
    ],
)
def test_the_check_catches_each_kind_of_wrong_import(importer, source, why):
    """Each arrow the check enforces, broken once: ``source`` added to a real module's text."""

    def read(path: Path) -> str:
        return path.read_text() + ("\n" + source if path == ROOT / importer else "")

    found = violations(read)
    assert len(found) == 1 and found[0].startswith(importer) and why in found[0], found
