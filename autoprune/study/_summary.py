"""What a search run did and the front it left (``autoprune search`` prints it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from autoprune.study._heal import member_row
from autoprune.study._records import counts_toward_budget, front_trials
from autoprune.study._storage import mask_url, storage_url

if TYPE_CHECKING:
    from autoprune.study._config import SearchConfig


@dataclass
class SearchSummary:
    """What a search run did and the front it left."""

    study: str
    storage: str
    finished: int
    complete: int
    stopped_early: int
    failed: int
    orphans_requeued: int
    resumed: bool
    front: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: What the finishing refinements did (``refine_targets``), one line each.
    refined: list[str] = field(default_factory=list)
    #: The ``refine_targets`` no front member was sparse enough to refine for.
    missed_targets: list[float] = field(default_factory=list)
    #: What the finishing heals did (``heal_targets``), one line each.
    healed: list[str] = field(default_factory=list)
    #: The ``heal_targets`` no trial was sparse enough to heal for.
    missed_heal_targets: list[float] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"study {self.study!r} in {self.storage}: {self.finished} trials finished "
            f"({self.complete} complete, {self.stopped_early} stopped early, {self.failed} failed), "
            f"front of {len(self.front)}"
            + (f", {self.orphans_requeued} interrupted trial(s) re-queued" if self.orphans_requeued else "")
            + "".join(f"; {line}" for line in self.refined)
            + "".join(f"; no front member at or above {t:.1%} sparsity to refine" for t in self.missed_targets)
            + "".join(f"; {line}" for line in self.healed)
            + "".join(f"; no trial at or above {t:.1%} sparsity to heal" for t in self.missed_heal_targets)
        )


def search_summary(
    study: optuna.Study, config: SearchConfig, orphans: int, resumed: bool, seconds: float,
    refined: list[str], missed_targets: list[float], healed: list[str] = (),
    missed_heal_targets: list[float] = (),
) -> SearchSummary:
    """The summary of a run that left ``study`` as it is."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    return SearchSummary(
        study=config.study,
        storage=mask_url(storage_url(config.storage)),
        finished=sum(counts_toward_budget(t) for t in trials),
        complete=states.count(TrialState.COMPLETE),
        stopped_early=states.count(TrialState.PRUNED),
        failed=sum(t.state == TrialState.FAIL and counts_toward_budget(t) for t in trials),
        orphans_requeued=orphans,
        resumed=resumed,
        front=[member_row(study, t) for t in front_trials(study)],
        seconds=round(seconds, 1),
        refined=refined,
        missed_targets=missed_targets,
        healed=list(healed),
        missed_heal_targets=list(missed_heal_targets),
    )
