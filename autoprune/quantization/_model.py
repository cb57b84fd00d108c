"""A model's tensors as a plan's :class:`Quantization` quantizes them: which tensors (decoder
linear layers, token embeddings, an untied output head), under which names, and the model pointed
at their dequantized values."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from autoprune.calibration import LinearStats
from autoprune.quantization._quantize import QuantizedTensor, importance
from autoprune.quantization._quantizer import QuantJob
from autoprune.quantization._schema import EMBEDDINGS, OUTPUT, Quantization


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
