"""The unit every executor runs: a model and its statistics loaded once, plans in, records out.

A worker lives in the search process (in-process executor) or in a Ray actor; either way it holds
the dense model, the cached calibration statistics, the pruning methods' reusable state and the
validation windows, and it never touches the study storage: the driver alone does.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoprune.api import prepare_with_windows
from autoprune.calibration import CalibrationStats
from autoprune.config import CalibrationConfig
from autoprune.data import validation_windows
from autoprune.gguf_presets import gguf_context
from autoprune.gguf_size import GGUFContext, GGUFSizer
from autoprune.latency import export_table
from autoprune.measure import SizeMeter, ppl_from_nll, reference_logprobs, window_losses
from autoprune.models import LoadedModel, compute_device
from autoprune.plan import MethodName, Plan
from autoprune.pruner import Pruner, sequential_pass
from autoprune.structure import model_dims, resolve_blocks
from autoprune.study._records import finite_or_none
from autoprune.variants import DatabaseSettings
from search_spaces import SpaceContext

Objective = Literal["ppl", "kl"]
TrialStatus = Literal["complete", "collapsed", "stopped_early", "failed"]


class WorkerSpec(BaseModel):
    """Everything a worker needs to build itself, small enough to ship to a remote actor."""

    model_config = ConfigDict(extra="forbid")

    model: str
    calibration: CalibrationConfig
    objective: Objective = "ppl"
    eval_seq_len: Annotated[int, Field(ge=2)] = 512
    eval_windows: Annotated[int, Field(ge=1)] = 8
    min_windows: Annotated[int, Field(ge=1)] = 2
    eval_batch: Annotated[int, Field(ge=1)] = 1
    cache_dir: str | None = None
    device: str = "cpu"
    threads: Annotated[int, Field(ge=1)] | None = None
    #: Price every trial's prefill and decode latency from the device's per-shape table.
    latency: bool = False
    #: Assemble plans from a variant database of pruned layers (None: prune every plan).
    database: DatabaseSettings | None = None
    #: Price every trial's GGUF file bytes, and describe GGUF types to the search space (its
    #: file's arithmetic and llama.cpp's preset mixes); quantized plans are priced either way.
    gguf: bool = False


@dataclass(frozen=True)
class TrialRequest:
    """One candidate to measure. ``stop_above`` enables multi-fidelity: once ``min_windows``
    windows give a quality estimate above it, the trial stops and is reported as such."""

    number: int
    plan: Plan
    stop_above: float | None = None


@dataclass
class TrialResult:
    """A measured candidate (or why it could not be measured)."""

    number: int
    status: TrialStatus
    quality: float = math.inf
    ppl: float = math.inf
    kl: float | None = None
    windows: int = 0
    size: dict[str, float | int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: str = field(default_factory=platform.node)
    #: Times the trial was started again because its worker died (Ray executor).
    retries: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The user attributes a study keeps of this measurement (see ``_records``); JSON-safe,
        non-finite qualities as None."""
        return {
            "status": self.status,
            "ppl": finite_or_none(self.ppl),
            "kl": finite_or_none(self.kl),
            "quality": finite_or_none(self.quality),
            "size": self.size,
            "windows": self.windows,
            "worker": self.worker,
            "retries": self.retries,
        }


def space_context(
    loaded: LoadedModel,
    stats: CalibrationStats,
    method: MethodName,
    sparsity_range: tuple[float, float],
    database: DatabaseSettings | None,
    gguf: GGUFContext | None = None,
) -> SpaceContext:
    """The search space's view of a loaded model; on the database's grid where plans are assembled
    from one (allocations then put every layer but one on it); with ``gguf``, what GGUF spaces
    need (the file's arithmetic, llama.cpp's presets)."""
    ctx = SpaceContext.from_model(loaded, stats, method, sparsity_range)
    return replace(ctx, grid=database.grid if database is not None else None, gguf=gguf)


