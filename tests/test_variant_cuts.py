"""Sub-network cuts in the variant database: a cut computed in one process is read, not computed,
in the next, and builds the same model; a damaged cut is recomputed with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

from autoprune.api import prepare
from autoprune.config import CalibrationConfig
from autoprune.plan import Plan
from autoprune.pruner import Pruner
from autoprune.structure import BlockWidths, Structure
from autoprune.variants import VariantDatabase

#: Cuts of every kind on the tiny model (4 heads in 2 KV groups, FFN 128): fewer heads per
#: group, a KV group, FFN channels, a dropped MLP, a removed block.
PLAN = Plan(
    structure=Structure(
        every_block=BlockWidths(heads_per_group=1, ffn=96),
        blocks={1: BlockWidths(kv_groups=1, ffn=64), 2: BlockWidths(drop_mlp=True)},
    ),
    removed_blocks=[3],
)


@pytest.fixture
def prepared(tiny_llama_dir, data_dir, tmp_path):
    config = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    return prepare(str(tiny_llama_dir), config, tmp_path / "cache", progress=False)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens).logits


def test_cuts_computed_once_are_read_by_the_next_process(prepared, tmp_path):
    loaded, stats, _ = prepared
    expected = _logits(Pruner(loaded, stats).subnet(PLAN))
    first = VariantDatabase(stats, tmp_path / "db")
    assert torch.equal(_logits(Pruner(loaded, stats, first).subnet(PLAN)), expected)
    stored = sorted((first.root / "cuts").rglob("*.safetensors"))
    # blocks 0 and 1: kept heads and channels, o_proj and down_proj on them; block 2 (a block's
    # widths replace every_block's) keeps all its heads and no MLP: nothing is chosen there
    assert len(stored) == first.counters.written == 2 * 4 and first.counters.read == 0
    second = VariantDatabase(stats, tmp_path / "db")  # as a new process opens it: nothing in memory
    assert torch.equal(_logits(Pruner(loaded, stats, second).subnet(PLAN)), expected)
    assert second.counters.read == len(stored) and second.counters.written == 0


def test_a_damaged_cut_is_recomputed_with_one_warning(prepared, tmp_path, caplog):
    loaded, stats, _ = prepared
    database = VariantDatabase(stats, tmp_path / "db")
    expected = _logits(Pruner(loaded, stats, database).subnet(PLAN))
    entry = next(path for path in sorted((database.root / "cuts").rglob("*.safetensors")) if "o_proj" in path.name)
    data = bytearray(entry.read_bytes())
    data[-8:] = bytes(byte ^ 0x5A for byte in data[-8:])
    entry.write_bytes(bytes(data))
    again = VariantDatabase(stats, tmp_path / "db")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_logits(Pruner(loaded, stats, again).subnet(PLAN)), expected)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "sub-network cut" in line and str(entry) in line and "recomputing" in line
    assert again.counters.rebuilt == again.counters.written == 1

