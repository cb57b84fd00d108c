"""Plan schema v2: the sub-network part of a plan (heads, KV groups, FFN channels, sub-blocks).

A :class:`Structure` says *how many* attention heads and FFN channels each decoder block keeps and
which sub-blocks it drops; which ones go is the structured method's choice (from calibration
statistics), so a plan stays plain data. Heads are counted the way grouped-query attention needs
them: ``kv_groups`` whole KV groups kept, and ``heads_per_group`` query heads kept in every kept
group, so each block stays a standard attention layer (``kv_groups`` KV heads, ``kv_groups *
heads_per_group`` query heads). Checks that need the model's shape live in :func:`resolve_blocks`,
which runs before anything is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoprune.errors import AutopruneError
from autoprune.structure._select import UnitLayout

#: How heads and channels are chosen: Minitron's mean activation norm, the activation norm weighted
#: by the consuming column's norm (FLAP's metric without mean-centering), greedy structured OBS
#: (ZipLM / SlimGPT) on the X^T X of the ``o_proj`` / ``down_proj`` input, or training (``learned``:
#: gates trained with the weights, :mod:`autoprune.training._gates`).
StructuredMethodName = Literal["activation", "weighted", "obs", "learned"]

#: Default structured method and correction, by measurement (experiments/structured_methods.py on
#: SmolLM2, results in experiments/results/structured_methods_{heads,ffn}.md): with the
#: least-squares correction, ``weighted`` is best on FFN channels and within 2% of greedy OBS on
#: heads, at a small fraction of OBS's cost on FFN channels (one column at a time); without the
#: correction every method is far worse.
DEFAULT_STRUCTURED_METHOD: StructuredMethodName = "weighted"
DEFAULT_CORRECTION = True

NonNegative = Annotated[int, Field(ge=0)]


class BlockWidths(BaseModel):
    """What one decoder block keeps. ``None`` keeps everything of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_groups: NonNegative | None = None
    heads_per_group: NonNegative | None = None
    ffn: NonNegative | None = None
    drop_attention: bool = False
    drop_mlp: bool = False

    @model_validator(mode="after")
    def _no_empty_kept_sub_block(self) -> BlockWidths:
        if self.drop_attention and self.drop_mlp:
            raise ValueError("a block that drops attention and MLP is a removed block: list it in removed_blocks")
        if not self.drop_attention and 0 in (self.kv_groups, self.heads_per_group):
            raise ValueError("attention keeps 0 heads but is not dropped (set drop_attention)")
        if not self.drop_mlp and self.ffn == 0:
            raise ValueError("the MLP keeps 0 channels but is not dropped (set drop_mlp)")
        return self


class Structure(BaseModel):
    """Per-block widths (``blocks``, by original block index) over a default for every other block
    (``every_block``), and how heads and channels are chosen and corrected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: StructuredMethodName = DEFAULT_STRUCTURED_METHOD
    #: Least-squares correction of ``o_proj`` / ``down_proj`` on the kept inputs.
    correct: bool = DEFAULT_CORRECTION
    every_block: BlockWidths = Field(default_factory=BlockWidths)
    blocks: dict[int, BlockWidths] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _non_negative_blocks(self) -> Structure:
        if any(index < 0 for index in self.blocks):
            raise ValueError("block indices are non-negative")
        return self

    def widths(self, block: int) -> BlockWidths:
        return self.blocks.get(block, self.every_block)


@dataclass(frozen=True)
class ModelDims:
    """The shapes of a dense LLaMA-family model that a structure is checked against."""

    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_layout(self) -> UnitLayout:
        """``o_proj``'s input columns: query heads of ``head_dim`` columns, grouped by KV head."""
        return UnitLayout(self.head_dim, self.num_kv_heads, self.heads_per_group)

    @property
    def ffn_layout(self) -> UnitLayout:
        """``down_proj``'s input columns: one FFN channel each, all in one group."""
        return UnitLayout(1, 1, self.ffn)

    @classmethod
    def of(cls, config: object) -> ModelDims:
        heads = config.num_attention_heads
        return cls(
            num_blocks=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden=config.hidden_size,
            ffn=config.intermediate_size,
        )


@dataclass(frozen=True)
class BlockShape:
    """A block's resolved shape: counts only, every ``None`` replaced by the dense count; a dropped
    sub-block has width 0."""

    kv_groups: int
    heads_per_group: int
    ffn: int

    @property
    def heads(self) -> int:
        return self.kv_groups * self.heads_per_group


