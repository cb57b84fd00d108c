"""Healing a study's members: a search's last step (``heal_targets``) and ``autoprune heal --trial``.

A healed member is the trial's own variant (its plan, cut or pruned from the cached statistics as
the trial was) trained toward the dense model with :mod:`autoprune.training`, then measured as the
trial was (the study's validation windows, which training never sees) with its weights rounded to
the dtype its export is written in, so the recorded perplexity is the exported file's. Optuna
freezes finished trials, so the record is the study attribute ``heal:<trial>`` (``ppl``, ``kl``,
``tokens``, the settings, what the heal measured and cost) and the weights are an Optuna artifact of
the study (:func:`optuna.artifacts.upload_artifact`), which ``export`` writes without training again.

Where artifacts go: a folder beside a SQLite or journal-file study (``<file>.artifacts``) unless
``artifact_store`` names another folder (a shared file system, for a study on a database server);
any :class:`optuna.artifacts` store can be passed through the Python API.

A heal that was stopped resumes from its checkpoints (in the cache folder, per study, trial and
settings); a trial already healed with the same settings is reported, not healed again.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import load_model, save_model

from autoprune.calibration import default_cache_dir
from autoprune.errors import AutopruneError
from autoprune.export import dtype_name
from autoprune.structure import resolve_blocks
from autoprune.structure import save_subnet
from autoprune.study._objectives import objective_values
from autoprune.study._records import find_trial, member_at, trial_plan, trial_row
from autoprune.study._settings import study_settings
from autoprune.study._storage import storage_file
from autoprune.study._worker import TrialRequest, TrialWorker, WorkerSpec
from autoprune.training import Budget, FolderCheckpoints, GateSettings, HealConfig, heal, learn_structure

HEAL_ATTR_PREFIX = "heal:"
#: A learned structure's record, per target (the trial it became is in it).
LEARNED_ATTR_PREFIX = "learned:"


def artifact_store(storage: str, folder: str | None = None) -> FileSystemArtifactStore:
    """Where a study's healed weights go: ``folder``, else beside the study's file."""
    if folder is None:
        file = storage_file(storage)
        if file is None:
            raise AutopruneError(
                "healed weights of a study on a database server need a shared folder: "
                "--artifact-store PATH"
            )
        folder = f"{file}.artifacts"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)


def recorded_heal(study: optuna.Study, number: int) -> dict[str, Any] | None:
    """What the study recorded of healing trial ``number`` (None where it was never healed)."""
    return study.user_attrs.get(f"{HEAL_ATTR_PREFIX}{number}")


def member_row(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """:func:`trial_row` with what the study recorded of healing the trial (``ppl_healed``, and
    ``heal_tokens`` its budget; None where it was never healed)."""
    healed = recorded_heal(study, trial.number) or {}
    row = trial_row(trial)
    row["ppl_healed"] = healed.get("ppl")
    row["heal_tokens"] = healed.get("tokens")
    return row


@torch.no_grad()
def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every floating-point weight to ``dtype``'s precision, in place (kept in its own
    dtype): what a checkpoint written in ``dtype`` reloads as."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.copy_(parameter.to(dtype))


@dataclass
class HealedMember:
    """One healed trial: its record in the study and whether it was found there already."""

    trial: int
    record: dict[str, Any]
    found: bool = False

    def line(self) -> str:
        record = self.record
        if "ppl_before" not in record:  # a learned structure
            word = "found" if self.found else "learned"
            return (f"{word} a structure at {record['target']:.0%} (trial {self.trial}, {record['kept']:.1%} kept): "
                    f"ppl {record['ppl']:.2f} after {record['tokens']:,} tokens")
        word = "found" if self.found else "healed"
        return (
            f"{word} trial {self.trial}: ppl {record['ppl_before']:.2f} -> {record['ppl']:.2f} "
            f"after {record['tokens']:,} tokens"
        )


class StudyHealer:
    """Heals members of one study with one worker (the dense model, its statistics and the
    study's validation windows, loaded once)."""

    def __init__(
        self,
        study: optuna.Study,
        spec: WorkerSpec,
        data: str | None = None,
        store: Any = None,
        cache_dir: Path | None = None,
        progress: bool = False,
    ) -> None:
        self.study, self.progress = study, progress
        self.settings = study_settings(study)
        self.data = data or self.settings.calibration.source
        self.store = store
        self.cache_dir = cache_dir
        self.worker = TrialWorker(spec, progress)

    def heal(self, number: int, config: HealConfig, label: dict[str, Any] | None = None) -> HealedMember:
        """Heal trial ``number`` as ``config`` says, record it (and upload its weights when the
        healer has a store), unless the study holds a heal of it with the same settings."""
        done = recorded_heal(self.study, number)
        if done is not None and done["digest"] == config.digest():
            return HealedMember(number, done, found=True)
        trial = self._complete(number)
        plan = trial_plan(trial)
        healed, result = self.train(trial, config)
        round_weights(healed, self.worker.loaded.source_dtype)
        measured = self.worker.measure(TrialRequest(number, plan), healed)
        if measured.status != "complete":
            raise AutopruneError(f"trial {number} healed did not measure: {measured.status}")
        record = {
            "ppl": measured.ppl, "kl": measured.kl, "quality": measured.quality,
            "ppl_before": trial.user_attrs["ppl"], "tokens": result.tokens,
            "digest": config.digest(), "config": config.model_dump(mode="json"),
            "dtype": dtype_name(self.worker.loaded.source_dtype),
            "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
            "peak_memory_bytes": result.peak_memory_bytes,
            "measurements": [m.__dict__ for m in result.measurements],
            **(label or {}),
        }
        if self.store is not None:
            record["artifact"] = self._upload(healed, number)
        self.study.set_user_attr(f"{HEAL_ATTR_PREFIX}{number}", record)
        return HealedMember(number, record)

    def train(self, trial: FrozenTrial, config: HealConfig):
        """Trial ``trial``'s variant healed as ``config`` says (not recorded): the model and what
        the heal measured. Resumable: checkpoints in the cache, per study, trial and settings."""
        with self.worker.pruner.applied(trial_plan(trial)) as model:
            student = copy.deepcopy(model)  # the worker's own model goes back to dense
        folder = (self.cache_dir or default_cache_dir()) / "heal-checkpoints" / (
            f"{self.study.study_name}-{trial.number}-{config.digest()}"
        )
        checkpoints = FolderCheckpoints(folder, f"{self.study.study_name}:{trial.number}")
        healed, result = heal(student, self.worker.loaded, self.data, config, self.worker.spec.device,
                              checkpoints, self.progress, self.cache_dir)
        checkpoints.remove()
        return healed.to("cpu").eval(), result

    def learn(self, target: float, config: HealConfig, share: float, budget: Budget) -> HealedMember:
        """Learn a sub-network at ``target`` (:func:`autoprune.training.learn_structure`, spending
        ``config.tokens`` in all) and add it to the study as a trial, measured as the trials are, its
        checkpoint an artifact; a rerun with the same settings finds it."""
        key = f"{LEARNED_ATTR_PREFIX}{target:g}"
        digest = f"{config.digest()}-{share}-{budget}-{GateSettings().digest()}"
        done = self.study.user_attrs.get(key)
        if done is not None and done["digest"] == digest:
            return HealedMember(done["trial"], done, found=True)
        folder = (self.cache_dir or default_cache_dir()) / "learn-checkpoints" / f"{self.study.study_name}-{target:g}-{digest}"
        learned = learn_structure(self.worker.loaded, self.data, target, config, share, budget, self.worker.latency,
                                  self.worker.spec.device, folder, self.progress, self.cache_dir,
                                  self.worker.stats)
        model = learned.model.to("cpu").eval()
        round_weights(model, self.worker.loaded.source_dtype)
        number = len(self.study.get_trials(deepcopy=False))
        measured = self.worker.measure(TrialRequest(number, learned.plan), model)
        if measured.status != "complete":
            raise AutopruneError(f"the structure learned at {target:g} did not measure: {measured.status}")
        trials = self.study.get_trials(deepcopy=False)
        sibling = member_at(trials, target) or min(
            (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[-1]
        )
        record = {
            "target": target, "digest": digest, "tokens": config.tokens, "budget": budget, "share": share,
            "ppl": measured.ppl, "kl": measured.kl, "quality": measured.quality,
            "config": config.model_dump(mode="json"), **learned.record(),
        }
        if self.store is not None:
            record["artifact"] = self._upload_checkpoint(model, learned, record)
        trial = optuna.trial.create_trial(
            state=TrialState.COMPLETE, params=sibling.params, distributions=sibling.distributions,
            values=objective_values(self.settings.costs, measured.size, measured.quality),
            user_attrs={"plan": learned.plan.model_dump(mode="json"), "plan_summary": learned.plan.summary(),
                        "expected_nonzeros": int(measured.size["linear_nonzeros"]), **measured.record(),
                        "seconds": measured.seconds, "learned": {k: v for k, v in record.items() if k != "config"}},
        )
        self.study.add_trial(trial)
        record["trial"] = self.study.get_trials(deepcopy=False)[-1].number
        self.study.set_user_attr(key, record)
        return HealedMember(record["trial"], record)

    def _upload_checkpoint(self, model: torch.nn.Module, learned, record: dict[str, Any]) -> str:
        """The learned model as a checkpoint folder (its modelling file where blocks differ),
        archived and uploaded."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Path(folder) / "learned"
            recipe = self.settings.recipe(learned.plan)
            save_subnet(model, self.worker.loaded.tokenizer, checkpoint,
                        {"recipe": recipe.model_dump(mode="json"), "learned": record},
                        self.worker.loaded.source_dtype)
            archive = shutil.make_archive(str(Path(folder) / "learned"), "tar", checkpoint)
            return upload_artifact(artifact_store=self.store, file_path=archive, study_or_trial=self.study)

    def dense_latency_ms(self) -> float:
        """The predicted prefill of the dense model, where the study prices latency."""
        if self.worker.latency is None:
            raise AutopruneError("a latency bound needs a study whose trials are priced (latency objectives)")
        return self.worker.latency.predict(resolve_blocks(None, [], self.worker.dims)).prefill_ms

    def _complete(self, number: int) -> FrozenTrial:
        trial = find_trial(self.study, number)
        if trial.state != TrialState.COMPLETE or "plan" not in trial.user_attrs:
            raise AutopruneError(
                f"trial {number} is {trial.state.name.lower()}; only complete trials can be healed"
            )
        return trial

    def _upload(self, model: torch.nn.Module, number: int) -> str:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"healed-{number}.safetensors"
            save_model(model, str(path))
            return upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=self.study)


def load_healed_weights(model: torch.nn.Module, store: Any, artifact: str) -> None:
    """Put a healed trial's weights (artifact ``artifact`` of ``store``) into ``model``, the
    trial's variant as its plan makes it: the same tensors, every one replaced."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "healed.safetensors"
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact)
        missing, unexpected = load_model(model, str(path), strict=False)
        if missing or unexpected:
            raise AutopruneError(
                f"the healed weights do not fit the trial's model ({len(missing)} missing, "
                f"{len(unexpected)} unexpected tensors)"
            )


def unpack_learned(store: Any, artifact: str, out: Path) -> None:
    """Write a learned trial's checkpoint (artifact ``artifact`` of ``store``) into the new or
    empty folder ``out``, whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.partial-") as folder:
        archive = Path(folder) / "learned.tar"
        download_artifact(artifact_store=store, file_path=str(archive), artifact_id=artifact)
        staging = Path(folder) / "checkpoint"
        shutil.unpack_archive(archive, staging, "tar")
        if out.exists():
            out.rmdir()
        staging.chmod(0o755)
        staging.rename(out)
