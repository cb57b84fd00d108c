"""A search's last stage: refine chosen front members, so that the front ``autoprune search`` prints
and exports is the best the project knows how to make, without a hand-run chain of commands.

Search trials must be cheap, so they prune with a fast method on allocations a sampler can learn;
per-layer refinement with a costlier method (ADMM) then moves each chosen member further than any
number of extra trials would (``experiments/README.md``, ``refine_front.py``). ``refine_targets``
names the sizes a user wants: for each, the parent is the searched front member (refinements left
out) with the fewest non-zeros at or below the target's, the member a user asking for that size
would export, and ``autoprune refine`` runs on it with the search's own database, device and
thread settings. For the targets in ``refine_sequential`` the result is also measured pruned block
after block from the already-pruned model's inputs, which a trial cannot afford (a calibration
pass) and which pays most at high sparsity, where the errors of earlier blocks compound; ``export``
then writes that variant where it measured better. Each result is a trial of the study, so
``front`` and ``export`` see it; running the search again finds it instead of refining again, and a
refinement that was stopped goes on from its last generation.

Then ``heal_targets`` heals the member a user asking for each of those sizes would export (the
front member at or above it, refinements included) with :mod:`autoprune.training`: the study
records the healed perplexity and keeps the weights (:mod:`autoprune.study._heal`), so ``front``
shows it and ``export`` writes it. With ``heal_select`` above 1 the member is chosen by training
instead: the best candidates of that size by one-shot quality are healed briefly and re-ranked in
stages (:mod:`autoprune.study._heal_select`), and the winner gets the full heal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field

from autoprune.plan import MethodName
from autoprune.study._heal import HealedMember, StudyHealer, artifact_store
from autoprune.study._heal_select import select_by_healing, selection_candidates, within_latency
from autoprune.study._records import member_at
from autoprune.study._storage import load_existing_study
from autoprune.study.refine import FINALISTS, RefineConfig, RefineSummary, refine_trial
from autoprune.training import HealConfig
from search_spaces import MAX_LAYER_SPARSITY

if TYPE_CHECKING:
    from autoprune.study._config import SearchConfig


#: What a search finishes with unless its config says otherwise: the main job's choices
#: (``configs/smollm2-default.yaml``), so a search started from flags alone ends as ``make search``
#: does. Targets outside the search's range are left out; searches of other spaces and on a Ray
#: cluster refine nothing unless told (see ``SearchConfig``).
DEFAULT_REFINE_TARGETS = (0.6, 0.7)
DEFAULT_REFINE_METHOD: MethodName = "admm"
DEFAULT_REFINE_SEQUENTIAL = (0.7,)
#: Held-out windows a study's heal watches while it trains (the healed member is then measured on
#: the study's own validation windows, as its trials are).
STUDY_HEAL_WINDOWS = 4


class FinishFields(BaseModel):
    """The ``refine_*`` keys of a search config (flat, so each is a flag)."""

    refine_targets: list[Annotated[float, Field(ge=0.0, le=MAX_LAYER_SPARSITY)]] | None = Field(
        None,
        description="after the trials, refine the front member nearest each of these sparsities "
        "(at or above it) and add the result to the study (default: those of 0.6 and 0.7 inside "
        "sparsity_range, for in-process searches of unstructured spaces; the flag without a value "
        "or [] in YAML: none)",
    )
    refine_method: MethodName | None = Field(
        DEFAULT_REFINE_METHOD,
        description="prune the refined allocations with this method (default: admm; null in YAML: "
        "the study's own)",
    )
    refine_generations: Annotated[int, Field(ge=1)] = Field(9, description="generations per refinement")
    refine_offspring: Annotated[int, Field(ge=FINALISTS)] = Field(8, description="candidates per generation")
    refine_select_windows: Annotated[int, Field(ge=1)] = Field(
        2, description="whole windows the finalists and the parent are compared on each generation"
    )
    refine_sequential: list[float] | None = Field(
        None,
        description="of refine_targets, those whose refined member is also measured pruned block "
        "after block (`export --sequential`, a calibration pass each); export writes that variant "
        "where it is better (default: 0.7 where it is a target)",
    )

    heal_targets: list[Annotated[float, Field(ge=0.0, le=MAX_LAYER_SPARSITY)]] = Field(
        default_factory=list,
        description="last, heal the member at each of these sparsities (the front member at or "
        "above it) by distillation from the dense model, recording ppl_healed and keeping the "
        "weights for export",
    )
    heal_tokens: Annotated[int, Field(ge=1)] = Field(200_000, description="tokens of each heal")
    heal_lr: Annotated[float, Field(gt=0)] = Field(1e-4, description="peak learning rate of the heals")
    heal_seq_len: Annotated[int, Field(ge=2)] = Field(256, description="tokens per training window of the heals")
    heal_batch_size: Annotated[int, Field(ge=1)] = Field(8, description="windows per step of the heals")
    heal_data: str | None = Field(
        None, description="text the heals train on: PATH, wikitext2 or self (default: the study's data)"
    )
    heal_select: Annotated[int, Field(ge=1)] = Field(
        8, description="candidates of each heal target ranked by short heals before the full one "
        "(1: heal the front member without selection)",
    )
    heal_select_tokens: Annotated[int, Field(ge=1)] = Field(
        8_192, description="tokens of the first selection stage (each next stage twice as many)"
    )
    heal_select_width: Annotated[float, Field(ge=0.0)] = Field(
        0.02, description="candidates lie within this much sparsity above the target"
    )
    heal_max_latency: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="heal only members whose predicted prefill is at most this fraction of "
        "the dense model's (studies that price latency)",
    )
    learn_targets: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=list,
        description="last, learn a sub-network at each of these targets (gates trained with the "
        "weights, then the cut healed, heal_tokens in all) and add it to the study beside the "
        "cut-then-heal member (sub-network studies of LLaMA-family models)",
    )
    learn_budget: Literal["params", "latency"] = Field(
        "params", description="what learn_targets count: decoder linear weights or priced prefill"
    )
    learn_share: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.5, description="share of a learned structure's tokens spent training its gates"
    )
    artifact_store: str | None = Field(
        None, description="folder for healed weights (default: beside a SQLite or journal-file study)"
    )

    def heal_config(self, tokens: int) -> HealConfig:
        """The settings of one of the search's heals."""
        return HealConfig(tokens=tokens, lr=self.heal_lr, seq_len=self.heal_seq_len,
                          batch_size=self.heal_batch_size, validation_windows=STUDY_HEAL_WINDOWS)

    def fill_finish_defaults(self, bounds: tuple[float, float], unstructured: bool, by_default: bool) -> None:
        """Give the keys a config left unset the main job's values where they apply: for a space
        of ``unstructured`` allocations, its method, its targets inside ``bounds`` (where the
        search refines ``by_default``) and, of the targets, its block-after-block one; for other
        spaces (blocks removed, N:M patterns, widths) no refinement unless asked and no other
        method. Keys that were set stay as set, to be checked as they are."""
        if self.refine_targets is None:
            low, high = bounds
            defaults = [t for t in DEFAULT_REFINE_TARGETS if low <= t <= high]
            self.refine_targets = defaults if unstructured and by_default else []
        if self.refine_sequential is None:
            defaults = [t for t in DEFAULT_REFINE_SEQUENTIAL if t in self.refine_targets]
            self.refine_sequential = defaults if unstructured else []
        if not unstructured and "refine_method" not in self.model_fields_set:
            self.refine_method = None


