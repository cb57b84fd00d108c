"""Latency: real timings of a tiny model, and the per-shape table (cached, pricing candidates)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from autoprune.latency import LatencySettings, LatencyTable, Timing, latency_table, measure
from autoprune.structure import BlockShape, BlockWidths, ModelDims, Structure, resolve_blocks

SETTINGS = LatencySettings(seq_len=16, prompt_len=8, new_tokens=2, repeats=1)


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )


def test_table_is_measured_once_and_cached(tmp_path: Path) -> None:
    config = _config()
    table = latency_table(config, SETTINGS, cache_dir=tmp_path, ffn_step=32)
    assert sorted(table.attention) == ["1x1", "1x2", "2x1", "2x2"]
    assert sorted(table.mlp) == [32, 64]
    assert table.base.prefill_ms > 0 and table.base.decode_ms > 0
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1
    assert latency_table(config, SETTINGS, cache_dir=tmp_path, ffn_step=32) == table
    other = LatencySettings(seq_len=32, prompt_len=8, new_tokens=2, repeats=1)
    assert table.key != latency_table(config, other, cache_dir=tmp_path, ffn_step=32).key


def test_prediction_adds_the_shapes_costs() -> None:
    table = LatencyTable(
        key="k", settings=SETTINGS, base=Timing(10.0, 1.0),
        attention={"1x1": Timing(1.0, 0.1), "1x2": Timing(2.0, 0.2), "2x1": Timing(2.0, 0.2), "2x2": Timing(4.0, 0.4)},
        mlp={32: Timing(3.0, 0.3), 64: Timing(5.0, 0.5)},
    )
    dims = ModelDims.of(_config())
    structure = Structure(blocks={0: BlockWidths(kv_groups=1, ffn=48), 1: BlockWidths(drop_mlp=True)})
    predicted = table.predict(resolve_blocks(structure, [2], dims))
    # block 0: attention 1x2 (2.0) + FFN 48 halfway between 32 and 64 (4.0); block 1: 2x2 (4.0)
    assert predicted.prefill_ms == pytest.approx(10.0 + 2.0 + 4.0 + 4.0)
    assert predicted.decode_ms == pytest.approx(1.0 + 0.2 + 0.4 + 0.4)
    assert table.predict([BlockShape(0, 0, 16)]).prefill_ms == pytest.approx(10.0 + 2.0)  # extrapolated
    assert LatencyTable.from_json(table.to_json()) == table


def test_measure_times_prefill_and_decode() -> None:
    from autoprune.structure.remote.modeling_subnet_llama import SubnetLlamaForCausalLM

    timing = measure(SubnetLlamaForCausalLM(_config()).eval(), SETTINGS)
    assert timing.prefill_ms > 0 and timing.decode_ms > 0
