"""``HealConfig``: what a heal is asked to do, validated once (every field is also a flag); and
``GateSettings``, how learned structure's gates train.

The fields are the ones that decide the healed weights (budget, batch, schedule, loss, what is
trained); where the work runs (threads, a GPU, Ray workers) and where checkpoints go are arguments
of :func:`autoprune.training.heal`, not settings, because they do not change what is learned. A
checkpoint records the settings it was made with, and a resume with other settings is refused.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Settings(BaseModel):
    """Settings validated once, unknown keys refused, named by a digest of their values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Names these settings in checkpoints and records (a resume with other settings is refused)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class LoraSettings(_Settings):
    """Low-rank adapters (PEFT) on the decoder linear layers instead of training every weight."""

    rank: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0


class HealConfig(_Settings):
    """One heal: the student trained toward the teacher's next-token distribution.

    The loss is ``(1 - ce_weight) * T^2 * KL(teacher_T || student_T) + ce_weight * CE`` per
    position (``T`` the temperature; CE the next-token cross-entropy on the data), averaged over a
    batch of ``batch_size`` windows of ``seq_len`` tokens; AdamW with a linear warm-up over
    ``warmup`` of the steps and a cosine decay to ``min_lr_ratio`` times ``lr``."""

    tokens: Annotated[int, Field(ge=1)] = Field(
        200_000, description="training budget in tokens (steps = tokens / (batch_size x seq_len))"
    )
    seq_len: Annotated[int, Field(ge=2)] = Field(256, description="tokens per training window")
    batch_size: Annotated[int, Field(ge=1)] = Field(8, description="windows per optimizer step")
    lr: Annotated[float, Field(gt=0)] = Field(1e-4, description="peak learning rate")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="the cosine decay ends at this fraction of lr"
    )
    warmup: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.05, description="fraction of the steps spent warming the learning rate up from 0"
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    grad_clip: Annotated[float, Field(gt=0)] | None = Field(
        1.0, description="clip the gradient norm to this (null: no clipping)"
    )
    temperature: Annotated[float, Field(gt=0)] = Field(1.0, description="distillation temperature")
    ce_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="share of next-token cross-entropy mixed into the KL loss"
    )
    lora: LoraSettings | None = Field(
        None, description="train LoRA adapters (merged when saved) instead of every kept weight"
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16: matrix products in bfloat16 (autocast; weights and optimizer "
        "stay float32), the teacher held in bfloat16; fp32: everything in float32"
    )
    chunk: Annotated[int, Field(ge=1)] = Field(
        1024, description="positions whose logits are computed at once by the loss"
    )
    validation_windows: Annotated[int, Field(ge=1)] = Field(
        8, description="held-out windows (never trained on) measured during the heal"
    )
    evaluations: Annotated[int, Field(ge=0)] = Field(
        4, description="times the held-out windows are measured during the heal (and at its end)"
    )
    patience: Annotated[int, Field(ge=1)] | None = Field(
        None, description="stop after this many measurements without improvement, keeping the best "
        "weights (null: train the whole budget)"
    )
    checkpoint_every: Annotated[int, Field(ge=1)] = Field(
        25, description="steps between checkpoints (with a checkpoint folder)"
    )
    seed: int = Field(0, description="seed of the training windows' order")

    @model_validator(mode="after")
    def _whole_steps(self) -> HealConfig:
        if self.tokens < self.batch_size * self.seq_len:
            raise ValueError(
                f"tokens ({self.tokens}) is less than one step of {self.batch_size} x {self.seq_len}"
            )
        return self

    @property
    def steps(self) -> int:
        """Optimizer steps the budget buys (the last partial batch is not taken)."""
        return self.tokens // (self.batch_size * self.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def evaluation_steps(self) -> list[int]:
        """Steps after which the held-out windows are measured: evenly spread, and the last."""
        count = min(self.evaluations, self.steps)
        marks = {math.ceil(self.steps * (i + 1) / count) for i in range(count)} if count else set()
        return sorted(marks | {self.steps})

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        warm = math.ceil(self.warmup * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


class GateSettings(_Settings):
    """How the gates train. Their learning rates are fixed multiples of the schedule's (they warm
    up and decay with the weights'), so the gates must move far enough within the gates' share of
    the steps for the expected cost to reach the target before the read-off."""

    #: The log-alphas' learning rate at the schedule's peak.
    gate_lr: float = Field(0.2, gt=0)
    #: The Lagrange multiplier's (gradient ascent).
    lambda_lr: float = Field(5.0, gt=0)
    #: Every log-alpha's start (2.5: a deterministic gate of 1, P(open) 0.98).
    init: float = 2.5
    #: How far apart the head and channel gates start: this many per standard deviation of the
    #: statistics' log-importance (:meth:`autoprune.training.StructureGates.warm_start`); 0 starts them equal.
    warm_start: float = Field(1.0, ge=0)
