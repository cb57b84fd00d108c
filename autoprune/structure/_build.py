"""Building the physically smaller model a structure describes.

Heads, KV heads and FFN channels are cut out of q/k/v/o and gate/up/down, sub-blocks and blocks
that go are left out, and the result is a new model whose tensors are only what is kept: equal
widths in every kept block give a stock ``LlamaForCausalLM`` with a plain ``LlamaConfig``; blocks
that differ give :class:`SubnetLlamaForCausalLM` over a ``per_layer_config`` (see
:mod:`autoprune.models.remote.modeling_subnet_llama`). The new model generates as the dense one
does: it carries the dense model's generation config.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from autoprune.calibration import CalibrationStats
from autoprune.errors import AutopruneError
from autoprune.models import LlamaFamilyAdapter
from autoprune.models.remote import REMOTE_CLASS, REMOTE_MODULE
from autoprune.models.remote.modeling_subnet_llama import SubnetLlamaForCausalLM
from autoprune.structure._methods import StructuredMethod
from autoprune.structure._schema import BlockShape, ModelDims, Structure, resolve_blocks
from autoprune.structure._select import UnitLayout, least_squares_correction, weighted_scores

T = TypeVar("T")


@dataclass(frozen=True)
class BlockCut:
    """What one kept block keeps: its shape, and which original query heads and FFN channels."""

    index: int
    shape: BlockShape
    heads: list[int]
    channels: list[int]


def model_dims(model: PreTrainedModel) -> ModelDims:
    """The dense shape of ``model``, or a one-line error when it is not a dense LLaMA-family model."""
    config = model.config
    if config.model_type not in LlamaFamilyAdapter.model_types:
        raise AutopruneError(
            f"sub-networks need a LLaMA-family model, not {config.model_type!r}"
        )
    if getattr(config, "is_heterogeneous", False):
        raise AutopruneError("sub-networks are cut from a dense model, not from one already cut")
    return ModelDims.of(config)


def unit_scores(model: PreTrainedModel, stats: CalibrationStats) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block, each query head's and FFN channel's importance from the calibration statistics:
    the output energy its ``o_proj`` / ``down_proj`` columns carry (:func:`weighted_scores`)."""
    dims, adapter = model_dims(model), LlamaFamilyAdapter()
    scores = []
    for index in range(dims.num_blocks):
        per_kind = []
        for layout, part in ((dims.head_layout, "self_attn.o_proj"), (dims.ffn_layout, "mlp.down_proj")):
            name = adapter.layer_name(index, part)
            weight = model.get_submodule(name).weight.detach().float().cpu()
            per_kind.append(weighted_scores(stats.layer(name).sq_norm, weight, layout))
        scores.append((per_kind[0], per_kind[1]))
    return scores


class CutStore(Protocol):
    """Where cuts outlive a process: :class:`autoprune.variants.CutStore`, in a variant database."""

    def load(self, key: tuple) -> list[int] | torch.Tensor | None: ...

    def save(self, key: tuple, value: list[int] | torch.Tensor) -> None: ...


class CutCache:
    """Kept units and corrected consuming weights of (what, block, method, width) already cut,
    newest last, at most ``size`` of them: a search's trials share most block widths, and a width
    is the same cut in every trial, so it is chosen and corrected once. With a ``store`` (a
    variant database) a cut computed in one process is read in the next."""

    def __init__(self, size: int = 512, store: CutStore | None = None) -> None:
        self.size = size
        self.store = store
        self._entries: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, compute: Callable[[], T]) -> T:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self.store.load(key) if self.store is not None else None
        if value is None:
            value = compute()
            if self.store is not None:
                self.store.save(key, value)
        self._entries[key] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value


def choose_cuts(
    model: PreTrainedModel,
    stats: CalibrationStats | None,
    structure: Structure,
    removed: list[int],
    cache: CutCache | None = None,
) -> list[BlockCut]:
    """Each kept block's cut; the structured method reads ``stats`` (needed only where a block
    keeps fewer heads or channels than it has)."""
    dims = model_dims(model)
    shapes = resolve_blocks(structure, removed, dims)
    method = StructuredMethod.get(structure.method)
    cache = cache or CutCache()
    heads_layout, ffn_layout = dims.head_layout, dims.ffn_layout
    cuts = []
    for index, shape in enumerate(shapes):
        if shape is None:
            continue
        heads = _kept(model, stats, method, index, "self_attn.o_proj", heads_layout,
                      shape.kv_groups, shape.heads_per_group, cache, ("heads", index, structure.method))
        channels = _kept(model, stats, method, index, "mlp.down_proj", ffn_layout, 1, shape.ffn,
                         cache, ("channels", index, structure.method))
        cuts.append(BlockCut(index, shape, heads, channels))
    return cuts


