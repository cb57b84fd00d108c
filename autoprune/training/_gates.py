"""Learned structure: hard-concrete gates on heads, KV groups, FFN channels, sub-blocks and blocks.

Each unit of a LLaMA-family model that a sub-network can remove gets a gate ``z`` in [0, 1] drawn
from a hard-concrete distribution (Louizos et al., 2018, as CoFi, Sheared-LLaMA and Compresso use
it): query heads (grouped by KV group, so the result stays GQA-consistent), KV groups, FFN
channels, attention and MLP sub-blocks and whole blocks. A head's output (the ``o_proj`` input
columns of that head) is multiplied by its gate, its group's, its attention sub-block's and its
block's; an FFN channel's (the ``down_proj`` input) by its own, its MLP's and its block's. The gates
train with the weights on the healing loss, and a Lagrangian (Sheared-LLaMA) drives the expected
cost (decoder linear weights kept, or the prefill the latency table prices) to the target, which
comes down from the dense cost over the first steps (its target warm-up): ``lambda (c - t)^2``, the
multiplier trained by gradient ascent. Sheared-LLaMA's linear term ``lambda_1 (c - t)`` is left
out: its multiplier grows while the cost lags the target and keeps pushing after it has passed
(SmolLM2's gates overshot a 75% target to 57%); the quadratic pulls from both sides. Head and FFN
channel gates may start apart, by importance scores (:meth:`StructureGates.warm_start`).

At the end the gates are made hard (:meth:`StructureGates.read_off`): each unit scores its
probability of staying open (times those above it), and from the whole model blocks are narrowed one move
at a time (a query head fewer in every kept group of a block, its weakest KV group fewer, or its
weakest FFN channel fewer: the moves that keep it GQA-consistent), always the move that loses the
least kept score per unit of cost saved, until the cost is within the target; the last move is at
most one head pair or one channel, so the cost lands within one FFN channel of the target where
channels remain. The kept units' gate values are folded into
``o_proj`` / ``down_proj`` before the model is cut, so the cut model computes what the gated model
did on what it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from autoprune.models import LlamaFamilyAdapter
from autoprune.structure import BlockCut, BlockShape, BlockWidths, ModelDims, Structure
from autoprune.training._config import GateSettings

#: Hard-concrete temperature and stretch (Louizos et al.).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
_EPS = 1e-6


@dataclass(frozen=True)
class UnitCosts:
    """What each unit costs, in the budget's terms: a linear model over the counts of blocks,
    attention and MLP sub-blocks, query heads, KV groups and FFN channels (decoder linear weights,
    or milliseconds of prefill from the latency table)."""

    constant: float
    block: float
    attention: float
    head: float
    kv_group: float
    mlp: float
    ffn_channel: float

    @classmethod
    def of_weights(cls, dims: ModelDims) -> UnitCosts:
        """Decoder linear weights: a query head is its q rows and o columns, a KV group its k and v
        rows, a channel its gate, up and down weights."""
        per_head = 2 * dims.head_dim * dims.hidden
        return cls(0.0, 0.0, 0.0, per_head, per_head, 0.0, 3 * dims.hidden)

    def dense(self, dims: ModelDims) -> float:
        shape = BlockShape(dims.num_kv_heads, dims.heads_per_group, dims.ffn)
        return self.constant + dims.num_blocks * self.of_block(shape)

    def of_block(self, shape: BlockShape | None) -> float:
        if shape is None or (shape.heads == 0 and shape.ffn == 0):
            return 0.0
        attention = (self.attention + shape.heads * self.head + shape.kv_groups * self.kv_group) if shape.heads else 0.0
        mlp = (self.mlp + shape.ffn * self.ffn_channel) if shape.ffn else 0.0
        return self.block + attention + mlp


def hard_concrete(log_alpha: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """A gate per ``log_alpha``: drawn (``sample``, from ``generator``, a CPU one) or its
    deterministic value."""
    if sample:
        u = torch.rand(log_alpha.shape, generator=generator).to(log_alpha).clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate > 0): the expected L0 of the gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class StructureGates(nn.Module):
    """The gates of one model, hooked into it; a :class:`autoprune.training.Regularizer`. A step's
    draws depend on ``seed`` and the step alone, so a resumed run and every data-parallel worker
    draw what an uninterrupted single process does."""

    def __init__(
        self, model: PreTrainedModel, dims: ModelDims, kept: float, costs: UnitCosts,
        settings: GateSettings | None = None, ramp_steps: int = 0, seed: int = 0,
    ) -> None:
        super().__init__()
        self.dims, self.kept, self.costs, self.seed = dims, kept, costs, seed
        self.settings = settings or GateSettings()
        self.ramp_steps = ramp_steps
        #: The cost the penalty pulls towards at this step: from the dense cost down to ``kept``
        #: over the first ``ramp_steps`` steps (Sheared-LLaMA's target warm-up), then ``kept``.
        self.target = kept if ramp_steps <= 0 else 1.0
        init = self.settings.init
        blocks = dims.num_blocks
        self.heads = nn.Parameter(torch.full((blocks, dims.num_heads), init))
        self.groups = nn.Parameter(torch.full((blocks, dims.num_kv_heads), init))
        self.ffn = nn.Parameter(torch.full((blocks, dims.ffn), init))
        self.attention = nn.Parameter(torch.full((blocks,), init))
        self.mlp = nn.Parameter(torch.full((blocks,), init))
        self.block = nn.Parameter(torch.full((blocks,), init))
        self.lambdas = nn.Parameter(torch.zeros(1))
        self._gates: dict[str, torch.Tensor] = {}
        self._dense_cost = costs.dense(dims)
        adapter = LlamaFamilyAdapter()
        self._hooks = []
        for index in range(blocks):
            o_proj = model.get_submodule(adapter.layer_name(index, "self_attn.o_proj"))
            down = model.get_submodule(adapter.layer_name(index, "mlp.down_proj"))
            self._hooks.append(o_proj.register_forward_pre_hook(self._gate_hook(index, "head")))
            self._hooks.append(down.register_forward_pre_hook(self._gate_hook(index, "channel")))
        self._gates = self._deterministic()

    def _deterministic(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: hard_concrete(p, False) for name, p in self._unit_parameters().items()}

    def _unit_parameters(self) -> dict[str, nn.Parameter]:
        return {"heads": self.heads, "groups": self.groups, "ffn": self.ffn,
                "attention": self.attention, "mlp": self.mlp, "block": self.block}

    @torch.no_grad()
    def warm_start(self, head_scores: torch.Tensor, ffn_scores: torch.Tensor, spread: float) -> None:
        """Start the query heads' and FFN channels' gates from importance scores ((blocks, heads)
        and (blocks, ffn), e.g. the calibration statistics'): each log-alpha is the initial value
        plus ``spread`` times its unit's standardised log-score across the model, so the penalty
        closes the least important units first and a short budget reads off about what the
        statistics would cut, where equal gates would read off what little training told apart."""
        for param, scores in ((self.heads, head_scores), (self.ffn, ffn_scores)):
            logs = scores.double().clamp_min(1e-30).log()
            spread_of = logs.std()
            z = (logs - logs.mean()) / spread_of if spread_of > 0 else torch.zeros_like(logs)
            param.add_((spread * z).to(param))

    # -- the Regularizer protocol -------------------------------------------------------------------

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        units = self._unit_parameters()
        return [
            {"params": list(units.values()), "names": [f"gates.{n}" for n in units],
             "lr_scale": self.settings.gate_lr / lr, "weight_decay": 0.0},
            {"params": [self.lambdas], "names": ["gates.lambdas"], "lr_scale": self.settings.lambda_lr / lr,
             "weight_decay": 0.0, "maximize": True},
        ]

    def sample(self, step: int) -> None:
        """Gates drawn for step ``step``'s forward pass, and the step's target."""
        if self.ramp_steps > 0:
            self.target = 1.0 - (1.0 - self.kept) * min(1.0, (step + 1) / self.ramp_steps)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self._gates = {name: hard_concrete(p, True, generator) for name, p in self._unit_parameters().items()}

    def penalty(self) -> torch.Tensor:
        gap = self.expected_cost() / self._dense_cost - self.target
        return self.lambdas[0] * gap**2

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        drawn = self._gates
        self._gates = self._deterministic()
        try:
            yield
        finally:
            self._gates = drawn

    def summary(self) -> dict[str, float]:
        with torch.no_grad():
            return {"kept": float(self.expected_cost() / self._dense_cost), "target": self.target,
                    "lambda": float(self.lambdas[0])}

    # -- gating ---------------------------------------------------------------------------------------

    def head_mask(self, index: int, gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Each query head's factor in block ``index``: its gate, its group's, its attention's and
        its block's."""
        gates = gates or self._gates
        groups = gates["groups"][index].repeat_interleave(self.dims.heads_per_group)
        return gates["heads"][index] * groups * gates["attention"][index] * gates["block"][index]

    def channel_mask(self, index: int, gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Each FFN channel's factor in block ``index``."""
        gates = gates or self._gates
        return gates["ffn"][index] * gates["mlp"][index] * gates["block"][index]

    def _gate_hook(self, index: int, kind: str):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if kind == "head":
                mask = self.head_mask(index).repeat_interleave(self.dims.head_dim)
            else:
                mask = self.channel_mask(index)
            return (x * mask.to(x.dtype), *args[1:])

        return hook

    def expected_cost(self) -> torch.Tensor:
        """The cost of the model the gates make, in expectation (gates independent)."""
        c, dims = self.costs, self.dims
        p = {name: keep_probability(param) for name, param in self._unit_parameters().items()}
        heads = p["heads"].view(dims.num_blocks, dims.num_kv_heads, dims.heads_per_group).sum(-1)
        attention = p["attention"] * (c.attention + (p["groups"] * (c.kv_group + c.head * heads)).sum(-1))
        mlp = p["mlp"] * (c.mlp + c.ffn_channel * p["ffn"].sum(-1))
        return c.constant + (p["block"] * (c.block + attention + mlp)).sum()

    # -- making the gates hard --------------------------------------------------------------------

    @torch.no_grad()
    def read_off(self, kept: float | None = None) -> tuple[list[BlockCut], Structure, list[int]]:
        """The structure whose cost is at most ``kept`` (default: the target) of the dense cost, and
        within one FFN channel of it where channels are left: the cuts, the plan's structure
        (method ``learned``, no correction) and the removed blocks."""
        budget = (self.kept if kept is None else kept) * self._dense_cost
        # Ranked by how likely each gate is to stay open: the deterministic gates clamp at 1, so
        # units that training kept on would tie, however far their log-alphas are apart.
        gates = {name: keep_probability(p) for name, p in self._unit_parameters().items()}
        dims = self.dims
        blocks = [
            _BlockUnits(
                self.head_mask(b, gates).cpu().numpy(),
                (gates["groups"][b] * gates["attention"][b] * gates["block"][b]).cpu().numpy(),
                self.channel_mask(b, gates).cpu().numpy(), dims, self.costs,
            )
            for b in range(dims.num_blocks)
        ]
        cost = self.costs.constant + sum(block.cost() for block in blocks)
        while cost > budget:
            moves = [(move.loss / move.saved, index, move) for index, block in enumerate(blocks)
                     for move in block.moves() if move.saved > 0]
            if not moves:
                break
            _, index, move = min(moves, key=lambda entry: (entry[0], entry[1]))
            cost -= blocks[index].apply(move)
        while True:  # the last move may have saved more than needed: give back the best channels
            growable = [(block.next_channel_score(), index) for index, block in enumerate(blocks)
                        if 0 < block.ffn < dims.ffn]
            if not growable or budget - cost < self.costs.ffn_channel:
                break
            _, index = max(growable)
            blocks[index].ffn += 1
            cost += self.costs.ffn_channel
        return _cuts(blocks, dims)
    @torch.no_grad()
    def fold(self, model: PreTrainedModel) -> None:
        """Multiply the deterministic gates into ``o_proj`` / ``down_proj`` columns, so the model
        without hooks computes what the gated model does."""
        gates = {name: hard_concrete(p, False) for name, p in self._unit_parameters().items()}
        adapter = LlamaFamilyAdapter()
        for index in range(self.dims.num_blocks):
            o_proj = model.get_submodule(adapter.layer_name(index, "self_attn.o_proj")).weight
            down = model.get_submodule(adapter.layer_name(index, "mlp.down_proj")).weight
            o_proj.mul_(self.head_mask(index, gates).repeat_interleave(self.dims.head_dim).to(o_proj))
            down.mul_(self.channel_mask(index, gates).to(down))

    def remove(self) -> None:
        """Take the hooks out of the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


@dataclass(frozen=True)
class _Move:
    """One step down in a block's width: fewer heads per kept group, one group fewer, or one FFN
    channel fewer; what it gives up (kept score times cost) and saves (cost)."""

    kind: str
    loss: float
    saved: float


class _BlockUnits:
    """One block's kept units, narrowed one move at a time, lowest loss per saved cost first."""

    def __init__(self, heads: np.ndarray, groups: np.ndarray, channels: np.ndarray, dims: ModelDims,
                 costs: UnitCosts) -> None:
        self.costs, self.dims = costs, dims
        self.heads = heads.reshape(dims.num_kv_heads, dims.heads_per_group)
        self.group_scores = groups
        self.head_order = np.argsort(-self.heads, axis=1, kind="stable")  # best head first, per group
        self.groups = sorted(range(dims.num_kv_heads), key=lambda g: -self._group_value(g, dims.heads_per_group))
        self.per_group = dims.heads_per_group
        self.channel_order = list(np.argsort(-channels, kind="stable"))
        self.channels = channels
        self.ffn = dims.ffn

    def _group_value(self, group: int, per_group: int) -> float:
        top = self.heads[group][self.head_order[group][:per_group]]
        return float(top.sum() * self.costs.head + self.group_scores[group] * self.costs.kv_group)

    def shape(self) -> BlockShape:
        groups = len(self.groups) if self.per_group else 0
        return BlockShape(groups, self.per_group if groups else 0, self.ffn)

    def cost(self) -> float:
        return self.costs.of_block(self.shape())

    def moves(self) -> list[_Move]:
        c, moves = self.costs, []
        before = self.cost()
        if self.groups and self.per_group:
            if self.per_group > 1:
                lost = sum(float(self.heads[g][self.head_order[g][self.per_group - 1]]) for g in self.groups)
                moves.append(_Move("head", lost * c.head, before - self._cost_with(per_group=self.per_group - 1)))
            last = self.groups[-1]
            groups = len(self.groups) - 1
            moves.append(_Move("group", self._group_value(last, self.per_group),
                               before - self._cost_with(groups=groups)))
        if self.ffn:
            channel = self.channel_order[self.ffn - 1]
            moves.append(_Move("channel", float(self.channels[channel]) * c.ffn_channel,
                               before - self._cost_with(ffn=self.ffn - 1)))
        return moves

    def _cost_with(self, groups: int | None = None, per_group: int | None = None, ffn: int | None = None) -> float:
        groups = len(self.groups) if groups is None else groups
        per_group = self.per_group if per_group is None else per_group
        heads = groups and per_group
        shape = BlockShape(groups if heads else 0, per_group if heads else 0, self.ffn if ffn is None else ffn)
        return self.costs.of_block(shape)

    def apply(self, move: _Move) -> float:
        """Narrow the block by ``move``; the cost it saved."""
        if move.kind == "head":
            self.per_group -= 1
        elif move.kind == "group":
            self.groups.pop()
        else:
            self.ffn -= 1
        return move.saved

    def next_channel_score(self) -> float:
        """The score of the best channel the block has let go."""
        return float(self.channels[self.channel_order[self.ffn]])

    def kept_heads(self) -> list[int]:
        shape = self.shape()
        return sorted(
            int(g * self.dims.heads_per_group + h)
            for g in self.groups[: shape.kv_groups] for h in self.head_order[g][: shape.heads_per_group]
        )


def _cuts(blocks: list[_BlockUnits], dims: ModelDims) -> tuple[list[BlockCut], Structure, list[int]]:
    cuts, widths, removed = [], {}, []
    for index, block in enumerate(blocks):
        shape = block.shape()
        if shape.heads == 0 and shape.ffn == 0:
            removed.append(index)
            continue
        channels = sorted(int(c) for c in block.channel_order[: shape.ffn])
        cuts.append(BlockCut(index, shape, block.kept_heads(), channels))
        widths[index] = BlockWidths(
            kv_groups=shape.kv_groups or None, heads_per_group=shape.heads_per_group or None,
            ffn=shape.ffn or None, drop_attention=shape.heads == 0, drop_mlp=shape.ffn == 0,
        )
    return cuts, Structure(method="learned", correct=False, blocks=widths), removed
