"""Learning a sub-network: gates trained with the weights, then the cut model healed.

Compresso and Sheared-LLaMA decide what to remove while training rather than from calibration
statistics once. :func:`learn_structure` does it on the healing machinery: the first
``learn_share`` of the token budget trains the dense model's weights together with hard-concrete
gates on its heads, KV groups, FFN channels, sub-blocks and blocks (:mod:`autoprune.training._gates`)
toward the teacher, the Lagrangian driving the expected cost to the target; then the gates are
made hard, folded into the weights, the model is cut to the structure they chose (a plan v2
structure of per-block widths, method ``learned``), and the rest of the budget heals the cut model
with its structure fixed, as Compresso trains on once its masks are fixed. The total is the
budget, so a learned structure and a cut-then-heal one compare at equal tokens. Both phases run
in this process (CPU threads or one GPU) or data-parallel on Ray Train workers, each of which
builds the gates on its copy of the model from a :class:`GatesRecipe`.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel

from autoprune.calibration import CalibrationStats
from autoprune.errors import AutopruneError
from autoprune.latency import LatencyTable
from autoprune.models import LoadedModel, compute_device
from autoprune.plan import Plan
from autoprune.structure import ModelDims, build_subnet, model_dims, unit_scores
from autoprune.training._checkpoints import FolderCheckpoints
from autoprune.training._config import GateSettings, HealConfig
from autoprune.training._data import HealData
from autoprune.training._gates import StructureGates, UnitCosts
from autoprune.training._heal import RayWorkers, heal
from autoprune.training._loop import Healer, HealResult

Budget = Literal["params", "latency"]


@dataclass
class LearnedStructure:
    """A learned sub-network: its plan (structure and removed blocks), the healed cut model, and
    what each phase measured."""

    plan: Plan
    model: PreTrainedModel
    gates: HealResult
    heal: HealResult
    #: The gates' expected cost at the end of their phase and the cut's, as fractions of the dense one.
    expected_kept: float
    kept: float

    def record(self) -> dict:
        return {
            "expected_kept": self.expected_kept,
            "kept": self.kept,
            "gates": self.gates.as_dict(),
            "heal": self.heal.as_dict(),
        }


def unit_costs(budget: Budget, dense: PreTrainedModel, latency: LatencyTable | None) -> UnitCosts:
    """What the target counts: decoder linear weights, or prefill priced by ``latency``."""
    dims = model_dims(dense)
    if budget == "params":
        return UnitCosts.of_weights(dims)
    if latency is None:
        raise AutopruneError("a latency budget needs the device's latency table")
    c = {name: timing.prefill_ms for name, timing in latency.coefficients().items()}
    return UnitCosts(c["fixed"], c["blocks"], c["attention"], c["heads"], c["kv_heads"], c["mlp"], c["ffn"])


def unit_importance(model: PreTrainedModel, stats: CalibrationStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's and FFN channel's importance, (blocks, heads) and (blocks, ffn): the
    statistics' :func:`unit_scores`, what the gates warm-start from."""
    heads, ffn = zip(*unit_scores(model, stats))
    return torch.stack(heads), torch.stack(ffn)


@dataclass(frozen=True)
class GatesRecipe:
    """How to put the gates on a model: what the phase's :class:`StructureGates` is built from,
    small and picklable, so every Ray Train worker builds the same gates on its own student."""

    dims: ModelDims
    kept: float
    costs: UnitCosts
    settings: GateSettings
    ramp_steps: int
    seed: int
    #: Head and FFN channel importance to warm-start from (``settings.warm_start`` > 0).
    importance: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, model: PreTrainedModel) -> StructureGates:
        gates = StructureGates(model, self.dims, self.kept, self.costs, self.settings, self.ramp_steps, self.seed)
        if self.importance is not None:
            gates.warm_start(*self.importance, self.settings.warm_start)
        return gates