def resolve_blocks(
    structure: Structure | None, removed_blocks: list[int], dims: ModelDims
) -> list[BlockShape | None]:
    """Each original block's shape (``None`` for a removed block), or a one-line
    :class:`AutopruneError` naming the first thing that does not fit the model."""
    structure = structure or Structure()
    removed = set(removed_blocks)
    outside = sorted(i for i in {*removed, *structure.blocks} if i >= dims.num_blocks)
    if outside:
        raise AutopruneError(f"block {outside[0]} does not exist: the model has {dims.num_blocks} blocks")
    if len(removed) >= dims.num_blocks:
        raise AutopruneError("the plan removes every block")
    shapes: list[BlockShape | None] = []
    for index in range(dims.num_blocks):
        if index in removed:
            shapes.append(None)
            continue
        shapes.append(_shape(structure.widths(index), dims, index))
    return shapes


def _shape(widths: BlockWidths, dims: ModelDims, index: int) -> BlockShape:
    groups = dims.num_kv_heads if widths.kv_groups is None else widths.kv_groups
    per_group = dims.heads_per_group if widths.heads_per_group is None else widths.heads_per_group
    ffn = dims.ffn if widths.ffn is None else widths.ffn
    if groups > dims.num_kv_heads:
        raise AutopruneError(
            f"block {index}: keeps {groups} KV groups but the model has {dims.num_kv_heads}"
        )
    if per_group > dims.heads_per_group:
        raise AutopruneError(
            f"block {index}: keeps {per_group} query heads per KV group but a group has "
            f"{dims.heads_per_group}"
        )
    if ffn > dims.ffn:
        raise AutopruneError(f"block {index}: keeps {ffn} FFN channels but the model has {dims.ffn}")
    if widths.drop_attention:
        groups = per_group = 0
    if widths.drop_mlp:
        ffn = 0
    return BlockShape(kv_groups=groups, heads_per_group=per_group, ffn=ffn)


def heads_to_groups(heads: int, dims: ModelDims) -> tuple[int, int]:
    """A total query-head count as (KV groups, heads per group): as many whole groups as divide it
    (so 6 of 9 heads in 3 groups is 3 groups of 2), or a one-line error when no GQA-consistent
    split exists (5 of 9 heads in 3 groups of 3)."""
    for groups in range(dims.num_kv_heads, 0, -1):
        if heads % groups == 0 and heads // groups <= dims.heads_per_group:
            return groups, heads // groups
    raise AutopruneError(
        f"{heads} query heads cannot be kept consistently with grouped-query attention "
        f"({dims.num_kv_heads} KV groups of {dims.heads_per_group} heads: keep whole groups and "
        "the same number of heads in each)"
    )


@dataclass(frozen=True)
class StructureRequest:
    """A uniform structure asked for on the command line (``heads=6,ffn=1152``): a total query
    head count needs the model's KV groups to become a :class:`BlockWidths`."""

    heads: int | None = None
    ffn: int | None = None
    drop_attention: bool = False
    drop_mlp: bool = False
    method: StructuredMethodName = DEFAULT_STRUCTURED_METHOD
    correct: bool = DEFAULT_CORRECTION

    @classmethod
    def parse(cls, text: str, method: str | None = None, correct: bool = DEFAULT_CORRECTION) -> StructureRequest:
        """Read ``heads=N,ffn=M,drop=attention|mlp``; a one-line error on anything else."""
        values: dict[str, object] = {"correct": correct}
        if method is not None:
            if method not in StructuredMethodName.__args__:
                raise AutopruneError(
                    f"unknown structured method {method!r} (known: {', '.join(StructuredMethodName.__args__)})"
                )
            values["method"] = method
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key in ("heads", "ffn"):
                if not value.isdigit():
                    raise AutopruneError(f"invalid --structured {item!r}: {key} takes a non-negative integer")
                values[key] = int(value)
            elif key == "drop" and value in ("attention", "mlp"):
                values[f"drop_{value}"] = True
            else:
                raise AutopruneError(
                    f"invalid --structured {item!r}: expected heads=N, ffn=N or drop=attention|mlp"
                )
        return cls(**values)

    def structure(self, dims: ModelDims) -> Structure:
        """The :class:`Structure` for ``dims``; one-line errors for what does not fit."""
        groups = per_group = None
        if self.heads is not None and not self.drop_attention:
            if self.heads == 0:
                raise AutopruneError("heads=0 keeps no attention: use drop=attention")
            groups, per_group = heads_to_groups(self.heads, dims)
        try:
            widths = BlockWidths(kv_groups=groups, heads_per_group=per_group, ffn=self.ffn,
                                 drop_attention=self.drop_attention, drop_mlp=self.drop_mlp)
        except ValueError as error:
            message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
            raise AutopruneError(f"invalid --structured: {message.removeprefix('Value error, ')}") from None
        structure = Structure(method=self.method, correct=self.correct, every_block=widths)
        resolve_blocks(structure, [], dims)
        return structure