def _kept(
    model: PreTrainedModel,
    stats: CalibrationStats | None,
    method: StructuredMethod,
    index: int,
    layer: str,
    layout: UnitLayout,
    groups: int,
    per_group: int,
    cache: CutCache,
    key: tuple,
) -> list[int]:
    """The units a sub-block keeps at ``groups`` x ``per_group``: all or none at once, else
    chosen by ``method`` (through ``cache``, under ``key`` and the width)."""
    if per_group == 0 or groups == 0:
        return []
    if groups == layout.n_groups and per_group == layout.units_per_group:
        return list(range(layout.n_units))
    if stats is None:
        raise AutopruneError("cutting heads or channels needs calibration statistics")
    name = LlamaFamilyAdapter().layer_name(index, layer)

    def select() -> list[int]:
        weight = model.get_submodule(name).weight.detach().cpu()  # beside the statistics
        return method.select(weight, stats.layer(name), layout, groups, per_group)

    return cache.get((*key, groups, per_group), select)  # a hit copies no weight off the device


def build_subnet(
    model: PreTrainedModel,
    stats: CalibrationStats | None,
    structure: Structure,
    removed: list[int] | None = None,
    cache: CutCache | None = None,
    cuts: list[BlockCut] | None = None,
) -> PreTrainedModel:
    """The smaller model ``structure`` (and ``removed`` blocks) makes of the dense ``model``.
    ``model`` is left unchanged; the new model holds new tensors for what it cuts and shares the
    rest (embeddings, norms, whole layers) with ``model``. ``cache`` keeps cuts across calls;
    ``cuts`` names the kept units outright (a learned structure's) instead of the method."""
    # Normal tensors even when called under inference mode: cached cuts outlive the call, and a
    # model cannot take inference tensors as parameters outside inference mode.
    with torch.inference_mode(False), torch.no_grad():
        return _build(model, stats, structure, list(removed or []), cache or CutCache(), cuts)


def _build(
    model: PreTrainedModel, stats: CalibrationStats | None, structure: Structure, removed: list[int],
    cache: CutCache, cuts: list[BlockCut] | None,
) -> PreTrainedModel:
    cuts = cuts if cuts is not None else choose_cuts(model, stats, structure, removed, cache)
    dims = model_dims(model)
    config = subnet_config(model.config, [cut.shape for cut in cuts], dims)
    state = _sliced_state(model, stats, cuts, dims, structure, cache)
    cls = SubnetLlamaForCausalLM if config.is_heterogeneous else LlamaForCausalLM
    with torch.device("meta"):  # no random initialization of weights that are replaced at once
        subnet = cls(config)
    subnet.load_state_dict(state, strict=True, assign=True)
    subnet.model.rotary_emb = type(subnet.model.rotary_emb)(config=config)  # its buffers are not state
    subnet.tie_weights()
    # the source's generation settings, not those derived from the cut config (use_cache among them)
    subnet.generation_config = copy.deepcopy(model.generation_config)
    subnet.eval()
    dense = next(model.parameters())
    return subnet.to(device=dense.device, dtype=dense.dtype)  # the rotary buffers are made on the CPU


def subnet_config(dense: LlamaConfig, shapes: list[BlockShape], dims: ModelDims) -> LlamaConfig:
    """A plain ``LlamaConfig`` when every kept block has the same full shape, else the dense
    config with per-block differences in ``per_layer_config`` and ``auto_map`` to the shipped
    modelling file."""
    base = dense.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "per_layer_config"):
        base.pop(key, None)
    base.update(num_hidden_layers=len(shapes), head_dim=dims.head_dim)
    first = shapes[0]
    if all(shape == first for shape in shapes) and first.heads > 0 and first.ffn > 0:
        base.update(
            num_attention_heads=first.heads,
            num_key_value_heads=first.kv_groups,
            intermediate_size=first.ffn,
            architectures=["LlamaForCausalLM"],
        )
        return LlamaConfig(**base)
    per_layer = {index: _layer_overrides(shape, dims) for index, shape in enumerate(shapes)}
    base.update(
        architectures=["LlamaForCausalLM"],
        auto_map={"AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"},
        # LlamaConfig's own checks read the head count globally; the dense values stay global.
        allow_global_per_layer_attribute_access=True,
        per_layer_config={k: v for k, v in per_layer.items() if v},
    )
    return LlamaConfig(**base)


def _layer_overrides(shape: BlockShape, dims: ModelDims) -> dict:
    overrides: dict = {}
    skip = []
    if shape.heads == 0:
        skip.append("self_attn")
    elif shape.heads != dims.num_heads or shape.kv_groups != dims.num_kv_heads:
        overrides.update(num_attention_heads=shape.heads, num_key_value_heads=shape.kv_groups)
    if shape.ffn == 0:
        skip.append("mlp")
    elif shape.ffn != dims.ffn:
        overrides["intermediate_size"] = shape.ffn
    if skip:
        overrides["skip"] = skip
    return overrides


