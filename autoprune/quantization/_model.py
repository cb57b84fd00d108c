"""A model's tensors as a plan's :class:`Quantization` quantizes them: which tensors (decoder
linear layers, token embeddings, an untied output head), their shapes in the model a plan makes,
under which names, and the model pointed at their dequantized values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from autoprune.calibration import LinearStats
from autoprune.errors import AutopruneError
from autoprune.models import LoadedModel
from autoprune.quantization._quantize import QuantizedTensor, importance
from autoprune.quantization._quantizer import QuantJob
from autoprune.quantization._schema import EMBEDDINGS, OUTPUT, Quantization, check_quantization
from autoprune.structure import kept_layer_shapes, model_dims, resolve_blocks

if TYPE_CHECKING:  # the plan module imports this package's schema
    from autoprune.plan import Plan


def embedding_tensors(model: PreTrainedModel) -> dict[str, str]:
    """``{parameter name: plan name}`` of the token embeddings and, unless tied to them, the output
    head (a tied head is the embeddings' tensor, stored once)."""
    modules = {id(module): name for name, module in model.named_modules()}
    embeddings = model.get_input_embeddings()
    found = {f"{modules[id(embeddings)]}.weight": EMBEDDINGS}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        found[f"{modules[id(head)]}.weight"] = OUTPUT
    return found


def quantization_jobs(
    quantization: Quantization,
    model: PreTrainedModel,
    linears: Mapping[str, tuple[str, torch.Tensor, LinearStats | None]],
) -> list[QuantJob]:
    """The jobs of ``model``'s quantized tensors: ``linears`` maps each decoder linear layer's name
    in the model to its dense name, its weight and its inputs' statistics (None: no importance
    matrix); the embeddings and output head are quantized without one, as llama.cpp does."""
    jobs = []
    for name, (dense, weight, stats) in linears.items():
        imatrix = importance(stats) if quantization.imatrix and stats is not None else None
        jobs.append(QuantJob(f"{name}.weight", dense, weight, quantization.type_of(dense), imatrix))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for tensor, source in embedding_tensors(model).items():
        jobs.append(QuantJob(tensor, source, parameters[tensor].detach(), quantization.type_of(source)))
    return jobs


def point_at(model: PreTrainedModel, tensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Point ``model``'s parameters named in ``tensors`` at their dequantized values (in each
    parameter's dtype and device); the values they held before, by name, to restore."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    before = {}
    for name, tensor in tensors.items():
        parameter = parameters[name]
        before[name] = parameter.data
        parameter.data = tensor.dequantized().to(parameter.device, parameter.dtype)
    return before


def gguf_row_lengths(loaded: LoadedModel, plan: Plan) -> dict[str, int]:
    """The row length of every 2-D tensor of the model ``plan`` makes (by its name in the plan's
    quantization: dense layer names, ``embeddings``, ``output``), checked against the types the
    plan gives them: a one-line error for a type a tensor cannot hold or a tied head given a type
    of its own."""
    lengths = {name: cols for name, (_rows, cols) in quantized_shapes(loaded, plan).items()}
    if plan.quantization is not None:
        if plan.quantization.output is not None and OUTPUT not in lengths:
            raise AutopruneError(
                "the model's output head is its token embeddings (tied): give their GGUF type as "
                "embeddings, not output"
            )
        check_quantization(plan.quantization, lengths, loaded.adapter.all_layer_names(loaded.model))
    return lengths


def quantized_shapes(loaded: LoadedModel, plan: Plan) -> dict[str, tuple[int, int]]:
    """(rows, columns) of every 2-D tensor of the model ``plan`` makes, by its name in a plan's
    quantization (dense layer names of the kept layers, ``embeddings``, an untied ``output``)."""
    model = loaded.model
    if plan.structure is not None:
        dims = model_dims(model)
        shapes = kept_layer_shapes(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims)
    else:
        removed = set(plan.removed_blocks)
        shapes = {
            name: tuple(model.get_submodule(name).weight.shape)
            for name in loaded.adapter.all_layer_names(model)
            if loaded.adapter.split_layer_name(name)[0] not in removed
        }
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for tensor, source in embedding_tensors(model).items():
        shapes[source] = tuple(parameters[tensor].shape)
    return shapes
