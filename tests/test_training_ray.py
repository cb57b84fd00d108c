"""A heal on Ray Train: two data-parallel workers, stopped part-way and started again, end with the
weights the single-process heal reaches; a learned structure on two workers is the one learned in
a single process, and ``prune --structured learned --workers`` writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from autoprune.calibration import calibrate
from autoprune.data import calibration_windows
from autoprune.models import load_model
from autoprune.training import HealConfig, RayWorkers, heal, learn_structure

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = HealConfig(tokens=4 * 4 * 16, seq_len=16, batch_size=4, lr=3e-4, validation_windows=2,
                    evaluations=1, checkpoint_every=2, precision="fp32")


def _student(model_dir):
    model = load_model(str(model_dir)).model
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[::3] = 0
    return model


def test_ray_train_workers_stopped_and_resumed_follow_the_single_process_heal(
    ray_cluster, tiny_llama_dir, data_dir, tmp_path
) -> None:
    teacher = load_model(str(tiny_llama_dir))
    alone, _ = heal(_student(tiny_llama_dir), teacher, str(data_dir), CONFIG, progress=False)
    workers = RayWorkers(2, tmp_path / "ray", "heal", threads=1)
    _, cut = heal(_student(tiny_llama_dir), teacher, str(data_dir), CONFIG, progress=False, ray=workers, stop_after=3)
    assert cut.steps == 3
    spread, result = heal(_student(tiny_llama_dir), teacher, str(data_dir), CONFIG, progress=False, ray=workers)
    assert result.resumed_from == 3 and result.steps == CONFIG.steps == 4  # from the stopped run's last report
    expected, got = alone.state_dict(), spread.state_dict()
    assert all(torch.allclose(expected[n], got[n], atol=1e-5) for n in expected)
    down = got["model.layers.1.mlp.down_proj.weight"][::3]
    assert torch.equal(down, torch.zeros_like(down))


def test_a_structure_learned_on_ray_train_workers_is_the_one_learned_in_one_process(
    ray_cluster, tiny_llama_dir, data_dir, tmp_path
) -> None:
    teacher = load_model(str(tiny_llama_dir))
    windows = calibration_windows(str(data_dir), teacher.tokenizer, n_samples=4, seq_len=16)
    stats = calibrate(teacher, windows, progress=False).stats  # warm-started gates, corrected cut
    config = CONFIG.model_copy(update={"tokens": 8 * 4 * 16, "lr": 1e-3})
    alone = learn_structure(teacher, str(data_dir), 0.25, config, progress=False, stats=stats)
    workers = RayWorkers(2, tmp_path / "ray", "learned", threads=1)
    spread = learn_structure(teacher, str(data_dir), 0.25, config, progress=False, stats=stats, workers=workers)
    assert spread.plan == alone.plan and spread.kept == pytest.approx(alone.kept)
    assert spread.expected_kept == pytest.approx(alone.expected_kept, abs=1e-5)
    assert spread.gates.steps + spread.heal.steps == config.steps
    expected, got = alone.model.state_dict(), spread.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[n], got[n], atol=1e-5) for n in expected)


def test_prune_learned_on_workers_of_a_ray_cluster_writes_the_model(ray_cluster, tiny_llama_dir, data_dir, tmp_path) -> None:
    address, _ = ray_cluster
    out = tmp_path / "learned"
    flags = ["prune", "--model", tiny_llama_dir, "--data", data_dir, "--structured", "learned", "--target", "0.25",
             "--tokens", 8 * 4 * 16, "--train-seq-len", 16, "--batch-size", 4, "--seq-len", 32,
             "--calib-samples", 8, "--eval-windows", 2, "--workers", 2, "--ray-address", address,
             "--threads", 1, "--out", out, "--format", "json"]
    run = subprocess.run([sys.executable, "-m", "autoprune", *map(str, flags)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert 0.74 <= 1 - json.loads(run.stdout)["sparsity"] <= 0.76
    learned = json.loads((out / "autoprune.json").read_text())["learned"]
    assert learned["gates"]["steps"] + learned["heal"]["steps"] == 8
    assert not list(tmp_path.glob(".learned*"))  # Ray Train's checkpoints went with the others
