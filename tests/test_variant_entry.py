"""One variant file: the layout chosen for a weight, the exact round trip of each layout, files
of the earlier format still read, and the sha256 checked once per file per process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import autoprune.variants._entry as entry
from autoprune.variants import read_entry, write_entry


def _per_row(rows: int = 48, cols: int = 64, kept: int = 20, seed: int = 0) -> torch.Tensor:
    """A weight whose every row keeps ``kept`` weights, as per-row pruning leaves it."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    drop = torch.rand(rows, cols, generator=generator).argsort(1)[:, kept:]
    return weight.scatter(1, drop, 0.0)


def _layout(path: Path) -> set[str]:
    with safe_open(path, "pt") as stored:
        return set(stored.keys())


@pytest.mark.parametrize(
    ("make", "layout"),
    [
        (lambda: _per_row(), {"values", "columns"}),
        (lambda: _per_row().T.contiguous(), {"values", "mask"}),  # columns keep equal counts, rows do not
        (lambda: _per_row(kept=63), {"weight"}),  # barely sparse: the dense tensor is smaller
    ],
    ids=["rows", "bitmask", "dense"],
)
def test_each_layout_round_trips_exactly(tmp_path, make, layout) -> None:
    weight = make()
    size = write_entry(tmp_path / "w.safetensors", weight)
    assert _layout(tmp_path / "w.safetensors") == layout
    read, problem = read_entry(tmp_path / "w.safetensors", weight)
    assert problem == "" and torch.equal(read, weight)
    if layout != {"weight"}:
        assert size < weight.numel() * weight.element_size()


def test_wide_layers_index_their_columns_in_32_bits(tmp_path) -> None:
    weight = _per_row(rows=2, cols=40000, kept=5)
    write_entry(tmp_path / "w.safetensors", weight)
    with safe_open(tmp_path / "w.safetensors", "pt") as stored:
        assert stored.get_tensor("columns").dtype == torch.int32
    assert torch.equal(read_entry(tmp_path / "w.safetensors", weight)[0], weight)


def test_files_of_the_first_format_still_read(tmp_path) -> None:
    weight = _per_row()
    keep = weight != 0
    tensors = {"values": weight[keep], "mask": torch.from_numpy(__import__("numpy").packbits(keep.numpy().reshape(-1)))}
    save_file(tensors, tmp_path / "old.safetensors",
              metadata={"format": "1", "shape": "48,64", "sha256": entry._digest(tensors)})
    read, problem = read_entry(tmp_path / "old.safetensors", weight)
    assert problem == "" and torch.equal(read, weight)


def test_the_sha256_is_checked_once_per_unchanged_file(tmp_path, monkeypatch) -> None:
    weight = _per_row()
    path = tmp_path / "w.safetensors"
    write_entry(path, weight)
    calls = []
    real = entry._digest
    monkeypatch.setattr(entry, "_digest", lambda tensors: calls.append(1) or real(tensors))
    for _ in range(3):
        assert torch.equal(read_entry(path, weight)[0], weight)
    assert len(calls) == 1
    data = bytearray(path.read_bytes())  # replaced by a garbled copy of the same size
    data[-20] ^= 0x5A
    (tmp_path / "garbled").write_bytes(bytes(data))
    (tmp_path / "garbled").replace(path)
    read, problem = read_entry(path, weight)
    assert read is None and "sha256" in problem and len(calls) == 2
