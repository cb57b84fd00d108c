"""GGUF types per tensor: ``gguf`` alone, ``subnet-gguf`` with the ``subnet`` space's widths.

One categorical parameter per decoder linear layer (``type_<block>_<projection>``), one for the
token embeddings (``type_embeddings``, also the output head where it is tied) and one for an untied
output head (``type_output``), each offering the types its rows can hold: the default search set
(:data:`~autoprune.quantization.DEFAULT_SEARCH_TYPES`) with every type a row cannot hold replaced by
the one llama.cpp falls back to, and whatever llama.cpp's presets give that tensor. ``imatrix``
chooses whether rounding is weighed by the calibration inputs (llama.cpp's importance matrix). The
cast is the identity, so every allocation, llama.cpp's presets included, is a point of the space:
a genetic sampler (NSGA-II) searches types per layer the way EvoPress's evolution does, at every
size at once, and ``refine`` then moves bits between layers at a trial's bytes.

Baselines (the dense model at each uniform type, as ``llama-quantize --pure`` writes it, and
llama.cpp's Q4_K_M, Q3_K_M, Q2_K mixes, each at its exact bytes) are what the tools give without
an importance matrix; the seeds are the same allocations with one.

``subnet-gguf`` casts the ``subnet`` parameters to widths first; a down projection whose cut width
cannot hold the type asked for gets llama.cpp's fallback, so a plan only ever names types its
tensors can hold. Its lightest target (0 by default: no cut) carries the dense baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution

from autoprune.errors import AutopruneError
from autoprune.gguf_size import GGUFContext
from autoprune.plan import Plan
from autoprune.quantization import (
    DEFAULT_SEARCH_TYPES,
    EMBEDDINGS,
    GGUF_TENSOR_TYPES,
    OUTPUT,
    Quantization,
    llama_cpp_fallback,
    offered_types,
)
from autoprune.structure import kept_layer_shapes, resolve_blocks
from search_spaces._base import TARGET, Params, SearchSpace, SpaceContext
from search_spaces._subnet import N_REMOVED, SubnetSpace, attn_key, ffn_key

IMATRIX = "imatrix"
#: The uniform types and presets whose importance-weighted versions seed a study.
SEEDED_UNIFORM = ("q6_k", "q5_k", "q4_k", "q4_0", "q3_k", "q2_k")


def type_param(tensor: str, ctx: SpaceContext) -> str:
    """The parameter of a tensor's type: ``type_<block>_<projection>``, ``type_embeddings``,
    ``type_output``."""
    info = ctx.layers.get(tensor)
    return f"type_{tensor}" if info is None else f"type_{info.block}_{info.projection}"


def _gguf(ctx: SpaceContext) -> GGUFContext:
    if ctx.gguf is None or ctx.dims is None:
        raise AutopruneError(
            "a space of GGUF types needs a LLaMA-family model that GGUF can hold, and the search's "
            "GGUF context (its objectives include gguf_bytes)"
        )
    return ctx.gguf


def _tensors(ctx: SpaceContext) -> dict[str, int]:
    """The dense row length of every tensor a plan gives a type, by its name in the plan."""
    gguf = _gguf(ctx)
    tensors = {name: info.cols for name, info in ctx.layers.items()}
    tensors[EMBEDDINGS] = gguf.sizer.dims.hidden
    if not gguf.sizer.tied:
        tensors[OUTPUT] = gguf.sizer.dims.hidden
    return tensors


def type_distributions(ctx: SpaceContext) -> dict[str, BaseDistribution]:
    """One categorical per tensor: the types its rows hold, and those llama.cpp's presets give it."""
    presets = list(_gguf(ctx).presets.values())
    distributions: dict[str, BaseDistribution] = {IMATRIX: CategoricalDistribution([False, True])}
    for tensor, cols in _tensors(ctx).items():
        chosen = {*offered_types(cols), *(preset.type_of(tensor) for preset in presets)}
        distributions[type_param(tensor, ctx)] = CategoricalDistribution(
            [name for name in GGUF_TENSOR_TYPES if name in chosen]
        )
    return distributions


