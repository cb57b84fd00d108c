"""Calibration runs once per (model content, tokens) and its statistics are what hooks would see."""

from __future__ import annotations

import torch

from autoprune import CalibrationConfig, load_model, prepare
from autoprune.calibration import calibrate
from autoprune.data import calibration_windows


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


def test_self_generated_calibration_is_deterministic(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    first = calibration_windows("self", loaded.tokenizer, 2, 12, seed=3, model=loaded.model)
    second = calibration_windows("self", loaded.tokenizer, 2, 12, seed=3, model=loaded.model)
    assert first.shape == (2, 12) and torch.equal(first, second)
