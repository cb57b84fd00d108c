"""GGUF quantization: a tensor type per decoder linear layer, token embeddings and output head.

The plan part (:class:`Quantization`, schema v3) is plain data; each type's block layout says what a
tensor costs in a GGUF file (:func:`tensor_bytes`); tensors are quantized by the ``gguf`` package
or llama.cpp's own quantizer (:func:`quantize_tensor`), once per (tensor, type, importance matrix)
(:class:`Quantizer`), and measured on their dequantized values, what llama.cpp computes with.
"""

from autoprune.quantization._ggml import available as llama_cpp_quantizer_available
from autoprune.quantization._model import (
    embedding_tensors,
    gguf_row_lengths,
    point_at,
    quantization_jobs,
    quantized_shapes,
)
from autoprune.quantization._quantize import QuantizedTensor, importance, quantize_tensor
from autoprune.quantization._quantizer import QuantJob, Quantizer, QuantStore
from autoprune.quantization._schema import (
    EMBEDDINGS,
    OUTPUT,
    Quantization,
    TypeName,
    check_quantization,
)
from autoprune.quantization._types import (
    DEFAULT_SEARCH_TYPES,
    GGUF_TENSOR_TYPES,
    GGUFType,
    gguf_type,
    llama_cpp_fallback,
    offered_types,
    tensor_bytes,
)

__all__ = [
    "DEFAULT_SEARCH_TYPES",
    "EMBEDDINGS",
    "GGUF_TENSOR_TYPES",
    "OUTPUT",
    "GGUFType",
    "QuantJob",
    "QuantStore",
    "Quantization",
    "QuantizedTensor",
    "Quantizer",
    "TypeName",
    "check_quantization",
    "embedding_tensors",
    "gguf_row_lengths",
    "gguf_type",
    "importance",
    "llama_cpp_fallback",
    "llama_cpp_quantizer_available",
    "offered_types",
    "point_at",
    "quantization_jobs",
    "quantize_tensor",
    "quantized_shapes",
    "tensor_bytes",
]