def _sliced_state(
    model: PreTrainedModel,
    stats: CalibrationStats | None,
    cuts: list[BlockCut],
    dims: ModelDims,
    structure: Structure,
    cache: CutCache,
) -> dict[str, torch.Tensor]:
    """The new model's state dict: everything outside the blocks as is, kept blocks renumbered."""
    source = {k: v.detach() for k, v in model.state_dict().items()}
    prefix = LlamaFamilyAdapter.blocks_path + "."
    state = {k: v for k, v in source.items() if not k.startswith(prefix)}
    correct = structure.correct
    heads_layout = dims.head_layout
    for new_index, cut in enumerate(cuts):
        old, new = f"{prefix}{cut.index}.", f"{prefix}{new_index}."

        def put(name: str, tensor: torch.Tensor, new: str = new) -> None:
            state[new + name] = tensor.contiguous()

        if cut.heads:
            q_rows = torch.tensor(heads_layout.columns(cut.heads))
            kv_heads = sorted({head // dims.heads_per_group for head in cut.heads})
            kv_rows = torch.tensor(UnitLayout(dims.head_dim, 1, dims.num_kv_heads).columns(kv_heads))
            producers = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows}
            # the kept heads follow from the block, method and width: those name the cut
            key = ("o_proj", cut.index, structure.method, correct, cut.shape.kv_groups, cut.shape.heads_per_group)
            _put_sub_block(source, old, put, producers, "self_attn.o_proj", q_rows, "input_layernorm",
                           lambda compute, key=key: cache.get(key, compute), stats, correct)
        if cut.channels:
            rows = torch.tensor(cut.channels)
            producers = {"mlp.gate_proj": rows, "mlp.up_proj": rows}
            key = ("down_proj", cut.index, structure.method, correct, cut.shape.ffn)
            _put_sub_block(source, old, put, producers, "mlp.down_proj", rows, "post_attention_layernorm",
                           lambda compute, key=key: cache.get(key, compute), stats, correct)
    return state


def _put_sub_block(
    source: dict[str, torch.Tensor],
    old: str,
    put: Callable[[str, torch.Tensor], None],
    producers: dict[str, torch.Tensor],
    consumer: str,
    columns: torch.Tensor,
    norm: str,
    cached: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
    stats: CalibrationStats | None,
    correct: bool,
) -> None:
    """One kept sub-block: its producing layers' kept rows, its consuming layer on the kept input
    ``columns`` (corrected, through ``cached``), the consumer's bias and the sub-block's norm."""
    for layer, rows in producers.items():
        for kind in ("weight", "bias"):
            if f"{old}{layer}.{kind}" in source:
                tensor = source[f"{old}{layer}.{kind}"]
                put(f"{layer}.{kind}", tensor if len(rows) == tensor.shape[0] else tensor[rows])
    weight = source[f"{old}{consumer}.weight"]
    if len(columns) == weight.shape[1]:  # nothing cut: the dense layer itself
        put(f"{consumer}.weight", weight)
    else:
        # a cut comes on the CPU (solved there, or read from a database), in the dtype it was made in
        cut = cached(lambda: _consumer(weight, columns, stats, old + consumer, correct))
        put(f"{consumer}.weight", cut.to(weight.device, weight.dtype))
    if f"{old}{consumer}.bias" in source:
        put(f"{consumer}.bias", source[f"{old}{consumer}.bias"])
    put(f"{norm}.weight", source[f"{old}{norm}.weight"])


def _consumer(
    weight: torch.Tensor,
    columns: torch.Tensor,
    stats: CalibrationStats | None,
    layer: str,
    correct: bool,
) -> torch.Tensor:
    """The consuming layer restricted to the kept input columns, least-squares corrected when
    asked."""
    if not correct:
        return weight[:, columns]
    if stats is None:
        raise AutopruneError("the least-squares correction needs calibration statistics")
    # solved beside the statistics, on the CPU, whatever device the model is on
    return least_squares_correction(weight.cpu(), stats.layer(layer).xtx, columns.tolist())


def decoder_linear_params(shapes: list[BlockShape | None], dims: ModelDims) -> int:
    """Decoder linear weights a structure keeps, from shapes alone (what the search budgets)."""
    return sum(rows * cols for rows, cols in kept_layer_shapes(shapes, dims).values())


def kept_layer_shapes(shapes: list[BlockShape | None], dims: ModelDims) -> dict[str, tuple[int, int]]:
    """(rows, columns) of every decoder linear layer the blocks' ``shapes`` keep (``None``: a
    removed block), by the layer's name in the dense model."""
    adapter = LlamaFamilyAdapter()
    kept: dict[str, tuple[int, int]] = {}
    for index, shape in enumerate(shapes):
        if shape is None:
            continue
        q, kv = shape.heads * dims.head_dim, shape.kv_groups * dims.head_dim
        layers = {}
        if shape.heads:
            layers.update({"self_attn.q_proj": (q, dims.hidden), "self_attn.k_proj": (kv, dims.hidden),
                           "self_attn.v_proj": (kv, dims.hidden), "self_attn.o_proj": (dims.hidden, q)})
        if shape.ffn:
            layers.update({"mlp.gate_proj": (shape.ffn, dims.hidden), "mlp.up_proj": (shape.ffn, dims.hidden),
                           "mlp.down_proj": (dims.hidden, shape.ffn)})
        kept.update({adapter.layer_name(index, layer): size for layer, size in layers.items()})
    return kept