def refine_front(config: SearchConfig, progress: bool = False) -> tuple[list[RefineSummary], list[float]]:
    """Refine the parent of each of ``config.refine_targets`` (a parent chosen by two targets
    once). Returns the refinements and the targets no front member was sparse enough for."""
    study = load_existing_study(config.storage, config.study)
    trials = study.get_trials(deepcopy=False)
    summaries: list[RefineSummary] = []
    missed: list[float] = []
    done: set[int] = set()
    parents = {target: member_at(trials, target, searched_only=True) for target in config.refine_targets}
    sequential = {parents[target].number for target in config.refine_sequential if parents[target] is not None}
    for target, parent in parents.items():
        if parent is None:
            missed.append(target)
            continue
        if parent.number in done:
            continue
        done.add(parent.number)
        settings = refine_config(config, parent.number, parent.number in sequential)
        summaries.append(refine_trial(settings, progress))
    return summaries, missed


def refine_config(config: SearchConfig, trial: int, sequential: bool = False) -> RefineConfig:
    """The ``autoprune refine`` settings of one finishing refinement of a search's ``trial``
    (``sequential``: also measure the result as ``export --sequential`` makes it)."""
    search = config.model_dump()
    return RefineConfig(
        trial=trial,
        generations=config.refine_generations,
        offspring=config.refine_offspring,
        select_windows=config.refine_select_windows,
        method=config.refine_method,
        measure_sequential=sequential,
        **{key: search[key] for key in _SHARED},
    )


#: The search settings a finishing refinement runs with unchanged.
_SHARED = (
    "storage", "study", "seed", "cache_dir", "threads", "device", "eval_batch",
    "database", "database_dir", "database_grid",
)


def heal_front(config: SearchConfig, progress: bool = False) -> tuple[list[HealedMember], list[float]]:
    """Heal the member at each of ``config.heal_targets`` (chosen by training where
    ``heal_select`` > 1), then learn a structure at each of ``config.learn_targets``. Returns the
    healed and learned members and the heal targets no trial was sparse enough for."""
    if not config.heal_targets and not config.learn_targets:
        return [], []
    study = load_existing_study(config.storage, config.study)
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    healer = StudyHealer(study, config.worker_spec(), config.heal_data,
                         artifact_store(config.storage, config.artifact_store), cache_dir, progress)
    healed = _heal_targets(config, study, healer) if config.heal_targets else ([], [])
    learned = [healer.learn(target, config.heal_config(config.heal_tokens), config.learn_share,
                            config.learn_budget) for target in config.learn_targets]
    return healed[0] + learned, healed[1]


def _heal_targets(config: SearchConfig, study, healer: StudyHealer) -> tuple[list[HealedMember], list[float]]:
    healed: list[HealedMember] = []
    missed: list[float] = []
    bound = None if config.heal_max_latency is None else config.heal_max_latency * healer.dense_latency_ms()
    for target in config.heal_targets:
        # learned structures are trained models already, not one-shot cuts to heal
        trials = [t for t in study.get_trials(deepcopy=False) if "learned" not in t.user_attrs]
        label: dict = {"target": target, "max_latency": config.heal_max_latency}
        if config.heal_select > 1:
            candidates = selection_candidates(trials, target, config.heal_select, config.heal_select_width, bound)
            if len(candidates) > 1:
                selection = select_by_healing(healer, target, candidates,
                                              config.heal_config(config.heal_select_tokens))
                number, label["selected"] = selection["winner"], True
            else:
                number = candidates[0].number if candidates else None
        else:
            member = member_at(within_latency(trials, bound), target)
            number = member.number if member is not None else None
        if number is None:
            missed.append(target)
            continue
        healed.append(healer.heal(number, config.heal_config(config.heal_tokens), label))
    return healed, missed
