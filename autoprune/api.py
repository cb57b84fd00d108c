"""The Python API behind ``autoprune prune`` and ``autoprune eval``."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from autoprune.allocation import check_sparsity, owl_plan, uniform_plan
from autoprune.calibration import CalibrationStats, calibrate, self_calibration_windows
from autoprune.config import CalibrationConfig, EvaluationConfig
from autoprune.data import SELF, calibration_windows, check_source, evaluation_windows
from autoprune.errors import AutopruneError
from autoprune.export import (
    CheckpointFiles,
    check_output_dir,
    checkpoint_dtype,
    read_metadata,
    save_checkpoint,
)
from autoprune.export_gguf import model_gguf, write_gguf
from autoprune.latency import export_table
from autoprune.measure import SizeReport, measure_size, perplexity
from autoprune.models import LoadedModel, compute_device, load_model
from autoprune.plan import MethodName, NMPattern, Plan, Recipe
from autoprune.pruner import Pruner, prune_sequentially
from autoprune.quantization import QuantizedTensor, gguf_row_lengths
from autoprune.structure import StructureRequest, check_pruned_layers, model_dims, save_subnet
from autoprune.training import Budget, HealConfig, RayWorkers, learn_structure
from autoprune.variants import DatabaseSettings

#: The GGUF file a quantized plan's checkpoint folder holds beside it.
GGUF_FILE = "model.gguf"


@dataclass
class PruneReport:
    """What ``autoprune prune`` reports and stores beside the checkpoint."""

    recipe: Recipe
    size: SizeReport
    ppl: float | None
    calibration_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)
    #: What the checkpoint's weight files hold, once written.
    checkpoint: CheckpointFiles | None = None
    #: A quantized plan's GGUF file, written beside the checkpoint.
    gguf: Path | None = None

    def as_dict(self) -> dict:
        written = self.checkpoint
        return {
            "model": self.recipe.model,
            "method": self.recipe.plan.method,
            "sequential": self.recipe.sequential,
            "ppl": self.ppl,
            **self.size.as_dict(),
            **({"dtype": written.dtype, "checkpoint_bytes": written.weight_bytes} if written else {}),
            "calibration_cached": self.calibration_cached,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "plan": self.recipe.plan.summary(),
        } | ({"gguf": str(self.gguf), "gguf_bytes": self.gguf.stat().st_size} if self.gguf else {})


class Prepared(NamedTuple):
    """A loaded model and its calibration statistics (a tuple, so ``loaded, stats, cached = ...``
    still reads it)."""

    loaded: LoadedModel
    stats: CalibrationStats
    #: Whether the statistics came from the cache (nothing was computed).
    cached: bool


class PreparedWithWindows(NamedTuple):
    """:class:`Prepared` with the calibration windows the statistics were computed on."""

    loaded: LoadedModel
    windows: torch.Tensor
    stats: CalibrationStats
    cached: bool


def prepare(
    model: str,
    calibration: CalibrationConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Prepared:
    """Load ``model`` and its calibration statistics (from the cache when available, else
    computed on ``device``)."""
    prepared = prepare_with_windows(model, calibration, cache_dir, progress, device)
    return Prepared(prepared.loaded, prepared.stats, prepared.cached)


def prepare_with_windows(
    model: str,
    calibration: CalibrationConfig,
    cache_dir: Path | None,
    progress: bool,
    device: str | torch.device = "cpu",
    check: Callable[[LoadedModel], None] | None = None,
) -> PreparedWithWindows:
    """:func:`prepare`, also returning the calibration windows (sequential pruning reads them
    again; for ``self`` data they are generated text, too costly to make twice). Uncached
    statistics are computed on ``device``, one block there at a time; the model stays on the CPU.
    ``check`` sees the loaded model before anything is computed (a plan checked against it)."""
    loaded = load_model(model)
    if check is not None:
        check(loaded)
    if calibration.source == SELF:
        windows, _ = self_calibration_windows(
            loaded, calibration.n_samples, calibration.seq_len, calibration.seed, cache_dir, progress
        )
    else:
        windows = calibration_windows(
            calibration.source, loaded.tokenizer, calibration.n_samples, calibration.seq_len,
            calibration.seed,
        )
    result = calibrate(loaded, windows, cache_dir=cache_dir, device=device, progress=progress)
    return PreparedWithWindows(loaded, windows, result.stats, result.from_cache)


@dataclass(frozen=True)
class PlanRequest:
    """A plan asked for by name: uniform at one sparsity or N:M, or OWL's allocation."""

    method: MethodName
    sparsity: float = 0.0
    nm: NMPattern | None = None
    owl: bool = False

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.owl and self.nm is not None:
            raise AutopruneError("OWL allocates unstructured sparsity; it cannot take an N:M pattern")

    def build(self, loaded: LoadedModel, stats: CalibrationStats) -> Plan:
        if self.owl:
            return owl_plan(loaded, stats, self.method, self.sparsity)
        return uniform_plan(loaded, self.method, self.sparsity, self.nm)


