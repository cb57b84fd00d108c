"""GGUF types per tensor: llama.cpp's own quantizer and presets reproduced, a quantized plan's file
written as measured (bytes for bytes, values bit for bit, size as counted), and the refusals."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from autoprune import CalibrationConfig, Plan, Pruner, prepare, prune
from autoprune.export_gguf import model_gguf, parameter_name, write_gguf
from autoprune.gguf_presets import llama_cpp_presets
from autoprune.gguf_size import GGUFSizer
from autoprune.quantization import (
    GGUF_TENSOR_TYPES,
    Quantization,
    importance,
    llama_cpp_fallback,
    quantize_tensor,
)
from autoprune.quantization import _ggml
from autoprune.structure import BlockWidths, Structure
from autoprune.variants import VariantDatabase


@pytest.fixture(scope="module")
def prepared(gguf_llama_dir, data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    loaded, stats, _ = prepare(str(gguf_llama_dir), CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=32),
                               cache, False)
    return loaded, stats, cache


def test_plans_of_version_2_read_and_cannot_carry_types():
    old = Plan.from_json('{"schema_version": 2, "method": "wanda", "removed_blocks": [1]}')
    assert old.quantization is None and old.removed_blocks == [1]
    with pytest.raises(ValueError, match="needs schema_version 3"):
        Plan(schema_version=2, quantization=Quantization())
    typed = Plan(quantization=Quantization(layers={"a": "q4_k"}, embeddings="q8_0", imatrix=True))
    assert Plan.from_json(typed.to_json()) == typed and typed.schema_version == 3


@pytest.mark.parametrize("name", list(GGUF_TENSOR_TYPES))
def test_every_type_is_llama_cpps_bytes_and_values(name):
    kind = GGUF_TENSOR_TYPES[name]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 512, generator=generator)
    imatrix = torch.rand(512, generator=generator).numpy()
    quantized = quantize_tensor(weight, name)
    ggml_bytes = _ggml.quantize(weight.numpy(), int(kind.ggml), None)
    assert np.array_equal(quantized.data, ggml_bytes)  # the gguf package writes llama.cpp's bytes
    values = _ggml.dequantize(quantized.data, int(kind.ggml), (8, 512))
    assert np.array_equal(quantized.dequantized().numpy().view(np.uint32), values.view(np.uint32))
    weighted = quantize_tensor(weight, name, imatrix)
    assert weighted.nbytes == quantized.nbytes == 8 * 512 // kind.block * kind.block_bytes
    assert np.array_equal(weighted.data, quantized.data) != kind.imatrix


def pure_file(source: Path, out: Path, ftype: int, **extra) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, 1, True
    for key, value in extra.items():
        setattr(params, key, value)
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize(("ftype", "name"), [(gguf.LlamaFileType.MOSTLY_Q4_K_S, "q4_k"),
                                             (gguf.LlamaFileType.MOSTLY_Q3_K_S, "q3_k"),
                                             (gguf.LlamaFileType.MOSTLY_Q6_K, "q6_k")])
def test_per_tensor_quantization_is_what_llama_quantize_writes(prepared, tmp_path, ftype, name):
    """``llama-quantize --pure`` to one type writes, tensor for tensor, the types of the fallback
    rule and the bytes of the per-tensor quantizer (from the f16 file's values, as it reads them).
    The embeddings are given the fallback type: llama.cpp aborts on a type their rows cannot hold."""
    loaded = prepared[0]
    source = tmp_path / "f16.gguf"
    write_gguf(loaded.model, loaded.tokenizer, source, "f16", model_gguf(loaded.spec))
    kind = int(GGUF_TENSOR_TYPES[llama_cpp_fallback(name, loaded.model.config.hidden_size)].ggml)
    out = pure_file(source, tmp_path / "pure.gguf", int(ftype), token_embedding_type=kind, output_tensor_type=kind)
    reader = gguf.GGUFReader(out)
    parameters = dict(loaded.model.named_parameters())
    for tensor in reader.tensors:
        if len(tensor.shape) != 2:
            continue
        weight = parameters[parameter_name(tensor.name)].detach()
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            continue  # rows reordered for rotary; their bytes are compared through export below
        want = llama_cpp_fallback(name, weight.shape[1])
        assert GGUF_TENSOR_TYPES[want].ggml == tensor.tensor_type, tensor.name
        ours = quantize_tensor(weight.half().float(), want)
        assert np.array_equal(ours.data.reshape(-1), np.asarray(tensor.data).view(np.uint8).reshape(-1)), tensor.name


def test_presets_are_the_types_llama_quantize_writes(prepared, tmp_path):
    loaded, _, cache = prepared
    presets = llama_cpp_presets(loaded, cache)
    assert set(presets) == {"Q4_K_M", "Q3_K_M", "Q2_K"}
    q4km = presets["Q4_K_M"]
    assert q4km.embeddings == "q8_0"  # 320-wide rows cannot hold the output's q6_k: llama.cpp's q8_0
    assert q4km.type_of("model.layers.2.mlp.down_proj") == "q6_k"  # the last block: more bits
    assert q4km.type_of("model.layers.0.self_attn.q_proj") == "q5_0"  # q4_k falls back to q5_0
    assert llama_cpp_presets(loaded, cache) == presets  # read back from the cache
    assert list((cache / "gguf-presets").iterdir())


def mixed_types(prepared, removed=(), structure=None, imatrix=True) -> Plan:
    """A plan giving every kind of tensor another type (K-quants where a row holds them)."""
    loaded = prepared[0]
    names = loaded.adapter.all_layer_names(loaded.model)
    choice = {"q_proj": "q5_0", "k_proj": "q4_1", "v_proj": "q8_0", "o_proj": "q4_0", "gate_proj": "q5_1",
              "up_proj": "iq4_nl", "down_proj": "q3_k"}
    down = ("q4_k", "q3_k", "q2_k")
    layers = {name: choice[name.rsplit(".", 1)[1]] for name in names}
    layers.update({name: down[i % 3] for i, name in enumerate(n for n in names if n.endswith("down_proj"))})
    if structure is not None:  # the cut FFN's 384 inputs hold no K-quant: llama.cpp's fallback
        layers = {name: llama_cpp_fallback(kind, 384) if name.endswith("down_proj") else kind
                  for name, kind in layers.items()}
    quantization = Quantization(layers=layers, embeddings="q8_0", imatrix=imatrix)
    return Plan(removed_blocks=list(removed), structure=structure, quantization=quantization)


def file_values(path: Path, head_dim: int) -> dict[str, torch.Tensor]:
    """Every matrix of a GGUF file dequantized by the gguf package, by parameter name (the query and
    key rows back in transformers' rotary order)."""
    values = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) != 2:
            continue
        rows = int(tensor.shape[1])
        array = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(rows, -1)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = rows // head_dim
            array = array.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)
        values[parameter_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return values


SHAPES = {
    "dense": {},
    "removed-blocks": {"removed": [1]},
    "sub-network": {"structure": Structure(blocks={0: BlockWidths(ffn=384), 2: BlockWidths(kv_groups=1)},
                                           every_block=BlockWidths(ffn=384))},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_file_holds_the_measured_weights_at_the_counted_bytes(prepared, gguf_llama_dir, data_dir, tmp_path, shape):
    loaded, stats, cache = prepared
    plan = mixed_types(prepared, **SHAPES[shape])
    with Pruner(loaded, stats).applied(plan) as model:  # what a study's trial is measured on
        measured = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2}
    calibration = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=32)
    report = prune(str(gguf_llama_dir), calibration, plan, tmp_path / "out", cache_dir=cache, progress=False)
    assert report.gguf.stat().st_size == GGUFSizer.of(loaded).plan_bytes(plan)
    written = file_values(report.gguf, loaded.model.config.hidden_size // loaded.model.config.num_attention_heads)
    assert set(written) == set(measured) - {"lm_head.weight"}  # tied: the embeddings once
    for name, values in written.items():
        assert torch.equal(values.view(torch.int32), measured[name].view(torch.int32)), name
    architecture = gguf.GGUFReader(report.gguf).fields["general.architecture"].contents()
    assert architecture == ("deci" if shape == "sub-network" else "llama")


def test_importance_weighting_uses_the_calibration_inputs(prepared):
    loaded, stats, _ = prepared
    name = "model.layers.0.mlp.down_proj"
    weight = loaded.model.get_submodule(name).weight.detach()
    x = stats.layer(name)
    assert np.allclose(importance(x), (x.xtx.diagonal() / x.n_tokens).numpy(), rtol=1e-5)
    plain, weighted = (Pruner(loaded, stats).quantized(mixed_types(prepared, imatrix=flag), weights={name: weight})
                       for flag in (False, True))
    assert not np.array_equal(plain[f"{name}.weight"].data, weighted[f"{name}.weight"].data)
    assert np.array_equal(plain["model.embed_tokens.weight"].data, weighted["model.embed_tokens.weight"].data)


def test_quantized_tensors_are_stored_once_and_read_by_the_next_process(prepared, tmp_path):
    loaded, stats, _ = prepared
    plan = mixed_types(prepared)
    first = VariantDatabase(stats, tmp_path / "db")
    with Pruner(loaded, stats, first).applied(plan) as model:
        want = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2}
    assert first.counters.written == len(want) and first.counters.read == 0  # the tied head is the embeddings
    again = VariantDatabase(stats, tmp_path / "db")
    with Pruner(loaded, stats, again).applied(plan) as model:
        got = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2}
    assert again.counters.read == len(want) and again.counters.written == 0
    assert all(torch.equal(want[name], got[name]) for name in want)
    with Pruner(loaded, stats, again).applied(Plan()) as model:  # the dense weights came back
        assert torch.equal(model.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)
