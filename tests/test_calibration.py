"""Calibration runs once per (model content, tokens) and its statistics are what hooks would see."""

from __future__ import annotations

import pytest
import torch

from autoprune import CalibrationConfig, load_model, prepare
from autoprune.calibration import _self_text as self_text
from autoprune.calibration import calibrate, self_calibration_windows
from autoprune.data import calibration_windows, self_generated_windows


def test_second_prepare_hits_the_cache_and_other_data_or_model_miss(
    tiny_llama_dir, tiny_opt_dir, data_dir, tmp_path
):
    config = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=16)
    _, first, cached = prepare(str(tiny_llama_dir), config, tmp_path, progress=False)
    assert not cached
    _, second, cached = prepare(str(tiny_llama_dir), config, tmp_path, progress=False)
    assert cached and second.folder == first.folder
    _, other_seed, cached = prepare(
        str(tiny_llama_dir), config.model_copy(update={"seed": 1}), tmp_path, progress=False
    )
    assert not cached and other_seed.folder != first.folder
    _, other_model, cached = prepare(str(tiny_opt_dir), config, tmp_path, progress=False)
    assert not cached and other_model.folder != first.folder


def test_statistics_match_a_direct_forward(tiny_llama_dir, data_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    windows = calibration_windows(str(data_dir), loaded.tokenizer, n_samples=3, seq_len=16)
    stats = calibrate(loaded, windows, tmp_path, batch_size=2, progress=False).stats
    name = "model.layers.2.mlp.down_proj"
    seen = []
    handle = loaded.model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        loaded.model(windows)
    handle.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(stats.layer(name).sq_norm.double(), (x * x).sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.layer(name).xtx.double(), x.T @ x, rtol=1e-4, atol=1e-3)
    assert stats.layer("model.layers.0.self_attn.k_proj").group == "model.layers.0.self_attn.q_proj"
    assert stats.block_influence.shape == (4,)
    assert torch.all(stats.block_influence >= 0)


def test_self_generated_calibration_is_deterministic_and_sampled_once(
    tiny_llama_dir, tiny_opt_dir, tmp_path, monkeypatch
):
    loaded = load_model(str(tiny_llama_dir))
    first, cached = self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)
    assert first.shape == (2, 12) and not cached
    assert torch.equal(first, self_generated_windows(loaded.model, loaded.tokenizer, 2, 12, seed=3))

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(self_text, "self_generated_windows", no_sampling)
    again, cached = self_calibration_windows(loaded, 2, 12, seed=3, cache_dir=tmp_path, progress=False)
    assert cached and torch.equal(again, first)
    config = CalibrationConfig(source="self", n_samples=2, seq_len=12, seed=3)
    _, stats, _ = prepare(str(tiny_llama_dir), config, tmp_path, progress=False)  # no sampling
    assert stats.num_blocks == 4
    for other_seed, other_model in ((4, loaded), (3, load_model(str(tiny_opt_dir)))):
        with pytest.raises(AssertionError, match="sampled again"):
            self_calibration_windows(other_model, 2, 12, other_seed, tmp_path, progress=False)
