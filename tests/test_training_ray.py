"""A heal on Ray Train: two data-parallel workers, stopped part-way and started again, end with the
weights the single-process heal reaches."""

from __future__ import annotations

import pytest
import torch

from autoprune.models import load_model
from autoprune.training import HealConfig, RayWorkers, heal

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
