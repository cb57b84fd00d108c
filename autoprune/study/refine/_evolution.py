"""The (1 + lambda) level-switch evolution over one worker's model (see :mod:`autoprune.study.refine`
for why it is affordable and how it avoids overfitting the study's windows).

A sub-network plan (one with a structure) evolves its widths instead (:mod:`._widths`): the same
generations, windows and fitness, on candidates measured as their sub-networks (:mod:`._subnet`),
each built once and the parent's kept from one generation to the next. A quantized plan evolves
its tensors' GGUF types at its bytes (:mod:`._types`), each candidate's tensors quantized once
(the pruner keeps them)."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from autoprune.data import validation_windows
from autoprune.errors import AutopruneError
from autoprune.measure import reference_logprobs, window_losses
from autoprune.plan import Plan
from autoprune.pruner import Pruner, sequential_statistics, sequential_statistics_folder
from autoprune.quantization import quantized_shapes
from autoprune.structure import model_dims
from autoprune.study._worker import TrialRequest, TrialResult, TrialWorker
from autoprune.study.refine._allocation import Allocation, refinable_layers
from autoprune.study.refine._checkpoint import EvolutionState
from autoprune.study.refine._config import FINALISTS, SCREEN_WINDOWS, SWITCH_COUNTS, RefineConfig
from autoprune.study.refine._subnet import require_widths_only
from autoprune.study.refine._types import TypeAllocation
from autoprune.study.refine._widths import WidthAllocation, width_levels


class LevelSwitchEvolution:
    """The (1 + lambda) search over one worker's model, with every pruned layer kept."""

    def __init__(self, worker: TrialWorker, base: Plan, config: RefineConfig) -> None:
        self.worker, self.base, self.config = worker, base, config
        self.pruner = worker.pruner
        self.rng = random.Random(config.seed)
        self.kept: dict[tuple[str, int], torch.Tensor] = {}
        self.statistics_from: dict[str, int] | None = None
        #: A sub-network plan's candidates, built once each, by their widths.
        self.subnets: dict[str, torch.nn.Module] = {}
        self.structured = base.structure is not None
        check_refinable(base, config)
        spec = worker.spec
        pool = validation_windows(
            spec.calibration.source,
            worker.loaded.tokenizer,
            spec.eval_seq_len,
            spec.eval_windows + config.pool_windows,
        )[spec.eval_windows :]
        needed = SCREEN_WINDOWS + config.select_windows
        if len(pool) < needed:
            raise AutopruneError(
                f"the validation split has {len(pool)} window(s) beyond the study's "
                f"{spec.eval_windows}; refinement needs {needed}"
            )
        self.pool = pool
        self.start: Allocation | WidthAllocation | TypeAllocation
        if base.quantization is not None:
            self.start = TypeAllocation.of(base, quantized_shapes(worker.loaded, base))
            self.fixed = {}
        elif self.structured:
            dims = model_dims(worker.loaded.model)
            self.start = WidthAllocation(width_levels(base, dims), base, dims)
            self.fixed: dict[str, torch.Tensor] = {}
            # the trial's own sub-network: every run's first parent (refused now if it cannot be built)
            self.subnets[_key(self.start.counts)] = self.pruner.subnet(base)
        else:
            shapes = self.pruner.layer_shapes()
            self.start = Allocation(refinable_layers(base, self.pruner), shapes, config.step)
            self.fixed = self._prune_fixed()
        #: The dense model's log-probabilities on each pool window, computed the first time the
        #: window is drawn (a generation draws a few of the pool's windows; most runs never draw all).
        self.references: dict[int, torch.Tensor] = {}

    def run(
        self,
        state: EvolutionState | None = None,
        save: Callable[[EvolutionState], None] | None = None,
        progress: bool = False,
    ) -> EvolutionState:
        """Generations from ``state`` (the trial's own allocation when None) up to the configured
        number; ``save`` receives the state after each one, so a stopped run can go on from it."""
        state = state or EvolutionState(0, dict(self.start.counts))
        state.restore_random(self.rng)
        parent = self.start.with_counts(state.counts)
        statistics_from = state.statistics_from
        every = self.config.sequential_every
        if (
            every is not None and statistics_from is not None
            and state.generation % every == 0 and statistics_from != state.counts
        ):  # resumed where the statistics are refreshed: the checkpoint's are not needed again
            shutil.rmtree(self._statistics_folder(statistics_from), ignore_errors=True)
        total = self.config.generations
        bar = tqdm(
            range(state.generation, total), initial=state.generation, total=total,
            desc="refine", unit="gen", disable=not progress,
        )
        for generation in bar:
            began = time.perf_counter()
            if every is not None:
                if generation % every == 0:
                    statistics_from = dict(parent.counts)
                if statistics_from != self.statistics_from:
                    self._use_statistics(statistics_from, progress)
            kids = [
                parent.mutated(self.rng, self.rng.choice(SWITCH_COUNTS))
                for _ in range(self.config.offspring)
            ]
            screen = self._draw(SCREEN_WINDOWS)
            ranked = sorted(
                range(len(kids)),
                key=lambda i: self._fitness(kids[i], screen, self.config.screen_tokens),
            )
            finalists = [parent] + [kids[i] for i in ranked[:FINALISTS]]
            select = self._draw(self.config.select_windows)
            scores = [self._fitness(c, select, self.pool.shape[1]) for c in finalists]
            best = min(range(len(finalists)), key=scores.__getitem__)
            parent = finalists[best]
            self._forget_all_but(parent)
            version, internal, gauss = self.rng.getstate()
            state = EvolutionState(
                generation=generation + 1,
                counts=dict(parent.counts),
                accepted=state.accepted + (best > 0),
                history=[*state.history, scores[best]],
                random_state=[version, list(internal), gauss],
                seconds=state.seconds + time.perf_counter() - began,
                statistics_from=self.statistics_from,
            )
            if save is not None:
                save(state)
            bar.set_postfix(kl=f"{scores[best]:.4f}", accepted=state.accepted)
        return state

    def _prune_fixed(self) -> dict[str, torch.Tensor]:
        """The layers refinement leaves as they are (N:M, or in a removed block's place: none),
        pruned once per set of statistics."""
        return self.pruner.prune_layers(
            self.base.method,
            {
                name: spec
                for name, spec in self.pruner.kept_layers(self.base).items()
                if name not in self.start.counts
            },
        )

    def _use_statistics(self, counts: dict[str, int], progress: bool) -> None:
        """Prune candidates from the sequential statistics of the allocation ``counts`` from now
        on; layers pruned from the previous statistics are dropped, and so are those statistics
        (a model's worth of Hessians on disk; a resumed run recomputes them)."""
        previous = self.pruner.stats.folder if self.statistics_from is not None else None
        stats = sequential_statistics(
            self.worker.pruner, self.worker.calibration_windows, self.plan_of(counts),
            self.worker.cache_dir, progress,
        )
        self.pruner = Pruner(self.worker.loaded, stats)
        self.kept = {}
        self.fixed = self._prune_fixed()
        self.statistics_from = dict(counts)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def measure_sequential(
        self, state: EvolutionState, number: int, progress: bool = False
    ) -> TrialResult:
        """The final allocation as ``export --sequential`` makes it, measured like the trial on
        the study's windows: pruned from its own sequential statistics where candidates were
        ranked on them, otherwise block after block (one calibration pass). Statistics of another
        allocation (the checkpoint's, after a resume) are deleted first."""
        stale = state.statistics_from
        if stale is not None and stale != state.counts:
            shutil.rmtree(self._statistics_folder(stale), ignore_errors=True)
        request = TrialRequest(number, self.plan_of(state.counts))
        if self.statistics_from == state.counts:
            return self.worker.run(request, self.pruner)
        return self.worker.run_sequential(request, progress)

    def plan_of(self, counts: dict[str, int]) -> Plan:
        """The refined trial's plan with these per-row prune counts (or widths)."""
        return self.start.with_counts(counts).plan(self.base)

    def _statistics_folder(self, counts: dict[str, int]) -> Path:
        return sequential_statistics_folder(
            self.worker.pruner, self.worker.calibration_windows, self.plan_of(counts),
            self.worker.cache_dir,
        )

    def release_statistics(self) -> None:
        """Delete the sequential statistics in use, once the refinement is recorded and no resume
        needs them (a model's worth of Hessians: many gigabytes for a large model)."""
        if self.statistics_from is not None:
            shutil.rmtree(self.pruner.stats.folder, ignore_errors=True)
            self.pruner, self.statistics_from = self.worker.pruner, None

    def _reference(self, windows: list[int]) -> torch.Tensor:
        """The dense model's log-probabilities on these pool windows."""
        missing = [index for index in windows if index not in self.references]
        if missing:
            computed = reference_logprobs(self.worker.loaded.model, self.pool[missing])
            self.references.update(zip(missing, computed, strict=True))
        return torch.stack([self.references[index] for index in windows])

    def _draw(self, count: int) -> list[int]:
        return self.rng.sample(range(len(self.pool)), count)

    @torch.inference_mode()
    def _fitness(self, allocation: Allocation | WidthAllocation | TypeAllocation, windows: list[int], tokens: int) -> float:
        """Mean per-token KL to the dense model on the first ``tokens`` of those pool windows."""
        total = 0.0
        reference = self._reference(windows)[:, :tokens]  # the dense model, before a candidate replaces it
        with self._candidate(allocation) as model:
            for loss in window_losses(
                model, self.pool[windows, :tokens], reference,
                batch_size=self.worker.spec.eval_batch,
            ):
                total += loss.kl
        return total / (len(windows) * tokens)

    @contextmanager
    def _candidate(self, allocation: Allocation | WidthAllocation | TypeAllocation) -> Iterator[torch.nn.Module]:
        """The model a candidate stands for: the dense model pointed at its pruned layers, its
        sub-network (built on first use), or its quantized model."""
        if isinstance(allocation, TypeAllocation):
            with self.pruner.applied(allocation.plan(self.base)) as model:
                yield model
            return
        if isinstance(allocation, WidthAllocation):
            key = _key(allocation.counts)
            if key not in self.subnets:
                self.subnets[key] = self.pruner.subnet(allocation.plan(self.base))
            yield self.subnets[key]
            return
        with self.pruner.pointed(self._weights(allocation), self.base.removed_blocks) as model:
            yield model

    def _weights(self, allocation: Allocation) -> dict[str, torch.Tensor]:
        """Every layer's weight: the fixed ones pruned once, the refined ones looked up by their
        count, pruning only the (layer, count) pairs not held yet (one batch per candidate)."""
        plan = allocation.plan(self.base)
        missing = {
            name: plan.layers[name]
            for name, count in allocation.counts.items()
            if (name, count) not in self.kept
        }
        for name, weight in self.pruner.prune_layers(plan.method, missing).items():
            self.kept[(name, allocation.counts[name])] = weight
        held = {name: self.kept[(name, count)] for name, count in allocation.counts.items()}
        return {**self.fixed, **held}

    def _forget_all_but(self, parent: Allocation | WidthAllocation | TypeAllocation) -> None:
        """Keep the parent's layers only: memory stays near one model's worth, and a candidate
        re-prunes just the few layers its switches touched (cheap next to a generation's forward
        passes)."""
        self.subnets = {key: model for key, model in self.subnets.items() if key == _key(parent.counts)}
        self.kept = {
            key: weight for key, weight in self.kept.items() if parent.counts[key[0]] == key[1]
        }


def _key(counts: dict[str, int]) -> str:
    return json.dumps(counts, sort_keys=True)


def check_refinable(plan: Plan, config: RefineConfig) -> None:
    """Refuse, in one line and before anything is loaded or written, what a sub-network or a
    quantized plan's refinement cannot do: settings it has no use for, sparsity on top of its
    widths. A quantized plan is refined on its types (its widths and sparsity stay)."""
    if plan.quantization is not None:
        if config.sequential_every is not None or config.measure_sequential or config.method is not None:
            raise AutopruneError(
                "a quantized plan is refined on its GGUF types: leave out --sequential-every, "
                "--measure-sequential and --method"
            )
        return
    if plan.structure is None:
        return
    require_widths_only(plan)
    if config.sequential_every is not None or config.measure_sequential:
        raise AutopruneError(
            "the --sequential recipe prunes per-layer sparsity; a sub-network plan is refined on "
            "its widths (leave out --sequential-every and --measure-sequential)"
        )
    if config.method is not None:
        raise AutopruneError(
            "--method prunes weights with another method; a sub-network plan is cut, not pruned "
            "(leave it out)"
        )
