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
32. Unstructured zeros are stored like any other value: a sparse model is no smaller here.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoprune.errors import AutopruneError
from autoprune.export import read_metadata
from autoprune.gguf_tokenizer import copy_tokenizer_metadata, write_tokenizer_metadata
from autoprune.models import load_model, resolve_alias

GGUF_TYPES = ("f16", "q8_0")
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
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
    unknown = sorted(name for name in state if _gguf_name(name) is None)
    if unknown:
        raise AutopruneError(f"GGUF export: tensor {unknown[0]} has no GGUF counterpart")
    widths = {*zip(heads, kv_heads, ffn)}
    architecture = "llama" if len(widths) == 1 and 0 not in heads + ffn else "deci"
    return GGUFLayout(architecture, head_dim, heads, kv_heads, ffn)


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    gguf_type: str = "f16",
    tokenizer_gguf: Path | None = None,
) -> GGUFLayout:
    """Write ``model`` to the new file ``path`` (complete or not at all); ``tokenizer_gguf`` is a
    GGUF whose tokenizer metadata to copy instead of converting ``tokenizer``."""
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
        writer = gguf.GGUFWriter(staging, layout.architecture)
        _write_header(writer, model, layout, gguf_type)
        vocab_rows = state["model.embed_tokens.weight"].shape[0]
        if tokenizer_gguf is not None:
            copy_tokenizer_metadata(writer, tokenizer_gguf, vocab_rows)
        else:
            write_tokenizer_metadata(writer, tokenizer, vocab_rows)
        for name, tensor in state.items():
            if not _orphan_norm(name, layout):
                _add_tensor(writer, name, tensor, layout, gguf_type)
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
    if not isinstance(spec, str):
        return None
    found = resolve_alias(spec) if not spec.endswith(".gguf") else Path(spec)
    return found if found is not None and found.is_file() else None


def _write_header(
    writer: gguf.GGUFWriter, model: PreTrainedModel, layout: GGUFLayout, gguf_type: str
) -> None:
    config = model.config
    name = getattr(config, "_name_or_path", "") or config.model_type
    writer.add_name(Path(str(name)).name or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
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
    writer.add_file_type(FILE_TYPES[gguf_type])


def _orphan_norm(name: str, layout: GGUFLayout) -> bool:
    """The norm of a sub-block that has no attention (no heads) or no FFN: llama.cpp's ``deci``
    creates no such tensor and refuses a file with tensors it did not ask for."""
    target = _gguf_name(name) or ""
    block = target.split(".")[1] if target.startswith("blk.") else None
    if block is None:
        return False
    index = int(block)
    return (target.endswith("attn_norm.weight") and layout.heads[index] == 0) or (
        target.endswith("ffn_norm.weight") and layout.ffn[index] == 0
    )


def _gguf_name(name: str) -> str | None:
    if name in _MODEL_TENSORS:
        return _MODEL_TENSORS[name]
    prefix, _, rest = name.partition("model.layers.")
    block, _, local = rest.partition(".")
    if prefix or not block.isdigit() or local not in _BLOCK_TENSORS:
        return None
    return f"blk.{block}.{_BLOCK_TENSORS[local]}"


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, layout: GGUFLayout, gguf_type: str
) -> None:
    target = _gguf_name(name)
    assert target is not None  # gguf_layout refused unknown tensors
    data = tensor.numpy()
    if target.endswith(("attn_q.weight", "attn_k.weight")):
        data = _interleave_rotary(data, layout.head_dim)
    if data.ndim == 1:
        writer.add_tensor(target, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(target, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
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
