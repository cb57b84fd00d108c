"""Damaged cache entries are recomputed with one warning line; half-written ones are never read."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from autoprune import load_model
from autoprune._atomic import MANIFEST
from autoprune.calibration import calibrate, self_calibration_windows, statistics_folder
from autoprune.calibration import _self_text as self_text
from autoprune.data import calibration_windows

BLOCK = "block_0002.safetensors"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _garble(path: Path) -> None:
    """Flip bytes in the tensor payload: the size and the header stay as they were."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 64, len(data) - 8):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _drop_manifest(folder: Path) -> None:
    (folder / MANIFEST).unlink()


def _all_tensors(stats) -> dict[str, torch.Tensor]:
    out = {}
    for name in stats.meta["group_of"]:
        layer = stats.layer(name)
        # copies: the originals map the file, which the tests then damage
        out[f"{name}.xtx"], out[f"{name}.sq_norm"] = layer.xtx.clone(), layer.sq_norm.clone()
    return out


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings autoprune logged (a tiny model's load report from transformers is not ours)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith("transformers")
    ]


@pytest.fixture
def calibrated(tiny_llama_dir, data_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    windows = calibration_windows(str(data_dir), loaded.tokenizer, n_samples=4, seq_len=16)
    fresh = calibrate(loaded, windows, tmp_path / "c", progress=False)
    assert not fresh.from_cache
    return loaded, windows, fresh.stats, tmp_path / "c"


@pytest.mark.parametrize(
    "damage",
    [lambda f: _truncate(f / BLOCK), lambda f: _garble(f / BLOCK), _drop_manifest],
    ids=["truncated", "garbled", "no-manifest"],
)
def test_a_damaged_statistics_entry_is_recomputed_with_one_warning(calibrated, caplog, damage):
    loaded, windows, fresh, cache = calibrated
    expected = _all_tensors(fresh)
    damage(fresh.folder)
    with caplog.at_level(logging.WARNING):
        again = calibrate(loaded, windows, cache, progress=False)
    assert not again.from_cache and again.stats.folder == fresh.folder
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "is damaged" in warnings[0] and "recomputing" in warnings[0]
    got = _all_tensors(again.stats)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the rebuilt entry is whole: read, no warning
        assert calibrate(loaded, windows, cache, progress=False).from_cache
    assert _warnings(caplog) == []
    assert not [p for p in cache.joinpath("stats").iterdir() if p.name.startswith(".")]


def test_an_entry_still_being_written_is_never_read(tiny_llama_dir, data_dir, tmp_path, caplog):
    """A writer's staging folder (blocks written, no manifest yet) sits beside where the entry
    goes; readers compute their own, and two writers at once both end with a whole entry."""
    loaded = load_model(str(tiny_llama_dir))
    windows = calibration_windows(str(data_dir), loaded.tokenizer, n_samples=4, seq_len=16)
    folder = statistics_folder(loaded, windows, tmp_path)
    half = folder.parent / ".partial-other-writer"
    half.mkdir(parents=True)
    (half / BLOCK).write_bytes(b"\x00" * 10)
    results, errors = [], []
    models = [load_model(str(tiny_llama_dir)) for _ in range(2)]  # loading is not thread-safe

    def one(mine) -> None:
        try:
            results.append(calibrate(mine, windows, tmp_path, progress=False))
        except Exception as error:  # pragma: no cover - reported by the assertion below
            errors.append(error)

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=one, args=(m,)) for m in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == [] and _warnings(caplog) == []
    assert {r.stats.folder for r in results} == {folder}
    reference = _all_tensors(results[0].stats)
    for result in results:
        got = _all_tensors(result.stats)
        assert all(torch.equal(got[key], reference[key]) for key in reference)
    assert json.loads((folder / MANIFEST).read_text())["files"].keys() >= {BLOCK, "meta.json"}
    assert calibrate(loaded, windows, tmp_path, progress=False).from_cache


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_damaged_self_generated_text_is_sampled_again_with_one_warning(
    tiny_llama_dir, tmp_path, caplog, damage
):
    loaded = load_model(str(tiny_llama_dir))
    first, cached = self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)
    assert not cached
    (path,) = (tmp_path / "self-text").glob("*.safetensors")
    damage(path)
    with caplog.at_level(logging.WARNING):
        again, cached = self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)
    assert not cached and torch.equal(again, first)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "is damaged" in warnings[0]
    assert self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)[1]


def test_self_text_written_before_checksums_is_adopted(tiny_llama_dir, tmp_path, caplog, monkeypatch):
    from safetensors.torch import load_file, save_file

    loaded = load_model(str(tiny_llama_dir))
    first, _ = self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)
    (path,) = (tmp_path / "self-text").glob("*.safetensors")
    save_file(load_file(path), path)  # the old format: no sha256 in the metadata

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("sampled again instead of adopting the file")

    monkeypatch.setattr(self_text, "self_generated_windows", no_sampling)
    with caplog.at_level(logging.WARNING):
        again, cached = self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)
    assert cached and torch.equal(again, first) and _warnings(caplog) == []
    _garble(path)  # now it carries a sha256, so damage is caught
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        assert not self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)[1]
    assert len(_warnings(caplog)) == 1


def _prune(model: Path, data: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUTOPRUNE_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "autoprune", "prune", "--model", str(model), "--data", str(data),
         "--calib-samples", "8", "--seq-len", "32", "--eval-windows", "4", "--sparsity", "0.5",
         "--method", "sparsegpt", "--out", str(out), "--format", "json"],
        capture_output=True, text=True, timeout=300, env=env,
    )


def test_prune_cli_with_a_truncated_entry_exits_0_with_the_same_output(tiny_llama_dir, data_dir, tmp_path):
    cache = tmp_path / "cli-cache"
    fresh = _prune(tiny_llama_dir, data_dir, tmp_path / "a", cache)
    assert fresh.returncode == 0, fresh.stderr
    (folder,) = (cache / "stats").iterdir()
    _truncate(folder / BLOCK)
    damaged = _prune(tiny_llama_dir, data_dir, tmp_path / "b", cache)
    assert damaged.returncode == 0 and "Traceback" not in damaged.stderr
    lines = [line for line in damaged.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and BLOCK in lines[0] and "recomputing" in lines[0]
    first, second = json.loads(fresh.stdout), json.loads(damaged.stdout)
    assert second["ppl"] == first["ppl"] and second["linear_nonzeros"] == first["linear_nonzeros"]
    from safetensors.torch import load_file

    weights_a = load_file(tmp_path / "a" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
