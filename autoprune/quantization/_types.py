"""The GGUF tensor types a plan may name: what each stores, which rows it can hold, how llama.cpp
falls back where it cannot, and which quantizer writes it.

A type stores a row in blocks of ``block`` weights, ``block_bytes`` bytes each, so a tensor's bytes
follow from its shape alone (:func:`tensor_bytes`). A row whose length the block does not divide
cannot be stored in that type: K-quants (256-weight blocks) cannot hold SmolLM2's 576-wide rows.
``llama-quantize`` then stores the tensor in a fallback type (:func:`llama_cpp_fallback`, the rule
of llama.cpp's ``tensor_type_fallback``); a plan never names a type a tensor cannot hold, so the
type it names is the type the file holds.

The set is what llama.cpp both writes and runs on CPU: the nine types a search offers by default
and the three 32-weight types llama.cpp falls back to for rows K-quants cannot hold (``q5_1``,
``q4_1``, ``iq4_nl``), without which its own preset mixes could not be written down.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from autoprune.errors import AutopruneError

_T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class GGUFType:
    """One tensor type: its GGML enum, block layout, and how it is quantized."""

    name: str
    ggml: gguf.GGMLQuantizationType
    #: Whether the ``gguf`` package quantizes it (else llama.cpp's own quantizer does).
    python: bool
    #: Whether llama.cpp's quantizer weighs its rounding by an importance matrix.
    imatrix: bool

    @property
    def block(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.ggml][0]

    @property
    def block_bytes(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def holds(self, cols: int) -> bool:
        """Whether a row of ``cols`` weights can be stored in this type."""
        return cols % self.block == 0


#: Every type a plan may name, from most to fewest bytes per weight (ties: the 32-block type last).
GGUF_TENSOR_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("f16", _T.F16, python=True, imatrix=False),
        GGUFType("q8_0", _T.Q8_0, python=True, imatrix=False),
        GGUFType("q6_k", _T.Q6_K, python=False, imatrix=True),
        GGUFType("q5_1", _T.Q5_1, python=True, imatrix=True),
        GGUFType("q5_k", _T.Q5_K, python=False, imatrix=True),
        GGUFType("q5_0", _T.Q5_0, python=True, imatrix=True),
        GGUFType("q4_1", _T.Q4_1, python=True, imatrix=True),
        GGUFType("q4_k", _T.Q4_K, python=False, imatrix=True),
        GGUFType("iq4_nl", _T.IQ4_NL, python=False, imatrix=True),
        GGUFType("q4_0", _T.Q4_0, python=True, imatrix=True),
        GGUFType("q3_k", _T.Q3_K, python=False, imatrix=True),
        GGUFType("q2_k", _T.Q2_K, python=False, imatrix=True),
    )
}
#: The types a search offers by default (the 32-block fallbacks are offered too where a row cannot
#: hold a K-quant: see :func:`offered_types`).
DEFAULT_SEARCH_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "q4_0", "q3_k", "q2_k")
#: llama.cpp's ``tensor_type_fallback``: the type written where a row cannot hold the one asked for.
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def gguf_type(name: str) -> GGUFType:
    """The type called ``name``, or a one-line error listing the types llama.cpp writes and runs."""
    found = GGUF_TENSOR_TYPES.get(name)
    if found is None:
        raise AutopruneError(
            f"GGUF type {name!r} is not one llama.cpp both writes and runs here "
            f"(known: {', '.join(GGUF_TENSOR_TYPES)})"
        )
    return found


def tensor_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes a ``rows`` x ``cols`` tensor takes in type ``name`` (its rows must hold it)."""
    kind = gguf_type(name)
    return rows * (cols // kind.block) * kind.block_bytes


def llama_cpp_fallback(name: str, cols: int) -> str:
    """The type llama.cpp writes for a row of ``cols`` weights asked to be ``name``: ``name``
    itself where its block divides the row, else llama.cpp's fallback, else ``f16``."""
    if gguf_type(name).holds(cols):
        return name
    fallback = _FALLBACK.get(name)
    return fallback if fallback is not None and gguf_type(fallback).holds(cols) else "f16"


def offered_types(cols: int, names: tuple[str, ...] = DEFAULT_SEARCH_TYPES) -> tuple[str, ...]:
    """The types a search offers a tensor of ``cols``-wide rows: those of ``names`` it can hold and
    the fallbacks llama.cpp would write for the others, most bytes first."""
    chosen = {llama_cpp_fallback(name, cols) for name in names}
    return tuple(name for name in GGUF_TENSOR_TYPES if name in chosen)
