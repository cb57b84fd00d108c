"""The heal loop: the student trained toward the teacher, step by step, resumable.

:class:`Healer` owns one run: the student (every kept weight trainable, or LoRA adapters), the
frozen teacher, the optimizer, the zero masks and the record of held-out measurements. It is the
same object in a single process and in each Ray Train worker (:mod:`autoprune.training._ray`):
there the student's hidden-state module is wrapped for data-parallel training and each worker
takes its share of every batch, so the averaged gradient is the whole batch's.

Checkpoints hold everything the next step depends on (weights, optimizer moments, step, the
measurements so far and, with ``patience``, the best weights): the step's batch and learning rate
follow from the step number, so a heal resumed from its last checkpoint ends with the weights an
uninterrupted one reaches.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from autoprune.errors import AutopruneError
from autoprune.heap import retained_heap
from autoprune.measure import ppl_from_nll
from autoprune.models import ArchitectureAdapter
from autoprune.training._config import HealConfig
from autoprune.training._data import HealData
from autoprune.training._loss import distillation_loss, next_token_labels
from autoprune.training._masks import SparsityMasks


@dataclass(frozen=True)
class Measurement:
    """The student on the held-out windows after ``step`` optimizer steps."""

    step: int
    tokens: int
    ppl: float
    kl: float


@dataclass
class HealResult:
    """What a heal did and measured (tokens/s and memory cover this process's part of it)."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    measurements: list[Measurement]
    masked_layers: int
    resumed_from: int = 0
    stopped_early: bool = False
    best_step: int | None = None

    @property
    def final(self) -> Measurement:
        """The measurement of the weights the heal ends with (the best kept, with patience)."""
        if self.best_step is not None:
            return next(m for m in self.measurements if m.step == self.best_step)
        return self.measurements[-1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"final": asdict(self.final)}


class Checkpoints(Protocol):
    """Where a heal's state goes every ``checkpoint_every`` steps and comes back from."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], step: int) -> None: ...


class Regularizer(Protocol):
    """Parameters trained beside the student's and a penalty added to its loss (learned structure's
    gates and Lagrange multipliers, :mod:`autoprune.training._gates`)."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups (``params``, ``names``, ``lr_scale`` against the schedule's rate, and
        any AdamW option such as ``maximize``)."""

    def sample(self, step: int) -> None:
        """Draw step ``step``'s random state (before its forward pass)."""

    def penalty(self) -> torch.Tensor:
        """What is added to the step's loss."""

    def evaluating(self) -> AbstractContextManager[None]:
        """The student as measured: the regularizer's deterministic state."""

    def summary(self) -> dict[str, float]:
        """A few numbers for the progress bar and the record."""

    def state_dict(self) -> dict[str, Any]:
        """Its trained state (what a Ray Train run reports back with the weights)."""


class _HiddenStates(nn.Module):
    """The student's final hidden states: the module data-parallel training wraps (the output
    head is applied by the chunked loss, outside the forward). A regularizer that is a module is
    held too, so data-parallel training averages its gradients with the weights'."""

    def __init__(self, model: PreTrainedModel, regularizer: Regularizer | None = None) -> None:
        super().__init__()
        self.model = model
        if isinstance(regularizer, nn.Module):
            self.regularizer = regularizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


