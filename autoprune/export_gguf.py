"""Writing a LLaMA-family model as a GGUF file, the format llama.cpp and Ollama run.

Widths are read from the tensors, not the config, so a model with removed blocks (fewer layers) or
with per-block head and FFN counts (a sub-network) is described as it is. Equal widths in every
block give architecture ``llama``, which both llama.cpp and transformers' GGUF loader read. Blocks
that differ need per-layer ``head_count``, ``head_count_kv`` and ``feed_forward_length`` arrays:
llama.cpp's loader reads such arrays for every architecture, but its ``llama`` builder sizes every
block by block 0, while its ``deci`` builder (made for Nemotron-NAS, LLaMA blocks of varying width,
where a block may also have no attention or no FFN) sizes each block by its own entry. Those files
are written as ``deci``, which transformers' GGUF loader cannot turn into a model.

``f16`` stores matrices in half precision and norms in float32 (as llama.cpp's converter does);
``q8_0`` quantizes matrices whose rows are multiples of 32 to 8 bits per weight plus a scale per
32. Unstructured zeros are stored like any other value: a sparse model is no smaller here. A
quantized plan's tensors (:mod:`autoprune.quantization`) are written as the bytes it was measured
on, each in its own type (a mixed-type file).

A file's size follows from its layout alone (:func:`gguf_file_bytes`): the header and key-values
(the tokenizer's, measured once per model, are most of them), one tensor record per tensor, and
each tensor's bytes padded to the alignment; a search prices its plans by it (``gguf_bytes``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from autoprune.errors import AutopruneError
from autoprune.export import read_metadata
from autoprune.gguf_tokenizer import copy_tokenizer_metadata, write_tokenizer_metadata
from autoprune.models import load_model, resolve_alias
from autoprune.quantization import GGUF_TENSOR_TYPES, QuantizedTensor, tensor_bytes

GGUF_TYPES = ("f16", "q8_0")
_F = gguf.LlamaFileType
#: The file type a GGUF names (``general.file_type``) by the tensor type holding most of its bytes.
FILE_TYPES = {
    "f16": _F.MOSTLY_F16, "q8_0": _F.MOSTLY_Q8_0, "q6_k": _F.MOSTLY_Q6_K, "q5_1": _F.MOSTLY_Q5_1,
    "q5_k": _F.MOSTLY_Q5_K_S, "q5_0": _F.MOSTLY_Q5_0, "q4_1": _F.MOSTLY_Q4_1, "q4_k": _F.MOSTLY_Q4_K_S,
    "iq4_nl": _F.MOSTLY_IQ4_NL, "q4_0": _F.MOSTLY_Q4_0, "q3_k": _F.MOSTLY_Q3_K_S, "q2_k": _F.MOSTLY_Q2_K,
}
#: Model types whose blocks are LLaMA's (RMSNorm, rotary attention, SwiGLU, no biases).
LLAMA_TYPES = ("llama", "mistral")

_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_MODEL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass(frozen=True)
class GGUFLayout:
    """What the GGUF header says about the model: widths per block and the architecture name."""

    architecture: str
    head_dim: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]

    @property
    def uniform(self) -> bool:
        return len({*zip(self.heads, self.kv_heads, self.ffn)}) == 1


def check_gguf_type(name: str) -> None:
    if name not in GGUF_TYPES:
        raise AutopruneError(f"unknown GGUF type {name!r} (expected {' or '.join(GGUF_TYPES)})")


def gguf_layout(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> GGUFLayout:
    """The layout of ``model``, or a one-line error naming what GGUF cannot express."""
    config = model.config
    if config.model_type not in LLAMA_TYPES:
        raise AutopruneError(
            f"GGUF export supports the LLaMA family ({', '.join(LLAMA_TYPES)}), "
            f"not model type {config.model_type!r}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise AutopruneError(f"GGUF export: {flag} has no place in a llama GGUF")
    if getattr(config, "sliding_window", None):
        raise AutopruneError("GGUF export: sliding-window attention is not expressed as llama")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise AutopruneError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads, ffn = [], [], []
    for block in range(config.num_hidden_layers):
        prefix = f"model.layers.{block}."
        q, k = state.get(prefix + "self_attn.q_proj.weight"), state.get(prefix + "self_attn.k_proj.weight")
        gate = state.get(prefix + "mlp.gate_proj.weight")
        heads.append(0 if q is None else q.shape[0] // head_dim)
        kv_heads.append(0 if k is None else k.shape[0] // head_dim)
        ffn.append(0 if gate is None else gate.shape[0])
    unknown = sorted(name for name in state if gguf_name(name) is None)
    if unknown:
        raise AutopruneError(f"GGUF export: tensor {unknown[0]} has no GGUF counterpart")
    return layout_of(head_dim, heads, kv_heads, ffn)


def layout_of(head_dim: int, heads: list[int], kv_heads: list[int], ffn: list[int]) -> GGUFLayout:
    """The layout of blocks of these widths: ``llama`` where all are equal and whole, else ``deci``."""
    widths = {*zip(heads, kv_heads, ffn)}
    architecture = "llama" if len(widths) == 1 and 0 not in heads + ffn else "deci"
    return GGUFLayout(architecture, head_dim, heads, kv_heads, ffn)


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    gguf_type: str = "f16",
    tokenizer_gguf: Path | None = None,
    quantized: Mapping[str, QuantizedTensor] | None = None,
) -> GGUFLayout:
    """Write ``model`` to the new file ``path`` (complete or not at all); ``tokenizer_gguf`` is a
    GGUF whose tokenizer metadata to copy instead of converting ``tokenizer``. ``quantized``
    tensors (by parameter name) are written as their bytes, in their types; other matrices as
    ``gguf_type``."""
    check_gguf_type(gguf_type)
    if path.exists():
        raise AutopruneError(f"GGUF file {path} already exists")
    if not path.parent.is_dir():
        raise AutopruneError(f"folder {path.parent} does not exist")
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    layout = gguf_layout(model, state)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
    os.close(handle)
    try:
        quantized = quantized or {}
        writer = gguf.GGUFWriter(staging, layout.architecture)
        types = {name: quantized[name].type if name in quantized else gguf_type
                 for name, tensor in state.items() if tensor.dim() == 2}
        _write_header(writer, model.config, layout, main_type(types, {n: tuple(t.shape) for n, t in state.items()}))
        vocab_rows = state["model.embed_tokens.weight"].shape[0]
        if tokenizer_gguf is not None:
            copy_tokenizer_metadata(writer, tokenizer_gguf, vocab_rows)
        else:
            write_tokenizer_metadata(writer, tokenizer, vocab_rows)
        for name, tensor in state.items():
            if not _orphan_norm(name, layout):
                _add_tensor(writer, name, tensor, layout, gguf_type, quantized.get(name))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        Path(staging).chmod(0o644)
        Path(staging).rename(path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return layout


def export_checkpoint_gguf(checkpoint: Path, path: Path, gguf_type: str = "f16") -> GGUFLayout:
    """Write the checkpoint folder ``checkpoint`` (an autoprune export or any LLaMA checkpoint) as
    the GGUF file ``path``. When autoprune's metadata says the model came from a GGUF (an alias or a
    ``.gguf``), that file's tokenizer metadata is reused."""
    check_gguf_type(gguf_type)
    loaded = load_model(str(checkpoint))
    return write_gguf(loaded.model, loaded.tokenizer, path, gguf_type, source_gguf(checkpoint))


