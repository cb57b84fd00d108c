"""Healing a compressed variant: the API behind ``autoprune heal`` and a study's ``heal_targets``.

The student is any model cut or pruned from the teacher (an exported folder, or a plan's model
built in memory); the teacher is the dense model it came from, by default the model its recipe
names. Everything checkable before training is checked first (the output folder, the data path,
the teacher's vocabulary, that the student was cut from the teacher), so a mistake costs no
training and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from autoprune.config import EvaluationConfig
from autoprune.data import check_source, evaluation_windows
from autoprune.errors import AutopruneError
from autoprune.export import check_output_dir, read_metadata
from autoprune.measure import SizeReport, measure_size, perplexity
from autoprune.models import LoadedModel, compute_device, load_model
from autoprune.structure import save_subnet
from autoprune.training._checkpoints import FolderCheckpoints
from autoprune.training._config import HealConfig
from autoprune.training._data import HealData
from autoprune.training._loop import Checkpoints, Healer, HealResult, Regularizer

#: Relative difference of the token embeddings above which a student was not cut from the teacher
#: (pruning never touches them; a heal moves them by a few percent at most).
_FOREIGN_EMBEDDINGS = 0.5


def check_teacher(student: PreTrainedModel, teacher: PreTrainedModel, name: str) -> None:
    """One line when ``teacher`` cannot teach ``student``: another vocabulary, or not the model the
    student was cut from (its token embeddings differ)."""
    mine, theirs = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    if mine.shape[0] != theirs.shape[0] or student.config.vocab_size != teacher.config.vocab_size:
        raise AutopruneError(
            f"teacher {name} has a vocabulary of {theirs.shape[0]} tokens, the student {mine.shape[0]}"
        )
    if mine.shape != theirs.shape:
        raise AutopruneError(
            f"the student was not cut from teacher {name}: hidden size {mine.shape[1]}, "
            f"the teacher's {theirs.shape[1]}"
        )
    difference = float((mine.detach().float() - theirs.detach().float()).norm() / theirs.detach().float().norm())
    if difference > _FOREIGN_EMBEDDINGS:
        raise AutopruneError(
            f"the student was not cut from teacher {name}: their token embeddings differ by "
            f"{difference:.0%}"
        )


@dataclass(frozen=True)
class RayWorkers:
    """Where a heal runs on Ray Train: ``count`` workers (a GPU each with ``use_gpu``, else
    ``threads`` CPU threads each), checkpoints in ``storage_path`` under the run ``name``."""

    count: int
    storage_path: Path
    name: str
    use_gpu: bool = False
    threads: int | None = None

    @classmethod
    def for_device(cls, count: int, storage_path: Path, name: str, device: str) -> RayWorkers:
        """``count`` workers computing where ``device`` says (a GPU each for a GPU, else this
        process's CPU thread count each)."""
        return cls(count, storage_path.resolve(), name, use_gpu=compute_device(device).type == "cuda",
                   threads=torch.get_num_threads())

    def train(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        data: HealData,
        config: HealConfig,
        progress: bool = True,
        stop_after: int | None = None,
        regularizer: Callable[[PreTrainedModel], Regularizer] | None = None,
    ) -> tuple[PreTrainedModel, HealResult, dict[str, torch.Tensor] | None]:
        """Train ``student`` on these workers (:func:`autoprune.training._ray.heal_on_ray`)."""
        from autoprune.training._ray import heal_on_ray  # only a run on Ray loads Ray Train

        return heal_on_ray(student, teacher, data, config, self, progress, stop_after, regularizer)


def heal(
    student: PreTrainedModel,
    teacher: LoadedModel,
    source: str | HealData,
    config: HealConfig,
    device: str = "cpu",
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    stop_after: int | None = None,
    ray: RayWorkers | None = None,
) -> tuple[PreTrainedModel, HealResult]:
    """Train ``student`` toward ``teacher`` on ``source``'s training windows (``self``: text the
    teacher writes; or windows already built, as learned structure's two phases share them) as
    ``config`` says, on ``device``; the healed model (``student`` itself, its adapters merged) and
    what the heal measured. ``checkpoints`` make it resumable; with ``ray`` it runs data-parallel on
    Ray Train workers instead (their checkpoints are Ray Train's)."""
    if isinstance(source, str):
        check_source(source)
    check_teacher(student, teacher.model, teacher.spec)
    data = source if isinstance(source, HealData) else HealData.from_source(
        source, teacher, config.seq_len, config.validation_windows, config.tokens, cache_dir, progress
    )
    if ray is not None:
        healed, result, _ = ray.train(student, teacher.model, data, config, progress, stop_after)
        return healed, result
    healer = Healer(student, teacher.model, data, config, compute_device(device))
    result = healer.run(checkpoints, progress, stop_after)
    return healer.finished_model(), result


@dataclass
class HealReport:
    """What ``autoprune heal`` reports and stores beside the healed checkpoint."""

    model: str
    teacher: str
    data: str
    config: HealConfig
    result: HealResult
    size: SizeReport
    ppl: float | None

    def as_dict(self) -> dict[str, Any]:
        result = self.result.as_dict()
        return {
            "model": self.model,
            "teacher": self.teacher,
            "tokens": result["tokens"],
            "steps": result["steps"],
            "seconds": result["seconds"],
            "tokens_per_second": result["tokens_per_second"],
            "peak_memory_bytes": result["peak_memory_bytes"],
            "validation_ppl_before": result["measurements"][0]["ppl"],
            "validation_ppl": result["final"]["ppl"],
            "ppl": self.ppl,
            **self.size.as_dict(),
            "heal": {"teacher": self.teacher, "data": self.data,
                     "config": self.config.model_dump(mode="json"), "result": result},
        }


def heal_checkpoint(
    model: str,
    out: Path,
    config: HealConfig,
    data: str,
    teacher: str | None = None,
    evaluation: EvaluationConfig | None = None,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    workers: int | None = None,
) -> HealReport:
    """Heal the checkpoint folder ``model`` and save it to ``out`` (new or empty), in the same
    form (a per-block sub-network keeps its modelling file) with its metadata and the heal's
    record. Checkpoints go to ``checkpoint_dir`` (default: a hidden folder beside ``out``) and are
    removed once ``out`` is written; the same command run again after a kill resumes there.
    ``workers`` runs the heal on that many Ray Train workers (of the Ray this process joined), a
    GPU each where ``device`` is a GPU."""
    check_output_dir(out)
    check_source(data)
    compute_device(device)
    metadata = read_metadata(Path(model)) if Path(model).is_dir() else {}
    teacher = teacher or (metadata.get("recipe") or {}).get("model")
    if teacher is None:
        raise AutopruneError(f"{model} names no model it was cut from: pass --teacher")
    student = load_model(model)
    dense_linear = (metadata.get("report") or {}).get("dense_linear_params")
    before = measure_size(student.model, student.adapter, dense_linear)
    teacher_model = load_model(teacher)
    check_teacher(student.model, teacher_model.model, teacher)
    folder = checkpoint_dir or out.parent / f".{out.name}.heal-checkpoints"
    identity = student.fingerprint()
    saved = FolderCheckpoints(folder, identity)
    ray = None
    if workers is not None:
        ray = RayWorkers.for_device(workers, folder, f"heal-{identity}-{config.digest()}", device)
    healed, result = heal(student.model, teacher_model, data, config, device, saved, progress,
                          cache_dir, stop_after, ray)
    size = measure_size(healed, student.adapter, dense_linear)
    if stop_after is not None and result.steps < config.steps:
        return HealReport(model, teacher, data, config, result, size, None)  # a run cut short: no output
    if size.linear_nonzeros != before.linear_nonzeros:
        raise AutopruneError(  # the masks make this impossible; never save a model that broke them
            f"healing changed the decoder non-zeros ({before.linear_nonzeros} -> {size.linear_nonzeros})"
        )
    ppl = None
    if evaluation is not None:
        windows = evaluation_windows(evaluation.source, student.tokenizer, evaluation.seq_len,
                                     evaluation.max_windows)
        ppl = perplexity(healed.to(compute_device(device)), windows, progress=progress)
    report = HealReport(model, teacher, data, config, result, size, ppl)
    metadata = {**metadata, "heal": report.as_dict()["heal"]}
    save_subnet(healed.to("cpu"), student.tokenizer, out, metadata, student.source_dtype)
    saved.remove()
    return report
