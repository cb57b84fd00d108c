"""A per-layer database of pruned variants at discrete levels (EvoPress / DarwinLM design): each
layer's weight at each level is pruned once from the cached statistics and assembled into plan
after plan; sub-network cuts (a block's kept heads or channels at a width, corrected) and tensors
quantized to GGUF types likewise."""

from autoprune.variants._build import BuildReport, build_cuts, build_database
from autoprune.variants._cuts import CutStore
from autoprune.variants._database import (
    DATABASE_FORMAT_VERSION,
    DatabaseSettings,
    VariantDatabase,
    default_database_dir,
)
from autoprune.variants._entry import DatabaseCounters, read_entry, write_entry
from autoprune.variants._quantized import QuantizedStore
from autoprune.variants._levels import (
    DEFAULT_GRID,
    Level,
    check_grid,
    grid_steps,
    level_key,
    parse_levels,
)

__all__ = [
    "DATABASE_FORMAT_VERSION",
    "DEFAULT_GRID",
    "BuildReport",
    "CutStore",
    "DatabaseCounters",
    "DatabaseSettings",
    "Level",
    "QuantizedStore",
    "VariantDatabase",
    "build_cuts",
    "build_database",
    "check_grid",
    "default_database_dir",
    "grid_steps",
    "level_key",
    "parse_levels",
    "read_entry",
    "write_entry",
]
