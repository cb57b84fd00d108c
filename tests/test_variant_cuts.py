"""Sub-network cuts in the variant database: a cut computed in one process is read, not computed,
in the next, and builds the same model; a damaged cut is recomputed with one warning; ``database
build --cuts`` builds every width of the subnet space ahead, resumably, and refuses bad input in
one line."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import run_cli

from autoprune.api import prepare
from autoprune.config import CalibrationConfig
from autoprune.plan import Plan
from autoprune.pruner import Pruner
from autoprune.structure import BlockWidths, Structure, model_dims
from autoprune.variants import VariantDatabase
from search_spaces import subnet_widths

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



def _build_cuts(tiny_llama_dir, data_dir, tmp_path, *extra: object) -> list:
    return ["database", "build", "--cuts", "--model", tiny_llama_dir, "--data", data_dir, "--calib-samples", 8,
            "--seq-len", 32, "--cache-dir", tmp_path / "cache", "--database-dir", tmp_path / "db", *extra]


def test_cuts_built_ahead_serve_every_width_of_the_subnet_space(tiny_llama_dir, data_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, *_build_cuts(tiny_llama_dir, data_dir, tmp_path), "--format", "json")
    assert code == 0, err
    built = json.loads(out)
    assert sum(level["pruned"] for level in built["levels"]) > 0 and built["disk_bytes"] > 0
    code, out, _ = run_cli(capsys, *_build_cuts(tiny_llama_dir, data_dir, tmp_path), "--format", "json")
    assert code == 0 and sum(level["pruned"] for level in json.loads(out)["levels"]) == 0  # resumed: all read
    # any plan of the space's widths is then read, nothing cut again
    loaded, stats, _ = prepare(str(tiny_llama_dir), CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32),
                               tmp_path / "cache", progress=False)
    attention, ffn = subnet_widths(model_dims(loaded.model))
    plan = Plan(structure=Structure(every_block=BlockWidths(kv_groups=attention[-1][0], heads_per_group=attention[-1][1]),
                                    blocks={0: BlockWidths(ffn=ffn[3]), 2: BlockWidths(ffn=ffn[-1])}))
    database = VariantDatabase(stats, tmp_path / "db")
    Pruner(loaded, stats, database).subnet(plan)
    assert database.counters.read > 0 and database.counters.written == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--structured-method", "random"], "unknown structured method 'random'"),
        (["--levels", "0.5"], "--cuts builds sub-network cuts"),
        (["--method", "wanda"], "--cuts builds sub-network cuts"),
    ],
)
def test_bad_cut_builds_are_one_line(tiny_llama_dir, data_dir, tmp_path, capsys, extra, message):
    code, out, err = run_cli(capsys, *_build_cuts(tiny_llama_dir, data_dir, tmp_path), *extra)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1
    assert not (tmp_path / "db").exists()


def test_cuts_of_a_model_outside_the_llama_family_are_refused_before_calibrating(
    tiny_opt_dir, data_dir, tmp_path, capsys
):
    code, _, err = run_cli(capsys, *_build_cuts(tiny_opt_dir, data_dir, tmp_path))
    errors = [line for line in err.splitlines() if line.startswith("autoprune: error:")]  # after loading's bar
    assert code == 2 and len(errors) == 1 and "LLaMA-family" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "db").exists() and not list((tmp_path / "cache").rglob("manifest*"))
