"""Latency: real timings of tiny models (interleaved), and the table fitted to probe timings
(cached, pricing candidates). No assertion depends on how fast anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autoprune.latency import (
    FEATURES,
    TABLE_FORMAT_VERSION,
    LatencySettings,
    LatencyTable,
    Probe,
    Timing,
    build_table,
    estimate,
    latency_table,
    measure,
    measure_interleaved,
    probe_designs,
    probe_model,
    shape_features,
    table_path,
)
from autoprune.structure import BlockShape, BlockWidths, ModelDims, Structure, resolve_blocks
from autoprune.models.remote.modeling_subnet_llama import SubnetLlamaForCausalLM

SETTINGS = LatencySettings(seq_len=16, prompt_len=8, new_tokens=2, repeats=1)


def _config(blocks: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )


#: A device whose costs are exactly linear: fixed 10, block 1, attention 2, head 0.5, KV head
#: 0.25, MLP 3, FFN channel 0.01 (prefill; decode a tenth of each).
COSTS = [10.0, 1.0, 2.0, 0.5, 0.25, 3.0, 0.01]


def _exact(shapes: list[BlockShape]) -> Timing:
    cost = sum(f * c for f, c in zip(shape_features(shapes), COSTS))
    return Timing(cost, cost / 10)


def _exact_table(dims: ModelDims) -> LatencyTable:
    probes = [Probe(tuple(s), _exact(s)) for s in probe_designs(dims, 12)]
    return LatencyTable(key="k", settings=SETTINGS, probes=probes)


def test_features_count_blocks_sub_blocks_heads_and_channels() -> None:
    shapes = [BlockShape(2, 3, 100), None, BlockShape(0, 0, 50), BlockShape(1, 2, 0)]
    assert dict(zip(FEATURES, shape_features(shapes))) == {
        "fixed": 1, "blocks": 3, "attention": 2, "heads": 8, "kv_heads": 3, "mlp": 2, "ffn": 150,
    }


@pytest.mark.parametrize("config", [_config(4), LlamaConfig(
    vocab_size=100, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64)])
def test_probes_determine_every_cost(config: LlamaConfig) -> None:
    """The probe designs fit the model's shape and vary every term independently: a device with
    linear costs is recovered exactly, and prices shapes no probe has."""
    dims = ModelDims.of(config)
    designs = probe_designs(dims, 12)
    assert designs == probe_designs(dims, 12) and designs != probe_designs(dims, 12, seed=1)
    assert designs[0] == [] and len(designs) == 14
    for shapes in designs[1:]:
        assert 1 <= len(shapes) <= dims.num_blocks
        for s in shapes:
            assert s.kv_groups <= dims.num_kv_heads and s.heads_per_group <= dims.heads_per_group
            assert s.ffn <= dims.ffn and (s.heads or s.ffn)
    x = torch.tensor([shape_features(s) for s in designs], dtype=torch.float64)
    assert torch.linalg.matrix_rank(x) == len(FEATURES)
    table = _exact_table(dims)
    for name, cost, fitted in zip(FEATURES, COSTS, table.coefficients().values()):
        assert fitted.prefill_ms == pytest.approx(cost, abs=1e-6), name
        assert fitted.decode_ms == pytest.approx(cost / 10, abs=1e-7), name
    structure = Structure(blocks={0: BlockWidths(kv_groups=1, ffn=7), 1: BlockWidths(drop_mlp=True)})
    shapes = resolve_blocks(structure, [2], dims)
    assert table.predict(shapes).prefill_ms == pytest.approx(_exact(shapes).prefill_ms)
    assert table.predict(shapes).decode_ms == pytest.approx(_exact(shapes).decode_ms)


def test_fitted_costs_are_never_negative() -> None:
    """Noisy timings of a device whose attention sub-blocks cost nothing beyond their heads: an
    unconstrained fit would give that term a negative cost; the table gives it none."""
    dims = ModelDims.of(_config(30))
    costs = [10.0, 0.0, 0.0, 0.5, 0.25, 3.0, 0.01]
    noise = torch.Generator().manual_seed(0)
    probes = []
    for shapes in probe_designs(dims, 12):
        exact = sum(f * c for f, c in zip(shape_features(shapes), costs))
        factor = 1 + 0.08 * (torch.rand((), generator=noise).item() - 0.5)
        probes.append(Probe(tuple(shapes), Timing(exact * factor, exact * factor / 10)))
    x = torch.tensor([shape_features(p.shapes) for p in probes], dtype=torch.float64)
    y = torch.tensor([p.timing.prefill_ms for p in probes], dtype=torch.float64)
    unconstrained = torch.linalg.lstsq(x / y[:, None], torch.ones(len(y), 1, dtype=torch.float64)).solution
    assert float(unconstrained.min()) < 0  # what the noise does to a plain fit
    table = LatencyTable(key="k", settings=SETTINGS, probes=probes)
    assert min(table.prefill_coefficients) >= 0 and min(table.decode_coefficients) >= 0
    for p in probes:
        assert table.predict(p.shapes).prefill_ms == pytest.approx(p.timing.prefill_ms, rel=0.1)


def test_table_round_trips_and_rejects_other_formats() -> None:
    table = _exact_table(ModelDims.of(_config()))
    assert LatencyTable.from_json(table.to_json()) == table
    old = {**json.loads(table.to_json()), "format_version": TABLE_FORMAT_VERSION - 1}
    with pytest.raises(ValueError, match="format version"):
        LatencyTable.from_json(json.dumps(old))
    with pytest.raises(ValueError, match="probe"):
        LatencyTable(key="k", settings=SETTINGS, probes=[])


def test_table_is_measured_once_and_cached(tmp_path: Path) -> None:
    config = _config()
    path = table_path(config, SETTINGS, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format_version": 1, "key": "old", "base": {}}))  # an older table
    table = latency_table(config, SETTINGS, cache_dir=tmp_path, probes=4)
    assert len(table.probes) == 6
    assert all(p.timing.prefill_ms > 0 and p.timing.decode_ms > 0 for p in table.probes)
    assert json.loads(path.read_text())["format_version"] == TABLE_FORMAT_VERSION
    assert list((tmp_path / "latency").glob("*.json")) == [path]
    assert latency_table(config, SETTINGS, cache_dir=tmp_path, probes=4) == table
    other = LatencySettings(seq_len=32, prompt_len=8, new_tokens=2, repeats=1)
    assert table.key != latency_table(config, other, cache_dir=tmp_path, probes=2).key


def test_build_table_times_other_models_in_the_same_rounds() -> None:
    config = _config()
    others = [probe_model(config, [BlockShape(2, 2, 64)] * 2), probe_model(config, [BlockShape(1, 1, 8)])]
    table, timings = build_table(config, SETTINGS, others, probes=2)
    assert len(table.probes) == 4 and len(timings) == 2
    assert all(t.prefill_ms > 0 and t.decode_ms > 0 for t in timings)


def test_probe_models_are_the_classes_exports_load_as() -> None:
    config = _config()
    assert probe_model(config, []).config.num_hidden_layers == 0
    equal = probe_model(config, [BlockShape(1, 2, 48)] * 3)
    assert type(equal) is LlamaForCausalLM and equal.config.intermediate_size == 48
    mixed = probe_model(config, [BlockShape(1, 2, 48), BlockShape(0, 0, 64)])
    assert type(mixed) is SubnetLlamaForCausalLM and not hasattr(mixed.model.layers[1], "self_attn")


def test_measure_times_prefill_and_decode() -> None:
    model = SubnetLlamaForCausalLM(_config()).eval()
    timing = measure(model, SETTINGS)
    assert timing.prefill_ms > 0 and timing.decode_ms > 0
    assert measure(model, SETTINGS, decode=False).decode_ms == 0
    both = measure_interleaved([model, LlamaForCausalLM(_config(1)).eval()], SETTINGS, prefill=False)
    assert [t.prefill_ms for t in both] == [0, 0] and all(t.decode_ms > 0 for t in both)


def test_estimate_is_the_lower_quartile() -> None:
    """Bursts of other load only add time: the estimate ignores the slow tail and a lone fast sample."""
    assert estimate([7.0]) == 7.0
    assert estimate([5.0, 1.0, 100.0, 2.0, 3.0]) == 2.0
    assert estimate([10.0, 11.0, 12.0, 13.0, 50.0, 60.0, 70.0, 80.0, 90.0]) == 12.0