def learn_structure(
    teacher: LoadedModel,
    source: str,
    target: float,
    config: HealConfig,
    learn_share: float = 0.5,
    budget: Budget = "params",
    latency: LatencyTable | None = None,
    device: str = "cpu",
    checkpoints: Path | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    stats: CalibrationStats | None = None,
    gate_settings: GateSettings | None = None,
    workers: RayWorkers | None = None,
) -> LearnedStructure:
    """Learn a sub-network of ``teacher``'s model with ``1 - target`` of its cost (decoder linear
    weights, or prefill), spending ``config.tokens`` in all (``learn_share`` of them on the gates),
    and heal it. ``checkpoints`` (a folder) makes both phases resumable. With the dense model's
    calibration ``stats``, the head and channel gates start from the statistics' importance
    (``gate_settings.warm_start``; 0: all equal) and the cut corrects ``o_proj`` / ``down_proj`` by least
    squares on the units it keeps, as statistics-chosen cuts are. With ``workers`` both phases run
    on Ray Train (their checkpoints Ray Train's, under ``workers.name`` and the phase)."""
    if not 0.0 < target < 1.0:
        raise AutopruneError(f"the target must lie in (0, 1), got {target}")
    if not 0.0 < learn_share < 1.0:
        raise AutopruneError(f"the share of tokens spent on the gates must lie in (0, 1), got {learn_share}")
    dims = model_dims(teacher.model)  # a model outside the LLaMA family: one line, before any work
    steps = config.steps
    learn_steps = max(1, round(steps * learn_share))
    if learn_steps >= steps:
        raise AutopruneError(f"a budget of {config.tokens} tokens ({steps} steps) leaves none to heal the cut model")
    per_step = config.tokens_per_step
    learning = config.model_copy(update={"tokens": learn_steps * per_step})
    healing = config.model_copy(update={"tokens": (steps - learn_steps) * per_step})
    student = copy.deepcopy(teacher.model)
    costs = unit_costs(budget, student, latency)
    # the target comes down over the first half of the gates' steps (see StructureGates)
    settings = gate_settings or GateSettings()
    if stats is None:  # nothing to start apart from
        settings = settings.model_copy(update={"warm_start": 0.0})
    importance = unit_importance(teacher.model, stats) if settings.warm_start > 0 else None
    recipe = GatesRecipe(dims, 1.0 - target, costs, settings, learn_steps // 2, config.seed, importance)
    data = HealData.from_source(source, teacher, config.seq_len, config.validation_windows, config.tokens,
                                cache_dir, progress)
    # what the phases' states belong to
    identity = f"learned {teacher.spec} {target} {budget} {learn_share} {settings.digest()}"
    if workers is not None:
        run = hashlib.sha256(identity.encode()).hexdigest()[:12]
        student, learned, state = replace(workers, name=f"{workers.name}-gates-{run}").train(
            student, teacher.model, data, learning, progress, regularizer=recipe
        )
        gates = recipe(student)
        gates.load_state_dict(state)
        workers = replace(workers, name=f"{workers.name}-heal-{run}")
    else:
        gates = recipe(student)
        healer = Healer(student, teacher.model, data, learning, compute_device(device), regularizer=gates)
        saved = FolderCheckpoints(checkpoints / "gates", identity) if checkpoints is not None else None
        learned = healer.run(saved, progress)
        student = healer.finished_model()  # LoRA adapters merged: the weights the gates fold into
    expected = float(gates.summary()["kept"])
    cuts, structure, removed = gates.read_off()
    gates.fold(student)
    gates.remove()
    structure = structure.model_copy(update={"correct": stats is not None})
    cut = build_subnet(student.cpu(), stats, structure, removed, cuts=cuts)
    dense_cost = costs.dense(dims)
    kept = (costs.constant + sum(costs.of_block(c.shape) for c in cuts)) / dense_cost
    saved = FolderCheckpoints(checkpoints / "heal", identity) if checkpoints is not None else None
    healed, result = heal(cut, teacher, data, healing, device, saved, progress, ray=workers)
    return LearnedStructure(Plan(structure=structure, removed_blocks=removed), healed, learned, result,
                            expected, kept)
