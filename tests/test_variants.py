"""The variant database: plans assembled from it equal plans pruned directly; it is built lazily
or ahead (resuming after a kill); damaged entries are rebuilt with one warning; two builders of one
entry leave a valid one; the CLI refuses bad input in one line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from autoprune.api import prepare
from autoprune.config import CalibrationConfig
from autoprune.plan import LayerSpec, NMPattern, Plan
from autoprune.pruner import Pruner
from autoprune.variants import VariantDatabase, build_database, level_key, parse_levels
from autoprune.variants import _database as database_module
from search_spaces import SearchSpace, SpaceContext

GRID = 32


@pytest.fixture
def prepared(tiny_llama_dir, data_dir, tmp_path):
    config = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    return prepare(str(tiny_llama_dir), config, tmp_path / "cache", progress=False)


def mixed_plan(pruner: Pruner, method: str) -> Plan:
    """On-grid levels of several sizes, one off-grid layer, one 2:4 layer, a dense one and a
    removed block: every path through the pruner."""
    names = pruner.layer_names
    layers = {name: LayerSpec(sparsity=(8 + 4 * (i % 5)) / GRID) for i, name in enumerate(names)}
    layers[names[1]] = LayerSpec(sparsity=0.51)  # off the grid of 32
    layers[names[2]] = LayerSpec(nm=NMPattern(n=2, m=4))
    layers[names[3]] = LayerSpec()
    return Plan(method=method, layers=layers, removed_blocks=[3])


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("autoprune")]


def _entries(database: VariantDatabase) -> list[Path]:
    return sorted(database.root.rglob("*.safetensors"))


def test_level_keys_are_the_grid_counts_only():
    assert level_key(LayerSpec(sparsity=0.5), 64, GRID) == "p32"
    assert level_key(LayerSpec(sparsity=34 / 64), 64, GRID) == "p34"
    assert level_key(LayerSpec(sparsity=33 / 64), 64, GRID) is None
    assert level_key(LayerSpec(), 64, GRID) is None
    assert level_key(LayerSpec(nm=NMPattern(n=2, m=4)), 64, GRID) == "nm2of4"
    assert [str(level) for level in parse_levels(["0.25-0.35", "2:4", "0.25"], GRID)] == [
        "0.25", "0.28125", "0.3125", "0.34375", "2:4"]


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda"])
def test_plans_from_the_database_equal_plans_pruned_directly(prepared, tmp_path, method):
    loaded, stats, _ = prepared
    direct = Pruner(loaded, stats)
    plan = mixed_plan(direct, method)
    expected = {k: v.clone() for k, v in direct.pruned_weights(plan).items()}
    database = VariantDatabase(stats, tmp_path / "db")
    lazily = Pruner(loaded, stats, database).pruned_weights(plan)  # the first plan builds
    pruned = [n for n, s in direct.kept_layers(plan).items() if not s.is_dense]  # off the grid too
    assert database.counters.written == len(pruned) == len(_entries(database))
    reread = VariantDatabase(stats, tmp_path / "db")
    from_disk = Pruner(loaded, stats, reread).pruned_weights(plan)
    assert reread.counters.read == len(pruned) and reread.counters.written == 0
    for weights in (lazily, from_disk):
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    with Pruner(loaded, stats, reread).applied(plan) as model:  # the model trials measure
        assert all(torch.equal(model.get_submodule(k).weight, expected[k]) for k in expected)


def test_an_ahead_build_resumes_after_being_killed(prepared, tmp_path, monkeypatch):
    loaded, stats, _ = prepared
    levels = parse_levels(["0.5", "0.75", "2:4"], GRID)
    layers = len(Pruner(loaded, stats).layer_names)
    real_write, written = database_module.write_entry, []

    def dies_midway(path, weight):
        if len(written) == layers + 3:  # inside the second level
            raise KeyboardInterrupt
        written.append(path)
        return real_write(path, weight)

    monkeypatch.setattr(database_module, "write_entry", dies_midway)
    database = VariantDatabase(stats, tmp_path / "db")
    with pytest.raises(KeyboardInterrupt):
        build_database(Pruner(loaded, stats, database), "sparsegpt", levels, progress=False)
    monkeypatch.setattr(database_module, "write_entry", real_write)
    assert len(_entries(database)) == layers + 3
    report = build_database(Pruner(loaded, stats, database), "sparsegpt", levels, progress=False)
    assert [level["pruned"] for level in report.levels] == [0, layers - 3, layers]
    again = build_database(Pruner(loaded, stats, database), "sparsegpt", levels, progress=False)
    assert again.layers_pruned == 0 and len(_entries(database)) == 3 * layers
    direct = Pruner(loaded, stats).pruned_weights(Plan(method="sparsegpt", layers={
        name: LayerSpec(sparsity=0.75) for name in Pruner(loaded, stats).layer_names}))
    stored = Pruner(loaded, stats, database)
    assert all(torch.equal(stored.prune_layers("sparsegpt", {k: LayerSpec(sparsity=0.75)})[k], w)
               for k, w in direct.items())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 40, len(data) - 8):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_a_damaged_entry_is_rebuilt_with_one_warning(prepared, tmp_path, caplog, damage):
    loaded, stats, _ = prepared
    database = VariantDatabase(stats, tmp_path / "db")
    pruner = Pruner(loaded, stats, database)
    name = pruner.layer_names[0]
    spec = {name: LayerSpec(sparsity=0.5)}
    expected = pruner.prune_layers("admm", spec)[name].clone()
    (entry,) = _entries(database)
    damage(entry)
    (entry.parent / ".partial-half-written.safetensors").write_bytes(b"\x00" * 50)  # never read
    with caplog.at_level(logging.WARNING):
        rebuilt = Pruner(loaded, stats, database).prune_layers("admm", spec)[name]
    (line,) = _warnings(caplog)
    assert "pruned variant" in line and str(entry) in line and "recomputing" in line
    assert torch.equal(rebuilt, expected) and database.counters.rebuilt == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = VariantDatabase(stats, tmp_path / "db")
        assert torch.equal(Pruner(loaded, stats, again).prune_layers("admm", spec)[name], expected)
    assert _warnings(caplog) == [] and again.counters.read == 1


def _build_args(model: Path, data: Path, cache: Path, folder: Path, *levels: str) -> list[str]:
    return ["database", "build", "--model", str(model), "--data", str(data), "--calib-samples", "8",
            "--seq-len", "32", "--cache-dir", str(cache), "--database-dir", str(folder),
            "--method", "sparsegpt", "--format", "json", "--levels", *levels]


def test_two_processes_building_the_same_entries_leave_valid_ones(
    tiny_llama_dir, data_dir, tmp_path, prepared
):
    folder = tmp_path / "shared-db"
    args = _build_args(tiny_llama_dir, data_dir, tmp_path / "cache", folder, "0.5", "0.625", "0.75", "2:4")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    builders = [subprocess.Popen([sys.executable, "-m", "autoprune", *args], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    outputs = [builder.communicate(timeout=300) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0], outputs
    assert all("damaged" not in err for _, err in outputs)
    loaded, stats, _ = prepared
    database = VariantDatabase(stats, folder)
    assert not list(database.root.rglob(".partial-*"))
    direct = Pruner(loaded, stats)
    for level in parse_levels(["0.5", "0.625", "0.75", "2:4"], GRID):
        specs = {name: level.spec() for name in direct.layer_names}
        expected = direct.prune_layers("sparsegpt", specs)
        stored = Pruner(loaded, stats, database).prune_layers("sparsegpt", specs)
        assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert database.counters.read == 4 * len(direct.layer_names) and database.counters.written == 0


def test_the_build_command_reports_and_resumes(tiny_llama_dir, data_dir, tmp_path, capsys):
    args = _build_args(tiny_llama_dir, data_dir, tmp_path / "cache", tmp_path / "db", "0.5-0.6")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    first = json.loads(out)
    assert [row["level"] for row in first["levels"]] == ["0.5", "0.53125", "0.5625", "0.59375"]
    assert all(row["pruned"] == row["layers"] > 0 for row in first["levels"]) and first["disk_bytes"] > 0
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and all(row["pruned"] == 0 for row in json.loads(out)["levels"])


@pytest.mark.parametrize(("change", "message"), [
    (["--method", "nonesuch"], "unknown pruning method 'nonesuch'"),
    (["--levels", "0.51"], "level 0.51 is not a step of the grid of 32"),
    (["--levels", "1.5"], "sparsities are in [0, 1)"),
    (["--levels", "0.51-0.52"], "holds no step of the grid"),
    (["--levels", "4:2"], "invalid N:M pattern"),
    (["--database-grid", "1"], "at least 2 steps"),
    (["--structured-method", "weighted"], "--structured-method needs --cuts"),
])
def test_bad_build_input_is_one_line_and_exit_2(tiny_llama_dir, data_dir, tmp_path, capsys, change, message):
    args = _build_args(tiny_llama_dir, data_dir, tmp_path / "cache", tmp_path / "db", "0.5") + change
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "db").exists() and not (tmp_path / "cache").exists()


def test_prune_refuses_database_flags_without_database(tiny_llama_dir, data_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "prune", "--model", tiny_llama_dir, "--sparsity", "0.5", "--out",
                           tmp_path / "out", "--database-dir", tmp_path / "db")
    assert code == 2 and "--database-dir and --database-grid need --database" in err


def test_grid_allocations_keep_the_budget_with_one_layer_off_the_grid(prepared):
    loaded, stats, _ = prepared
    ctx = SpaceContext.from_model(loaded, stats, "sparsegpt", (0.4, 0.8))
    gridded = SpaceContext(**{**ctx.__dict__, "grid": GRID})
    space = SearchSpace.named("layerwise")
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = {name: float(rng.uniform(dist.low, dist.high))
                  for name, dist in space.distributions(ctx).items()}
        budget = round((1 - params["target"]) * ctx.dense_linear_params)
        snapped = space.cast(params, gridded)
        off = [n for n, s in snapped.layers.items()
               if not s.is_dense and level_key(s, ctx.layers[n].cols, GRID) is None]
        assert len(off) <= 1
        assert abs(gridded.nonzeros(snapped) - budget) <= max(info.rows for info in ctx.layers.values()) // 2


def test_a_database_that_cannot_be_written_warns_once_and_prunes(prepared, tmp_path, caplog, monkeypatch):
    loaded, stats, _ = prepared
    database = VariantDatabase(stats, tmp_path / "db")
    pruner = Pruner(loaded, stats, database)

    def full_disk(path, weight):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(database_module, "write_entry", full_disk)
    plan = Plan(method="wanda", layers={name: LayerSpec(sparsity=0.5) for name in pruner.layer_names})
    expected = Pruner(loaded, stats).pruned_weights(plan)
    with caplog.at_level(logging.WARNING):
        weights = pruner.pruned_weights(plan)
        pruner.pruned_weights(plan)
    (line,) = _warnings(caplog)
    assert "cannot be written (No space left on device)" in line
    assert all(torch.equal(weights[k], expected[k]) for k in expected) and not _entries(database)