def prune(
    model: str,
    calibration: CalibrationConfig,
    plan: Plan | PlanRequest | StructureRequest,
    out: Path | None = None,
    evaluation: EvaluationConfig | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    sequential: bool = False,
    device: str = "cpu",
    database: DatabaseSettings | None = None,
    dtype: str | None = None,
    load_weights: Callable[[torch.nn.Module], None] | None = None,
    metadata: dict | None = None,
) -> PruneReport:
    """Calibrate ``model`` (cached), prune it to ``plan``, measure, and save to ``out`` if given,
    its weights in ``dtype`` (a name in :data:`autoprune.export.DTYPES`; None: the source's).

    ``load_weights`` replaces the pruned model's weights before it is measured and saved (with a
    study's healed copy of the variant, see :mod:`autoprune.study._heal`); ``metadata`` is added
    to what is saved beside the checkpoint.

    ``sequential`` prunes block after block from the statistics of the already-pruned model
    (:func:`autoprune.pruner.prune_sequentially`): better, slower, and not what a study measured.
    Calibration, pruning and evaluation run on ``device``. ``database`` reads (and adds) one-shot
    layers from a variant database (:mod:`autoprune.variants`). Everything checkable without the
    model (output folder, data path, device) is checked first, so a mistake costs no model load.
    A quantized plan's model holds its tensors' dequantized values (what it is measured on), and
    ``out`` also gets its GGUF file (:data:`GGUF_FILE`), written from the very bytes quantized.
    """
    if out is not None:
        check_output_dir(out)
    written_dtype = checkpoint_dtype(dtype) if dtype is not None else None
    for source in (calibration.source, evaluation.source if evaluation else SELF):
        check_source(source)
    compute = compute_device(device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    structured = isinstance(plan, StructureRequest) or (isinstance(plan, Plan) and plan.structure)
    if structured and sequential:
        raise AutopruneError("--sequential does not apply to sub-network plans yet")
    quantized = isinstance(plan, Plan) and plan.quantization is not None
    if quantized and sequential:
        raise AutopruneError("--sequential does not apply to quantized plans yet")

    def check(loaded: LoadedModel) -> None:
        nonlocal plan
        if structured:
            plan = _checked_structured_plan(plan, loaded)
        if quantized:
            gguf_row_lengths(loaded, plan)  # a type a tensor cannot hold: refused before calibrating

    prepared = prepare_with_windows(model, calibration, cache_dir, progress, compute, check)
    loaded = prepared.loaded
    timings["load_and_calibrate"] = time.perf_counter() - start
    if isinstance(plan, PlanRequest):
        plan = plan.build(loaded, prepared.stats)
    recipe = Recipe(model=model, calibration=calibration, plan=plan, sequential=sequential)
    if not sequential:  # one-shot prunes where the weights are; sequential moves a block at a time
        loaded.model.to(compute)
    variants = database.open(prepared.stats, cache_dir) if database is not None else None
    pruner = Pruner(loaded, prepared.stats, variants)
    dense_linear = pruner.dense_linear_params
    start = time.perf_counter()
    tensors: dict[str, QuantizedTensor] = {}
    if sequential:
        model = prune_sequentially(loaded, prepared.windows, recipe.plan, compute, progress=progress)
    else:
        model, tensors = pruner.materialize_quantized(recipe.plan)
    if load_weights is not None:
        load_weights(model)
    model.to(compute)  # measured and evaluated on the device too
    timings["prune"] = time.perf_counter() - start
    size = measure_size(model, loaded.adapter, dense_linear)
    ppl = None
    if evaluation is not None:
        start = time.perf_counter()
        windows = evaluation_windows(
            evaluation.source, loaded.tokenizer, evaluation.seq_len, evaluation.max_windows
        )
        ppl = perplexity(model, windows, progress=progress)
        timings["evaluate"] = time.perf_counter() - start
    report = PruneReport(recipe, size, ppl, prepared.cached, timings)
    if out is not None:
        saved = {
            "recipe": recipe.model_dump(mode="json"),
            "evaluation": evaluation.model_dump() if evaluation else None,
            "report": report.as_dict(),
            **(metadata or {}),
        }
        save = save_subnet if structured else save_checkpoint
        report.checkpoint = save(model, loaded.tokenizer, out, saved, written_dtype or loaded.source_dtype)
        if quantized:
            report.gguf = _write_quantized_gguf(model, loaded, out / GGUF_FILE, tensors)
    return report


def _write_quantized_gguf(model: torch.nn.Module, loaded: LoadedModel, path: Path,
                          tensors: dict[str, QuantizedTensor]) -> Path:
    """The quantized model as a GGUF file in its checkpoint folder; a model the file cannot
    express leaves no checkpoint either."""
    try:
        write_gguf(model, loaded.tokenizer, path, tokenizer_gguf=model_gguf(loaded.spec), quantized=tensors)
    except BaseException:
        shutil.rmtree(path.parent)
        raise
    return path


def _checked_structured_plan(plan: Plan | StructureRequest, loaded: LoadedModel) -> Plan:
    """The sub-network plan, checked against the loaded model before anything is computed."""
    dims = model_dims(loaded.model)
    if isinstance(plan, StructureRequest):
        return Plan(structure=plan.structure(dims))
    check_pruned_layers(plan, dims)
    return plan


def evaluate(
    model: str, evaluation: EvaluationConfig, progress: bool = True, device: str = "cpu"
) -> dict:
    """Perplexity and size of a checkpoint (pruned or not) as plain transformers loads it, on
    ``device``."""
    compute = compute_device(device)
    loaded = load_model(model)
    loaded.model.to(compute)
    windows = evaluation_windows(
        evaluation.source, loaded.tokenizer, evaluation.seq_len, evaluation.max_windows
    )
    folder = Path(model)
    dense_linear = (
        read_metadata(folder).get("report", {}).get("dense_linear_params") if folder.is_dir() else None
    )
    size = measure_size(loaded.model, loaded.adapter, dense_linear)
    return {
        "model": model,
        "ppl": perplexity(loaded.model, windows, progress=progress),
        "eval_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        **size.as_dict(),
    }



def prune_learned(
    model: str,
    data: str,
    target: float,
    config: HealConfig,
    out: Path | None = None,
    evaluation: EvaluationConfig | None = None,
    budget: Budget = "params",
    learn_share: float = 0.5,
    cache_dir: Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    workers: int | None = None,
) -> PruneReport:
    """A sub-network of ``model`` learned by training (``autoprune prune --structured learned``):
    gates trained with the weights on ``data`` until the expected cost is ``1 - target`` of the
    dense model's, the model cut to what they keep (its consuming layers corrected from the
    calibration statistics of ``data``, cached) and healed, all within ``config.tokens`` (see
    :mod:`autoprune.training._learned`); measured like :func:`prune` and saved to ``out``.
    Checkpoints go beside ``out``, so the same command resumes a killed run. ``workers`` trains on
    that many Ray Train workers (of the Ray this process joined; a GPU each where ``device`` is one)."""
    if not 0.0 < target < 1.0:
        raise AutopruneError(f"--target must lie in (0, 1), got {target}")
    if out is not None:
        check_output_dir(out)
    for source in (data, evaluation.source if evaluation else SELF):
        check_source(source)
    compute_device(device)
    start = time.perf_counter()
    calibration = CalibrationConfig(source=data)

    def check(loaded: LoadedModel) -> None:
        model_dims(loaded.model)  # the LLaMA family only: one line before any work

    prepared = prepare_with_windows(model, calibration, cache_dir, progress, compute_device(device), check)
    teacher = prepared.loaded
    dense_linear = measure_size(teacher.model, teacher.adapter).linear_params
    latency = export_table(teacher, cache_dir) if budget == "latency" else None
    folder = (out.parent / f".{out.name}.learn-checkpoints") if out is not None else None
    # Ray Train keeps its checkpoints beside the others (in a scratch folder without ``out``)
    with tempfile.TemporaryDirectory() if folder is None else nullcontext(folder) as storage:
        ray = None
        if workers is not None:
            ray = RayWorkers.for_device(workers, Path(storage), f"learned-{config.digest()}", device)
        learned = learn_structure(teacher, data, target, config, learn_share, budget, latency, device,
                                  folder, progress, cache_dir, prepared.stats, workers=ray)
    recipe = Recipe(model=model, calibration=calibration, plan=learned.plan)
    size = measure_size(learned.model, teacher.adapter, dense_linear)
    ppl = None
    if evaluation is not None:
        windows = evaluation_windows(evaluation.source, teacher.tokenizer, evaluation.seq_len, evaluation.max_windows)
        ppl = perplexity(learned.model.to(compute_device(device)), windows, progress=progress)
    report = PruneReport(recipe, size, ppl, prepared.cached, {"learn_and_heal": time.perf_counter() - start})
    if out is not None:
        metadata = {
            "recipe": recipe.model_dump(mode="json"),
            "evaluation": evaluation.model_dump() if evaluation else None,
            "report": report.as_dict(),
            "learned": {"target": target, "budget": budget, "learn_share": learn_share,
                        "config": config.model_dump(mode="json"), **learned.record()},
        }
        save_subnet(learned.model.to("cpu"), teacher.tokenizer, out, metadata, teacher.source_dtype)
        shutil.rmtree(folder, ignore_errors=True)
    return report