class TrialWorker:
    """Loads once, then measures plan after plan."""

    def __init__(self, spec: WorkerSpec, progress: bool = False) -> None:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.cache_dir = Path(spec.cache_dir) if spec.cache_dir else None
        compute_device(spec.device)  # an unknown or absent device fails before the model loads
        # The calibration windows are kept for sequential statistics (``refine --sequential-every``).
        prepared = prepare_with_windows(spec.model, spec.calibration, self.cache_dir, progress, spec.device)
        self.loaded, self.calibration_windows, self.stats = prepared.loaded, prepared.windows, prepared.stats
        self.loaded.model.to(spec.device)
        database = spec.database.open(self.stats, self.cache_dir) if spec.database else None
        self.pruner = Pruner(self.loaded, self.stats, database)
        self.windows = validation_windows(
            spec.calibration.source, self.loaded.tokenizer, spec.eval_seq_len, spec.eval_windows
        )
        self.reference = (
            reference_logprobs(self.loaded.model, self.windows) if spec.objective == "kl" else None
        )
        self.size_meter = SizeMeter(self.loaded.adapter, self.pruner.dense_linear_params)
        #: The GGUF file's arithmetic (the tokenizer's key-values measured once), where priced.
        self.gguf = GGUFSizer.of(self.loaded) if spec.gguf else None
        self.latency = None
        if spec.latency:  # the table prices LLaMA-family shapes: other families fail here, in one line
            self.dims = model_dims(self.loaded.model)
            self.latency = export_table(self.loaded, self.cache_dir)

    def space_context(self, method: MethodName, sparsity_range: tuple[float, float]) -> SpaceContext:
        """The search space's view of the loaded model, so the driver needs no copy of its own."""
        gguf = gguf_context(self.loaded, self.gguf, self.cache_dir) if self.spec.gguf else None
        return space_context(self.loaded, self.stats, method, sparsity_range, self.spec.database, gguf)

    def run(self, request: TrialRequest, pruner: Pruner | None = None) -> TrialResult:
        """Prune to the plan, measure size and quality; a collapsed model is a result, not a crash.
        ``pruner`` prunes from other statistics of the same model than the worker's own (a
        refinement's sequential ones), so both variants of a plan are measured alike."""
        return self._timed(request, (pruner or self.pruner).applied(request.plan))

    def measure(self, request: TrialRequest, model: torch.nn.Module) -> TrialResult:
        """``model``, a variant of the request's plan made elsewhere (a healed one), measured as a
        trial of the plan is."""
        return self._timed(request, nullcontext(model))

    def run_sequential(self, request: TrialRequest, progress: bool = False) -> TrialResult:
        """The plan as ``export --sequential`` makes it, measured like :meth:`run`: pruned block
        after block from the inputs the already-pruned blocks give on the calibration windows (a
        calibration pass, so for a study's finished members, not for its trials)."""
        return self._timed(request, self._sequentially_pruned(request.plan, progress))

    @contextmanager
    def _sequentially_pruned(self, plan: Plan, progress: bool) -> Iterator[torch.nn.Module]:
        with self.pruner.pointed({}) as model:  # however it leaves, the dense weights come back
            sequential_pass(self.loaded, self.calibration_windows, plan, self.spec.device, progress=progress)
            with self.loaded.adapter.without_blocks(model, plan.removed_blocks):
                yield model

    def _timed(self, request: TrialRequest, pruned: AbstractContextManager[torch.nn.Module]) -> TrialResult:
        """Measure the model ``pruned`` makes of the request's plan, timing its parts."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        weights_start = time.perf_counter()
        with pruned as model:
            timings["prune"] = time.perf_counter() - weights_start
            size = self._size(model, request.plan)
            eval_start = time.perf_counter()
            result = self._measure(model, request, size)
            timings["evaluate"] = time.perf_counter() - eval_start
        timings["total"] = time.perf_counter() - start
        timings["bookkeeping"] = timings["total"] - timings["prune"] - timings["evaluate"]
        result.seconds = {key: round(value, 4) for key, value in timings.items()}
        return result

    def _size(self, model: torch.nn.Module, plan: Plan) -> dict[str, float | int]:
        """The size report, and the predicted latency where the worker prices it. A sub-network is
        a new model whose tensors the shared meter has never seen, so it gets a meter of its own."""
        meter = self.size_meter if plan.structure is None else SizeMeter(
            self.loaded.adapter, self.pruner.dense_linear_params
        )
        size: dict[str, float | int] = meter(model).as_dict()
        if plan.quantization is not None or self.gguf is not None:
            self.gguf = self.gguf or GGUFSizer.of(self.loaded)
            size["gguf_bytes"] = self.gguf.plan_bytes(plan)
        if self.latency is not None:
            shapes = resolve_blocks(plan.structure, plan.removed_blocks, self.dims)
            timing = self.latency.predict(shapes)
            size["latency_ms"] = round(timing.prefill_ms, 3)
            size["decode_ms"] = round(timing.decode_ms, 3)
            size["latency_table"] = self.latency.digest
        return size

    def _measure(self, model: torch.nn.Module, request: TrialRequest, size: dict) -> TrialResult:
        """Window after window (``eval_batch`` to a forward pass): the running perplexity and,
        with the KL objective, the running KL; the objective's running value is what
        ``stop_above`` bounds once ``min_windows`` windows are in."""
        total_nll = total_kl = 0.0
        ppl, kl = math.inf, None
        losses = window_losses(model, self.windows, self.reference, batch_size=self.spec.eval_batch)
        for count, loss in enumerate(losses, start=1):
            total_nll += loss.nll
            ppl = ppl_from_nll(total_nll, count * (self.windows.shape[1] - 1))
            if loss.kl is not None:
                total_kl += loss.kl
                kl = total_kl / (count * self.windows.shape[1])
            quality = ppl if kl is None else kl
            if not (math.isfinite(ppl) and math.isfinite(quality)):
                return TrialResult(request.number, "collapsed", ppl=ppl, windows=count, size=size)
            if (
                request.stop_above is not None
                and self.spec.min_windows <= count < len(self.windows)
                and quality > request.stop_above
            ):
                return TrialResult(request.number, "stopped_early", quality, ppl, kl, count, size)
        return TrialResult(request.number, "complete", quality, ppl, kl, count, size)
