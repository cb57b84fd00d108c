"""The variant database: each layer's pruned weight at each level, computed once and kept on disk.

A layer pruned to a given level from given statistics is the same tensor whatever the rest of the
plan is (every method prunes a layer from its own weight, its input's statistics and its own
target; rows are independent), so plan after plan can be assembled from stored variants instead
of pruned again (EvoPress's and DarwinLM's design). Entries live under
``<folder>/<statistics key>-v<format>/<method>/<layer>/<level>.safetensors``: the statistics
folder's name already names the model (by content) and the calibration tokens, so a database
never serves a variant pruned from other statistics. The folder is shared: every Ray worker that
sees it reads and adds entries, each written atomically (see :mod:`autoprune.variants._entry`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoprune._atomic import warn_damaged
from autoprune.calibration import CalibrationStats, default_cache_dir
from autoprune.methods import LayerJob, PruningMethod
from autoprune.variants._cuts import CUTS_FOLDER, CutStore
from autoprune.variants._entry import DatabaseCounters, read_entry, write_entry
from autoprune.variants._quantized import QUANTIZED_FOLDER, QuantizedStore
from autoprune.variants._levels import DEFAULT_GRID, level_key

DATABASE_FORMAT_VERSION = 1


def default_database_dir(cache_dir: Path | None = None) -> Path:
    """Where databases live unless told: ``variants/`` in the calibration cache folder."""
    return (cache_dir or default_cache_dir()) / "variants"


class DatabaseSettings(BaseModel):
    """Where a database lives and its grid: what workers, ``prune``, ``export`` and ``refine``
    are told to open one with (small, so it travels to Ray workers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str | None = Field(None, description="database folder (default: variants/ in the cache)")
    grid: int = Field(
        DEFAULT_GRID, ge=2, description="searched allocations snap to sparsity steps of 1/grid"
    )

    @classmethod
    def when(cls, enabled: bool, folder: str | None, grid: int) -> DatabaseSettings | None:
        """The settings of flat ``database``/``database_dir``/``database_grid`` config keys."""
        return cls(folder=folder, grid=grid) if enabled else None

    def open(self, stats: CalibrationStats, cache_dir: Path | None = None) -> VariantDatabase:
        """The database of ``stats`` in this folder (the cache's ``variants/`` when unset)."""
        folder = Path(self.folder) if self.folder else default_database_dir(cache_dir)
        return VariantDatabase(stats, folder)


class VariantDatabase:
    """Pruned variants of one model's layers from one set of calibration statistics.

    ``lookup`` serves the jobs whose level is stored; ``store`` keeps what was pruned for the
    others. :class:`autoprune.pruner.Pruner` calls both, so the first plan that asks for a level
    computes it (lazy build) and later plans read it. Entries are keyed by per-row prune count (or
    N:M pattern), so every level any plan reaches is kept; the grid (:class:`DatabaseSettings`)
    decides only where searched allocations snap and what ``autoprune database build`` builds.
    """

    def __init__(self, stats: CalibrationStats, folder: Path | None = None) -> None:
        self.root = (folder or default_database_dir()) / f"{stats.folder.name}-v{DATABASE_FORMAT_VERSION}"
        self.counters = DatabaseCounters()

    def path(self, method: str, layer: str, key: str) -> Path:
        """The file of ``layer``'s variant at level ``key`` pruned by ``method``."""
        return self.root / PruningMethod.check_name(method) / layer / f"{key}.safetensors"

    def lookup(self, method: str, jobs: list[LayerJob]) -> tuple[dict[str, torch.Tensor], list[LayerJob]]:
        """The stored weights of the jobs the database holds, and the jobs left to prune. A damaged
        entry is reported in one warning line and left to prune (``store`` then replaces it).
        Entries are read on as many threads as torch computes on: checking and decoding them
        release the GIL, and a trial reads every layer of the model."""
        threads = max(1, min(len(jobs), torch.get_num_threads()))
        with ThreadPoolExecutor(threads) as pool:
            reads = list(pool.map(lambda job: self._read(method, job), jobs))
        found: dict[str, torch.Tensor] = {}
        missing: list[LayerJob] = []
        for job, (weight, path, problem) in zip(jobs, reads, strict=True):
            if problem:
                warn_damaged("pruned variant", path, problem)
                self.counters.damaged.append(str(path))
            if weight is None:
                missing.append(job)
            else:
                found[job.name] = weight
                self.counters.read += 1
        return found, missing

    def _read(self, method: str, job: LayerJob) -> tuple[torch.Tensor | None, Path | None, str]:
        """``job``'s stored variant (None where absent or damaged), its file and what is wrong with
        it."""
        key = _key(job)
        if key is None:
            return None, None, ""
        path = self.path(method, job.name, key)
        if not path.exists():
            return None, path, ""
        weight, problem = read_entry(path, job.weight)
        return weight, path, problem

    def store(self, method: str, jobs: list[LayerJob], weights: dict[str, torch.Tensor]) -> None:
        """Keep the pruned ``weights`` of the ``jobs``. A folder that cannot be written (a read-only
        share, a full disk) is said once, in one warning line; plans are then pruned as without a
        database (an entry is whole or absent, never half)."""
        for job in jobs:
            key = _key(job)
            if key is not None:
                path = self.path(method, job.name, key)
                self.counters.keep(self.root, path, lambda: write_entry(path, weights[job.name]))

    @property
    def cuts(self) -> CutStore:
        """The sub-network cuts stored beside the pruned layers (same model and statistics)."""
        return CutStore(self.root / CUTS_FOLDER, self.counters)

    @property
    def quantized(self) -> QuantizedStore:
        """Tensors quantized to GGUF types, beside the pruned layers (same model and statistics)."""
        return QuantizedStore(self.root / QUANTIZED_FOLDER, self.counters)

    def disk_bytes(self, method: str | None = None) -> int:
        """Bytes the stored entries take (of one method, or all)."""
        base = self.root / method if method else self.root
        return sum(path.stat().st_size for path in base.rglob("*.safetensors")) if base.exists() else 0


def _key(job: LayerJob) -> str | None:
    """The entry key of ``job``'s level: its per-row prune count (every count is a level of the
    finest grid, one step per input) or its N:M pattern; None for a dense job."""
    cols = job.weight.shape[1]
    return level_key(job.spec, cols, cols)
