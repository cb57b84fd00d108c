"""A pruning plan is plain data.

Search spaces produce plans, methods consume them, recipes and studies store them. A plan names,
for every decoder linear layer it touches, how much of it to remove (a fraction per row, or an N:M
pattern), and which whole decoder blocks to drop. It never holds tensors, so it round-trips through
JSON/YAML exactly and travels to remote workers for free.

``schema_version`` is bumped whenever a field is added; readers accept every version up to their
own so old studies stay readable. Version 2 added ``structure``: the heads, KV groups, FFN channels
and sub-blocks each block keeps (see :mod:`autoprune.structure`). Version 3 added ``quantization``:
the GGUF type of every 2-D tensor of the model the plan makes (see :mod:`autoprune.quantization`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from autoprune.config import CalibrationConfig
from autoprune.errors import AutopruneError
from autoprune.quantization._schema import Quantization
from autoprune.structure._schema import Structure

PLAN_SCHEMA_VERSION = 3


def _registered_method(name: str) -> str:
    """``name`` if :mod:`autoprune.methods` registers a method of that name (a ``ValueError``
    listing them otherwise, which pydantic reports)."""
    from autoprune.methods import PruningMethod  # on use: methods import plans, so not at the top

    try:
        return PruningMethod.check_name(name)
    except AutopruneError as error:
        raise ValueError(str(error)) from None


#: A pruning method's name, validated against the methods' registry (its one list of names).
MethodName = Annotated[str, AfterValidator(_registered_method)]


class NMPattern(BaseModel):
    """At most ``n`` non-zeros in every group of ``m`` consecutive input weights of a row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: Annotated[int, Field(ge=1)]
    m: Annotated[int, Field(ge=2)]

    @model_validator(mode="after")
    def _n_below_m(self) -> NMPattern:
        if self.n >= self.m:
            raise ValueError(f"N:M pattern needs N < M, got {self.n}:{self.m}")
        return self

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        """Read ``"2:4"``; raise :class:`AutopruneError` on anything else."""
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise AutopruneError(f"invalid N:M pattern {text!r}: expected two integers N:M") from None
        if not 1 <= n < m:
            raise AutopruneError(f"invalid N:M pattern {text!r}: needs 1 <= N < M")
        return cls(n=n, m=m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


class LayerSpec(BaseModel):
    """How much of one linear layer to remove: a per-row fraction, or an N:M pattern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    nm: NMPattern | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> LayerSpec:
        if self.nm is not None and self.sparsity not in (0.0, self.nm.sparsity):
            raise ValueError("a layer takes either a sparsity or an N:M pattern, not both")
        return self

    @property
    def effective_sparsity(self) -> float:
        return self.nm.sparsity if self.nm is not None else self.sparsity

    @property
    def is_dense(self) -> bool:
        return self.nm is None and self.sparsity == 0.0


class Plan(BaseModel):
    """Everything needed, besides the model and its calibration statistics, to make one variant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = PLAN_SCHEMA_VERSION
    method: MethodName = "wanda"
    layers: dict[str, LayerSpec] = Field(default_factory=dict)
    removed_blocks: list[int] = Field(default_factory=list)
    #: Sub-network widths (schema version 2); ``None``: every kept block keeps all its heads and
    #: channels, as in version 1.
    structure: Structure | None = None
    #: GGUF types (schema version 3), applied after the structure and the layers' sparsity;
    #: ``None``: the plan says nothing of how a GGUF file stores it, as in versions 1 and 2.
    quantization: Quantization | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if not 1 <= version <= PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan schema version {version} is newer than this autoprune reads")
        return version

    @field_validator("removed_blocks")
    @classmethod
    def _sorted_unique(cls, blocks: list[int]) -> list[int]:
        if any(block < 0 for block in blocks):
            raise ValueError("block indices are non-negative")
        return sorted(set(blocks))

    @model_validator(mode="after")
    def _structure_needs_v2(self) -> Plan:
        if self.structure is not None and self.schema_version < 2:
            raise ValueError("a plan with a structure needs schema_version 2")
        if self.quantization is not None and self.schema_version < 3:
            raise ValueError("a plan with a quantization needs schema_version 3")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)

    def summary(self) -> dict[str, object]:
        """A short description for tables: mean layer sparsity, N:M patterns used, removed blocks
        (and, for a sub-network plan, its structure; for a quantized one, how many tensors take
        each GGUF type)."""
        specs = list(self.layers.values())
        patterns = sorted({str(spec.nm) for spec in specs if spec.nm is not None})
        mean = sum(spec.effective_sparsity for spec in specs) / len(specs) if specs else 0.0
        summary: dict[str, object] = {
            "method": self.method,
            "mean_layer_sparsity": round(mean, 4),
            "nm": patterns,
            "removed_blocks": list(self.removed_blocks),
        }
        if self.structure is not None:
            widths = self.structure.model_dump(mode="json", exclude_defaults=True)
            summary["structure"] = {
                **widths, "method": self.structure.method, "correct": self.structure.correct
            }
        if self.quantization is not None:
            named = [*self.quantization.layers, "embeddings"]
            summary["gguf"] = {**self.quantization.counts(named), "imatrix": self.quantization.imatrix}
        return summary


class Recipe(BaseModel):
    """An exported, reproducible variant: which model, which calibration data, which plan."""

    model_config = ConfigDict(extra="forbid")

    model: str
    calibration: CalibrationConfig
    plan: Plan
    #: Pruned block after block from the already-pruned model's statistics (``prune --sequential``),
    #: rather than from the dense model's cached ones as search trials are.
    sequential: bool = False

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> Recipe:
        if not path.is_file():
            raise AutopruneError(f"recipe file not found: {path}")
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()))
        except yaml.YAMLError as error:
            raise AutopruneError(f"recipe {path} is not valid YAML: {_first_line(error)}") from None
        except ValueError as error:
            raise AutopruneError(f"recipe {path} is invalid: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())