def source_gguf(checkpoint: Path) -> Path | None:
    """The GGUF file the checkpoint's recipe names as its model, if any and if present."""
    spec = read_metadata(checkpoint).get("recipe", {}).get("model")
    return model_gguf(spec) if isinstance(spec, str) else None


def model_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec (an alias or a ``.gguf`` path) loads from, if any and present."""
    found = resolve_alias(spec) if not spec.endswith(".gguf") else Path(spec)
    return found if found is not None and found.is_file() else None


def _write_header(writer: gguf.GGUFWriter, config: PretrainedConfig, layout: GGUFLayout, file_type: str) -> None:
    """The model's key-values (all but the tokenizer's): ``config`` is the model's, ``layout`` its
    kept blocks' widths, ``file_type`` the tensor type holding most of its bytes."""
    name = getattr(config, "_name_or_path", "") or config.model_type
    writer.add_name(Path(str(name)).name or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layout.heads))
    writer.add_vocab_size(config.vocab_size)
    per_layer = not layout.uniform or layout.architecture == "deci"
    writer.add_feed_forward_length(layout.ffn if per_layer else layout.ffn[0])
    writer.add_head_count(layout.heads if per_layer else layout.heads[0])
    writer.add_head_count_kv(layout.kv_heads if per_layer else layout.kv_heads[0])
    writer.add_rope_dimension_count(layout.head_dim)
    if layout.head_dim * config.num_attention_heads != config.hidden_size or per_layer:
        writer.add_key_length(layout.head_dim)
        writer.add_value_length(layout.head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(FILE_TYPES[file_type])


def main_type(types: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Of the matrices' ``types`` (by name, with their ``shapes``), the one holding most bytes."""
    held: dict[str, int] = {}
    for name, kind in types.items():
        rows, cols = shapes[name]
        held[kind] = held.get(kind, 0) + tensor_bytes(kind, rows, cols)
    return max(held, key=lambda kind: (held[kind], kind)) if held else "f16"


def _orphan_norm(name: str, layout: GGUFLayout) -> bool:
    """The norm of a sub-block that has no attention (no heads) or no FFN: llama.cpp's ``deci``
    creates no such tensor and refuses a file with tensors it did not ask for."""
    target = gguf_name(name) or ""
    block = target.split(".")[1] if target.startswith("blk.") else None
    if block is None:
        return False
    index = int(block)
    return (target.endswith("attn_norm.weight") and layout.heads[index] == 0) or (
        target.endswith("ffn_norm.weight") and layout.ffn[index] == 0
    )


def parameter_name(target: str) -> str | None:
    """The parameter of a LLaMA-family model the GGUF tensor ``target`` holds (None: none)."""
    found = {gguf: name for name, gguf in _MODEL_TENSORS.items()}.get(target)
    block, _, local = target.removeprefix("blk.").partition(".")
    if found is None and target.startswith("blk.") and block.isdigit():
        found = next((f"model.layers.{block}.{name}" for name, gguf in _BLOCK_TENSORS.items() if gguf == local), None)
    return found


def gguf_name(name: str) -> str | None:
    """The GGUF name of the parameter ``name`` of a LLaMA-family model (None: it has none)."""
    if name in _MODEL_TENSORS:
        return _MODEL_TENSORS[name]
    prefix, _, rest = name.partition("model.layers.")
    block, _, local = rest.partition(".")
    if prefix or not block.isdigit() or local not in _BLOCK_TENSORS:
        return None
    return f"blk.{block}.{_BLOCK_TENSORS[local]}"


def _add_tensor(
    writer: gguf.GGUFWriter,
    name: str,
    tensor: torch.Tensor,
    layout: GGUFLayout,
    gguf_type: str,
    quantized: QuantizedTensor | None = None,
) -> None:
    target = gguf_name(name)
    assert target is not None  # gguf_layout refused unknown tensors
    rotary = target.endswith(("attn_q.weight", "attn_k.weight"))
    if quantized is not None:  # its rows, as bytes: moving rows moves their blocks
        data = _interleave_rotary(quantized.data, layout.head_dim) if rotary else quantized.data
        writer.add_tensor(target, data, raw_dtype=GGUF_TENSOR_TYPES[quantized.type].ggml)
        return
    data = tensor.numpy()
    if rotary:
        data = _interleave_rotary(data, layout.head_dim)
    if data.ndim == 1:
        writer.add_tensor(target, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        quantized_data = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(target, quantized_data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(target, data.astype(np.float16))


def _interleave_rotary(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder the rows of a query/key projection from transformers' rotary layout (first half,
    second half of each head) to GGML's (pairs side by side); transformers' loader undoes it."""
    rows, columns = weight.shape
    heads = rows // head_dim
    return (
        weight.reshape(heads, 2, head_dim // 2, columns).swapaxes(1, 2).reshape(rows, columns)
    )


def gguf_tensor_shapes(layout: GGUFLayout, hidden: int, vocab_rows: int, tied: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor :func:`write_gguf` writes for a model of ``layout``, by GGUF name
    (a block without attention or FFN has neither their weights nor their norm)."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab_rows, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab_rows, hidden)
    for block, (heads, kv_heads, ffn) in enumerate(zip(layout.heads, layout.kv_heads, layout.ffn, strict=True)):
        q, kv = heads * layout.head_dim, kv_heads * layout.head_dim
        if heads:
            shapes.update({f"blk.{block}.attn_norm.weight": (hidden,), f"blk.{block}.attn_q.weight": (q, hidden),
                           f"blk.{block}.attn_k.weight": (kv, hidden), f"blk.{block}.attn_v.weight": (kv, hidden),
                           f"blk.{block}.attn_output.weight": (hidden, q)})
        if ffn:
            shapes.update({f"blk.{block}.ffn_norm.weight": (hidden,), f"blk.{block}.ffn_gate.weight": (ffn, hidden),
                           f"blk.{block}.ffn_up.weight": (ffn, hidden), f"blk.{block}.ffn_down.weight": (hidden, ffn)})
    return shapes


def gguf_header_bytes(config: PretrainedConfig, layout: GGUFLayout, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of the header :func:`write_gguf` writes for a model of ``config`` and ``layout`` with
    tensors of ``shapes`` (by GGUF name), but the tokenizer's key-values: written to a scratch
    file as the writer writes it (tensor types and the file type change no size)."""
    writer = gguf.GGUFWriter(None, layout.architecture)
    _write_header(writer, config, layout, "f16")
    for name, shape in shapes.items():
        writer.add_tensor_info(name, shape, np.dtype(np.float32), 0, raw_dtype=gguf.GGMLQuantizationType.F32)
    return _written_bytes(writer)


def gguf_file_bytes(header_bytes: int, tokenizer_bytes: int, tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """The size of a GGUF file whose header (:func:`gguf_header_bytes`) and tokenizer key-values
    (:func:`tokenizer_metadata_bytes`) take these bytes and whose ``tensors`` (GGUF name: shape and
    type; vectors are float32 whatever the type) follow, each padded to the alignment."""
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    data = sum(
        gguf.GGUFWriter.ggml_pad(4 * shape[0] if len(shape) == 1 else tensor_bytes(kind, *shape), align)
        for shape, kind in tensors.values()
    )
    return gguf.GGUFWriter.ggml_pad(header_bytes + tokenizer_bytes, align) + data


def tokenizer_metadata_bytes(
    tokenizer: PreTrainedTokenizerBase, tokenizer_gguf: Path | None, vocab_rows: int
) -> int:
    """Bytes the tokenizer's key-values take in a GGUF file (copied from ``tokenizer_gguf`` or
    converted from ``tokenizer``, as :func:`write_gguf` does)."""
    empty = gguf.GGUFWriter(None, "llama")
    with_tokenizer = gguf.GGUFWriter(None, "llama")
    if tokenizer_gguf is not None:
        copy_tokenizer_metadata(with_tokenizer, tokenizer_gguf, vocab_rows)
    else:
        write_tokenizer_metadata(with_tokenizer, tokenizer, vocab_rows)
    return _written_bytes(with_tokenizer) - _written_bytes(empty)


def _written_bytes(writer: gguf.GGUFWriter) -> int:
    """Bytes of ``writer``'s header, key-values and tensor records, written to a scratch file."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.stat().st_size