class Healer:
    """One heal of ``student`` toward ``teacher`` (see the module)."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        data: HealData,
        config: HealConfig,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        regularizer: Regularizer | None = None,
    ) -> None:
        self.config, self.data, self.device, self.rank, self.world = config, data, device, rank, world
        self.regularizer = regularizer
        torch.manual_seed(config.seed)  # LoRA's initial adapters
        self.student = student.to(device).train()
        if isinstance(regularizer, nn.Module):
            regularizer.to(device)
        if config.precision == "bf16":  # a copy: the caller's teacher may be a search worker's model
            teacher = copy.deepcopy(teacher).to(dtype=torch.bfloat16)
        # Not frozen in place (it runs under no_grad, its output head detached): the caller's model
        # keeps its flags, and a student later copied from it (a learned structure's) trains.
        self.teacher = teacher.to(device).eval()
        adapter = ArchitectureAdapter.for_model(student)
        linear = {f"{name}.weight" for name in adapter.present_layer_names(student)}
        self.masks = SparsityMasks.capture(student, linear)
        self.peft = _with_lora(student, config, adapter) if config.lora is not None else None
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        self.module = (wrap or (lambda module: module))(_HiddenStates(student, regularizer))
        #: The student's own trainable weights (gradient clipping is theirs alone).
        self.weights = list(self.trainable)
        groups = [{"params": self.weights, "lr_scale": 1.0}]
        for group in regularizer.param_groups(config.lr) if regularizer is not None else ():
            names = group.pop("names")
            self.trainable += group["params"]
            self.names += names
            groups.append(group)
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
        self.step = 0
        self.measurements: list[Measurement] = []
        self.best: tuple[int, float, dict[str, torch.Tensor]] | None = None
        self.stale = 0
        bf16 = config.precision == "bf16"
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the next step depends on (CPU tensors)."""
        return {
            "config": self.config.digest(),
            "step": self.step,
            "weights": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.trainable)},
            "optimizer": self.optimizer.state_dict(),
            "measurements": [asdict(m) for m in self.measurements],
            "best": self.best,
            "stale": self.stale,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config.digest():
            raise AutopruneError(
                "the checkpoint was made by a heal with other settings; use another checkpoint "
                "folder or the same settings"
            )
        with torch.no_grad():
            for name, parameter in zip(self.names, self.trainable):
                parameter.copy_(state["weights"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.measurements = [Measurement(**m) for m in state["measurements"]]
        self.best, self.stale = state["best"], state["stale"]

    # -- training ---------------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step on this worker's share of the step's batch; its loss."""
        config = self.config
        ids = self.data.batch(self.step, config.batch_size, config.seed, self.rank, self.world).to(self.device)
        if self.regularizer is not None:
            self.regularizer.sample(self.step)
        with self.autocast:
            with torch.no_grad():
                teacher_hidden = self.teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            hidden = self.module(ids)
            loss = distillation_loss(
                hidden.reshape(-1, hidden.shape[-1]),
                self.student.get_output_embeddings().weight,
                teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                self.teacher.get_output_embeddings().weight.detach(),
                next_token_labels(ids),
                config.temperature,
                config.ce_weight,
                config.chunk,
            )
            if self.regularizer is not None:
                loss = loss + self.regularizer.penalty()
        loss.backward()
        self.masks.zero_gradients()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.weights, config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate(self.step) * group["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masks.apply()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def measure(self) -> Measurement:
        """Perplexity and KL to the teacher on the held-out windows (one window at a time)."""
        self.student.eval()
        windows = self.data.validation
        evaluating = self.regularizer.evaluating() if self.regularizer is not None else nullcontext()
        with evaluating:
            nll, kl = self._held_out(windows)
        self.student.train()
        tokens = self.step * self.config.tokens_per_step
        return Measurement(
            self.step, tokens, ppl_from_nll(nll, windows.numel() - len(windows)), kl / windows.numel()
        )

    def _held_out(self, windows: torch.Tensor) -> tuple[float, float]:
        """Summed next-token NLL and KL to the teacher over ``windows``."""
        nll = kl = 0.0
        for window in windows:
            ids = window.unsqueeze(0).to(self.device)  # the student as it is stored: float32
            logits = self.student(ids, use_cache=False).logits[0].float()
            reference = F.log_softmax(self.teacher(ids, use_cache=False).logits[0].float(), -1)
            log_prob = F.log_softmax(logits, -1)
            nll -= float(log_prob[:-1].gather(1, ids[0, 1:, None]).sum())
            kl += float((reference.exp() * (reference - log_prob)).sum())
        return nll, kl

    def run(
        self,
        checkpoints: Checkpoints | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> HealResult:
        """Train to the end of the budget (or until ``patience`` runs out), resuming from
        ``checkpoints`` where they hold a state; ``stop_after`` steps end the run early as a kill
        would (tests)."""
        config = self.config
        state = checkpoints.load() if checkpoints is not None else None
        if state is not None:
            self.restore(state)
        resumed_from = self.step
        if not self.measurements:
            self._record(self.measure())
        evaluations = set(config.evaluation_steps())
        per_step = config.tokens_per_step
        bar = tqdm(
            total=config.steps * per_step, initial=self.step * per_step, unit="tok",
            unit_scale=True, desc="heal", disable=not progress or self.rank != 0,
        )
        start, stopped = time.perf_counter(), False
        heap = retained_heap() if self.device.type == "cpu" else nullcontext()
        try:
            with heap:
                while self.step < config.steps and not stopped:
                    if stop_after is not None and self.step >= resumed_from + stop_after:
                        break
                    loss = self.train_step()
                    bar.update(per_step)
                    postfix = {"loss": f"{loss:.4f}"}
                    if self.regularizer is not None:
                        postfix |= {key: f"{value:.3f}" for key, value in self.regularizer.summary().items()}
                    if self.step in evaluations:
                        stopped = self._record(self.measure())
                        postfix["ppl"] = f"{self.measurements[-1].ppl:.2f}"
                    bar.set_postfix(postfix)
                    if checkpoints is not None and (self.step % config.checkpoint_every == 0 or stopped):
                        checkpoints.save(self.state(), self.step)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        trained = (self.step - resumed_from) * per_step
        if stopped or (self.best is not None and self.step >= config.steps):
            self._keep_best()
        return HealResult(
            steps=self.step,
            tokens=self.step * per_step,
            seconds=round(seconds, 3),
            tokens_per_second=round(trained / seconds, 2) if seconds > 0 else math.nan,
            peak_memory_bytes=peak_memory(self.device),
            measurements=list(self.measurements),
            masked_layers=len(self.masks),
            resumed_from=resumed_from,
            stopped_early=stopped,
            best_step=self.best[0] if self.best is not None else None,
        )

    def finished_model(self) -> PreTrainedModel:
        """The healed student as a plain model: adapters merged (their update masked where the
        layer is sparse), in evaluation mode."""
        model = self.student
        if self.peft is not None:
            model = self.peft.merge_and_unload()
            self.masks.apply()
        return model.eval()

    def _record(self, measurement: Measurement) -> bool:
        """Keep a measurement; with ``patience``, track the best weights. Whether to stop."""
        self.measurements.append(measurement)
        if self.config.patience is None:
            return False
        if self.best is None or measurement.ppl < self.best[1]:
            weights = {n: p.detach().cpu().clone() for n, p in zip(self.names, self.trainable)}
            self.best, self.stale = (measurement.step, measurement.ppl, weights), 0
            return False
        self.stale += 1
        return self.stale >= self.config.patience

    def _keep_best(self) -> None:
        with torch.no_grad():
            for name, parameter in zip(self.names, self.trainable):
                parameter.copy_(self.best[2][name])


def peak_memory(device: torch.device) -> int:
    """Peak memory of this process in bytes: the device's allocations on a GPU, resident memory
    on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _with_lora(model: PreTrainedModel, config: HealConfig, adapter: ArchitectureAdapter):
    """LoRA adapters (PEFT) on every decoder linear layer the model has; the rest frozen."""
    from peft import LoraConfig, get_peft_model

    settings = LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=0.0, bias="none",
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in adapter.linear_names}),
    )
    return get_peft_model(model, settings)
