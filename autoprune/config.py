"""Validated settings shared by the CLI, recipes and search configs (pydantic, no unknown keys)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class CalibrationConfig(BaseModel):
    """Which tokens calibrate the statistics: part of every recipe, so an export is reproducible."""

    model_config = ConfigDict(extra="forbid")

    source: str = "wikitext2"
    n_samples: Annotated[int, Field(ge=1)] = 128
    seq_len: Annotated[int, Field(ge=2)] = 512
    seed: int = 0


class EvaluationConfig(BaseModel):
    """Which windows measure perplexity: ``source``'s test split cut into ``seq_len`` windows."""

    model_config = ConfigDict(extra="forbid")

    source: str = "wikitext2"
    seq_len: Annotated[int, Field(ge=2)] = 512
    max_windows: Annotated[int, Field(ge=1)] | None = None