def quantization_of(params: Params, ctx: SpaceContext, plan: Plan) -> Quantization:
    """The types ``params`` give the tensors ``plan`` keeps (a cut row that cannot hold its type
    gets llama.cpp's fallback)."""
    tensors = _tensors(ctx)
    if plan.structure is not None or plan.removed_blocks:
        dims = _gguf(ctx).sizer.dims
        kept = kept_layer_shapes(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims)
        tensors = {name: kept[name][1] if name in ctx.layers else cols
                   for name, cols in tensors.items() if name in kept or name not in ctx.layers}
    types = {tensor: llama_cpp_fallback(params[type_param(tensor, ctx)], cols) for tensor, cols in tensors.items()}
    layers = {name: kind for name, kind in types.items() if name in ctx.layers}
    return Quantization(layers=layers, embeddings=types[EMBEDDINGS], output=types.get(OUTPUT),
                        imatrix=bool(params[IMATRIX]))


def type_params(ctx: SpaceContext, quantization: Quantization) -> Params:
    """A quantization of the dense model written as the spaces' type parameters."""
    return {IMATRIX: quantization.imatrix,
            **{type_param(tensor, ctx): quantization.type_of(tensor) for tensor in _tensors(ctx)}}


def known_mixes(ctx: SpaceContext, imatrix: bool, uniform: Sequence[str] = DEFAULT_SEARCH_TYPES) -> dict[str, Params]:
    """The dense model at each ``uniform`` type (as ``llama-quantize --pure`` writes it) and at
    llama.cpp's presets, as type parameters, with or without the importance matrix."""
    tensors = _tensors(ctx)
    mixes = {}
    for kind in uniform:
        types = {tensor: llama_cpp_fallback(kind, cols) for tensor, cols in tensors.items()}
        layers = {name: t for name, t in types.items() if name in ctx.layers}
        mixes[f"uniform-{kind}"] = Quantization(
            layers=layers, embeddings=types[EMBEDDINGS], output=types.get(OUTPUT), imatrix=imatrix
        )
    for name, preset in _gguf(ctx).presets.items():
        mixes[f"llama.cpp-{name}"] = preset.model_copy(update={"imatrix": imatrix})
    suffix = "+imatrix" if imatrix else ""
    return {f"{label}{suffix}": type_params(ctx, mix) for label, mix in mixes.items()}


class GGUFSpace(SearchSpace):
    """A GGUF type per decoder linear layer, token embeddings and output head; an importance
    matrix or not."""

    name = "gguf"
    has_target = False
    unstructured = False
    quantized = True

    def applies_to(self, ctx: SpaceContext) -> bool:
        return ctx.gguf is not None and ctx.dims is not None

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        return type_distributions(ctx)

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        plan = Plan(method=ctx.method)
        return plan.model_copy(update={"quantization": quantization_of(params, ctx, plan)})

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        return known_mixes(ctx, imatrix=False)

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        return known_mixes(ctx, imatrix=True, uniform=SEEDED_UNIFORM)


class SubnetGGUFSpace(SubnetSpace):
    """The ``subnet`` space's widths, then a GGUF type per kept tensor."""

    name = "subnet-gguf"
    default_range = (0.0, 0.4)
    quantized = True

    def applies_to(self, ctx: SpaceContext) -> bool:
        return super().applies_to(ctx) and ctx.gguf is not None

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        return {**super().distributions(ctx), **type_distributions(ctx)}

    def cast(self, params: Params, ctx: SpaceContext) -> Plan:
        plan = super().cast(params, ctx)
        return plan.model_copy(update={"quantization": quantization_of(params, ctx, plan)})

    def baselines(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """The dense model (the lightest target, no cut where that is 0) at every known mix, and
        the ``subnet`` baselines at each target with llama.cpp's Q4_K_M types."""
        lightest = {TARGET: ctx.sparsity_range[0], N_REMOVED: 0,
                    **{key(b): 0.0 for b in range(ctx.num_blocks) for key in (attn_key, ffn_key)}}
        result = {f"{label}@{lightest[TARGET]}": {**lightest, **mix}
                  for label, mix in known_mixes(ctx, imatrix=False).items()}
        q4km = known_mixes(ctx, imatrix=False, uniform=())["llama.cpp-Q4_K_M"]
        for label, widths in super().baselines(ctx, targets).items():
            result[f"{label}+Q4_K_M"] = {**widths, **q4km}
        return result

    def seeds(self, ctx: SpaceContext, targets: Sequence[float]) -> dict[str, Params]:
        """The ``subnet`` seeds with llama.cpp's Q4_K_M types and the importance matrix."""
        q4km = known_mixes(ctx, imatrix=True, uniform=())["llama.cpp-Q4_K_M+imatrix"]
        return {f"{label}+Q4_K_M+imatrix": {**widths, **q4km} for label, widths in super().seeds(ctx, targets).items()}
