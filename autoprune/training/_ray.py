"""A heal on several workers through Ray Train: ``TorchTrainer`` and data-parallel training.

Each Ray Train worker builds the same :class:`Healer` (the student, the teacher and the windows are
shipped once through Ray's object store), its hidden-state module wrapped by
``ray.train.torch.prepare_model`` (DistributedDataParallel, gloo on CPUs, NCCL on GPUs), and takes
its share of every step's batch, so the averaged gradient is the whole batch's and the run follows
the single-process one. A regularizer (learned structure's gates) is built by each worker on its
own student from a picklable recipe and trained data-parallel with the weights. Checkpoints are
reported to Ray Train (worker 0 writes them), in ``storage_path`` under a run name made of the
student and the settings: the same heal started again resumes from the last one. Worker 0 reports
the healed weights (and the regularizer's state) at the end.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
from transformers import PreTrainedModel

from autoprune.errors import AutopruneError
from autoprune.training._config import HealConfig
from autoprune.training._data import HealData
from autoprune.training._loop import Healer, HealResult, Measurement, Regularizer

if TYPE_CHECKING:
    from autoprune.training._heal import RayWorkers

_STATE, _FINAL = "heal-state.pt", "healed.pt"


class _RayCheckpoints:
    """Checkpoints reported to Ray Train (every worker reports; worker 0 attaches the state)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def load(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            path = Path(folder) / _STATE
            return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None

    def save(self, state: dict[str, Any], step: int) -> None:
        _report({"step": step}, {_STATE: state} if self.rank == 0 else None)


def _report(metrics: dict[str, Any], files: dict[str, Any] | None) -> None:
    """Every worker reports; the one with ``files`` (name -> object) attaches them."""
    if files is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        for name, payload in files.items():
            torch.save(payload, Path(folder) / name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _train_worker(settings: dict[str, Any]) -> None:
    """One Ray Train worker's heal."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    student = ray.get(settings["student"])
    build = settings["regularizer"]
    regularizer = build(student) if build is not None else None
    healer = Healer(
        student, ray.get(settings["teacher"]), ray.get(settings["data"]),
        HealConfig.model_validate(settings["config"]), ray.train.torch.get_device(), rank, world,
        wrap=ray.train.torch.prepare_model, regularizer=regularizer,
    )
    result = healer.run(_RayCheckpoints(rank), settings["progress"], settings["stop_after"])
    files = None
    if rank == 0:  # the state too: a heal started again after this one resumes from it
        state = healer.state()
        weights = {name: tensor.cpu() for name, tensor in healer.finished_model().state_dict().items()}
        final = {"weights": weights, "result": result.as_dict()}
        if regularizer is not None:
            final["regularizer"] = {name: tensor.cpu() for name, tensor in regularizer.state_dict().items()}
        files = {_STATE: state, _FINAL: final}
    _report({"step": result.steps, "final": True}, files)


def heal_on_ray(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    data: HealData,
    config: HealConfig,
    workers: RayWorkers,
    progress: bool = True,
    stop_after: int | None = None,
    regularizer: Callable[[PreTrainedModel], Regularizer] | None = None,
) -> tuple[PreTrainedModel, HealResult, dict[str, torch.Tensor] | None]:
    """Heal ``student`` on the Ray Train ``workers`` (their count, a GPU each with ``use_gpu``) of
    the Ray this process joined (a local one is started otherwise); the student with the healed
    weights, worker 0's record and, with ``regularizer`` (built on each worker's student, trained
    with it), the regularizer's final state. Resumes from the workers' run ``name`` in their
    ``storage_path`` where it exists."""
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    if config.batch_size % workers.count:
        raise AutopruneError(f"--batch-size {config.batch_size} does not split over {workers.count} workers")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "student": ray.put(student.cpu()), "teacher": ray.put(teacher.cpu()), "data": ray.put(data),
            "config": config.model_dump(mode="json"), "threads": workers.threads, "progress": progress,
            "stop_after": stop_after, "regularizer": regularizer,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers.count, use_gpu=workers.use_gpu),
        run_config=ray.train.RunConfig(name=workers.name, storage_path=str(workers.storage_path)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise AutopruneError("the Ray Train heal ended without reporting its weights")
    with result.checkpoint.as_directory() as folder:
        final = torch.load(Path(folder) / _FINAL, map_location="cpu", weights_only=False)
    student.load_state_dict(final["weights"])
    record = final["result"]
    record.pop("final")
    record["measurements"] = [Measurement(**m) for m in record["measurements"]]
    return student.eval(), HealResult(**record), final.get("regularizer")
