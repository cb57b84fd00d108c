from __future__ import annotations

import pytest
import torch

from autoprune.data import calibration_windows, evaluation_windows, tokenize, validation_windows
from autoprune.errors import AutopruneError


def test_evaluation_windows_are_the_test_split_cut_in_order(data_dir, tokenizer):
    ids = tokenize((data_dir / "wiki.test.raw").read_text(), tokenizer)
    windows = evaluation_windows(str(data_dir), tokenizer, seq_len=20, max_windows=3)
    assert torch.equal(windows.reshape(-1), ids[:60])


def test_calibration_never_reads_the_test_split(data_dir, tokenizer):
    valid = tokenize((data_dir / "wiki.valid.tokens").read_text(), tokenizer)
    windows = calibration_windows(str(data_dir), tokenizer, n_samples=5, seq_len=16, seed=0)
    text = valid.tolist()
    for window in windows.tolist():
        assert any(text[i : i + 16] == window for i in range(len(text) - 15))


def test_validation_windows_come_after_the_calibration_region(data_dir, tokenizer):
    valid = tokenize((data_dir / "wiki.valid.tokens").read_text(), tokenizer)
    windows = validation_windows(str(data_dir), tokenizer, seq_len=16, max_windows=2)
    start = int(len(valid) * 0.8)
    assert torch.equal(windows.reshape(-1), valid[start : start + 32])


def test_missing_path_and_missing_split_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(AutopruneError, match="data path not found"):
        evaluation_windows(str(tmp_path / "nope"), tokenizer)
    (tmp_path / "only.valid.txt").write_text("a b c")
    with pytest.raises(AutopruneError, match="no evaluation split"):
        evaluation_windows(str(tmp_path), tokenizer)
