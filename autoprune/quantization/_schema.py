"""Plan schema v3: the GGUF part of a plan, a tensor type per decoder linear layer and for the
token embeddings and output head.

A :class:`Quantization` is applied after the structure and sparsity a plan already describes: the
model the plan makes is quantized tensor by tensor to its types, and measured on the dequantized
values (what llama.cpp computes with). Layers are named by their dense names, as in a plan's
``layers``. Checks that need the model's shapes (does a row hold the type's blocks?) live in
:func:`check_quantization`, which runs before anything is computed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from autoprune.errors import AutopruneError
from autoprune.quantization._types import gguf_type


def _known_type(name: str) -> str:
    try:
        gguf_type(name)
    except AutopruneError as error:
        raise ValueError(str(error)) from None
    return name


#: A GGUF tensor type's name, validated against :data:`GGUF_TENSOR_TYPES`.
TypeName = Annotated[str, AfterValidator(_known_type)]
#: What a plan calls the token embeddings and an untied output head among its tensors.
EMBEDDINGS = "embeddings"
OUTPUT = "output"


class Quantization(BaseModel):
    """The GGUF type of every 2-D tensor of the model a plan makes (norms stay float32)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: TypeName = Field("f16", description="the type of every 2-D tensor not named below")
    layers: dict[str, TypeName] = Field(
        default_factory=dict, description="decoder linear layers by their dense names"
    )
    embeddings: TypeName | None = Field(
        None, description="the token embeddings (and a tied output head); None: the default"
    )
    output: TypeName | None = Field(None, description="an untied output head; None: the default")
    imatrix: bool = Field(
        False, description="weigh each column's rounding by its inputs' mean square (llama.cpp's "
        "importance matrix, from the calibration statistics)"
    )

    def type_of(self, tensor: str) -> str:
        """The type of ``tensor``: a dense layer name, :data:`EMBEDDINGS` or :data:`OUTPUT`."""
        named = {EMBEDDINGS: self.embeddings, OUTPUT: self.output}.get(tensor)
        return named or self.layers.get(tensor) or self.default

    def counts(self, tensors: list[str]) -> dict[str, int]:
        """How many of ``tensors`` take each type (for summaries)."""
        counts: dict[str, int] = {}
        for tensor in tensors:
            counts[self.type_of(tensor)] = counts.get(self.type_of(tensor), 0) + 1
        return dict(sorted(counts.items()))


def check_quantization(quantization: Quantization, row_lengths: Mapping[str, int], layers: Collection[str]) -> None:
    """A one-line error naming a tensor whose rows (``row_lengths``: tensor -> columns, the
    tensors the plan's model keeps) cannot hold the type the plan gives it, or a layer the dense
    model (its ``layers``) lacks; layers the plan removes may have a type, which is unused."""
    unknown = sorted(set(quantization.layers) - set(layers))
    if unknown:
        raise AutopruneError(f"the plan gives a GGUF type to {unknown[0]}, which the model does not have")
    for tensor, cols in row_lengths.items():
        name = quantization.type_of(tensor)
        kind = gguf_type(name)
        if not kind.holds(cols):
            what = "the token embeddings" if tensor == EMBEDDINGS else tensor
            raise AutopruneError(
                f"the plan stores {what} as {name}, whose blocks of {kind.block} weights do not "
                f"divide its rows of {cols}: the GGUF file cannot hold it"
            )
