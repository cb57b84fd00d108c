"""One trial of a study as a recipe and a pruned Hugging Face checkpoint (``autoprune export``).

``out`` becomes the checkpoint (loadable with plain transformers) with ``out/recipe.yaml`` beside
it; ``autoprune prune --recipe out/recipe.yaml --out OTHER`` rebuilds the same model. The recipe
holds the model, the calibration settings and the plan, never the storage URL. ``sequential``
exports the variant ``prune --sequential`` makes of the trial's plan (and says so in the recipe);
its ``recorded_ppl`` is then the study's measurement of that variant, which only refined trials
that measured it have (None for the rest: the study never measured it). Left unsaid, the export is
the variant the study measured best: the sequential one where the trial holds a better measurement
of it (a search's finishing refinements, ``refine_sequential``), one-shot otherwise.
``dtype`` names what the weights are written in (the source's by default, see
:func:`autoprune.api.prune`). ``gguf_type`` also writes ``out/model-<type>.gguf``
(:mod:`autoprune.export_gguf`, from the checkpoint, whatever its widths); a model GGUF cannot
express leaves ``out`` as it was before the export. A quantized trial (its plan gives every
tensor a GGUF type) is always written as its own GGUF, ``out/model.gguf``, from the bytes the
study measured, its size set against the recorded ``gguf_bytes``; its checkpoint holds the
dequantized weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from autoprune.api import PruneReport, prune
from autoprune.errors import AutopruneError
from autoprune.export import check_output_dir, checkpoint_dtype, read_metadata
from autoprune.measure import SizeReport
from autoprune.plan import Recipe
from autoprune.export_gguf import GGUF_TYPES, export_checkpoint_gguf
from autoprune.study._heal import artifact_store, load_healed_weights, recorded_heal, unpack_learned
from autoprune.study._records import find_trial, recorded_sequential_ppl, sequential_is_better, trial_plan
from autoprune.study._settings import trial_recipe
from autoprune.study._storage import load_existing_study
from autoprune.variants import DatabaseSettings

RECIPE_FILE = "recipe.yaml"


@dataclass
class ExportResult:
    """What an export wrote, what the study had recorded of the trial, and what a user should be
    told about the difference (``notes``: one line each, ``note: ...`` or ``warning: ...``)."""

    trial: int
    out: Path
    report: PruneReport
    recorded_nonzeros: int
    #: The study's perplexity of the exported variant; None where the study never measured it.
    recorded_ppl: float | None
    notes: list[str] = field(default_factory=list)
    #: The GGUF file written beside the checkpoint, if one was asked for (or the trial is quantized).
    gguf: Path | None = None
    #: The study's record of the trial's GGUF file size, where it priced one.
    recorded_gguf_bytes: int | None = None

    @property
    def recipe(self) -> Path:
        return self.out / RECIPE_FILE

    def row(self) -> dict[str, Any]:
        """The line ``autoprune export`` prints."""
        written = self.report.checkpoint
        return {
            "trial": self.trial,
            "out": str(self.out),
            "recipe": str(self.recipe),
            "sparsity": round(self.report.size.sparsity, 6),
            "nonzeros": self.report.size.linear_nonzeros,
            "recorded_nonzeros": self.recorded_nonzeros,
            "recorded_ppl": self.recorded_ppl,
            "dtype": written.dtype if written else None,
            "checkpoint_bytes": written.weight_bytes if written else None,
        } | ({"gguf": str(self.gguf), "gguf_bytes": self.gguf.stat().st_size,
              "recorded_gguf_bytes": self.recorded_gguf_bytes} if self.gguf is not None else {})


def export_trial(
    storage: str,
    study: str,
    trial: int,
    out: Path,
    sequential: bool | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    gguf_type: str | None = None,
    database: DatabaseSettings | None = None,
    healed: bool = True,
    store: Any = None,
    dtype: str | None = None,
    gguf: bool = False,
) -> ExportResult:
    """Prune the model of ``study``'s complete trial number ``trial`` as the study recipe says,
    save it to ``out`` (a new or empty folder, checked before anything loads) with its recipe, and
    compare its size with the study's record. ``sequential`` prunes block after block from the
    already-pruned model's statistics, False one-shot as the trials were measured, None the
    variant the study measured best (see the module's docstring). ``gguf`` also writes the
    checkpoint as a GGUF file of ``gguf_type`` (one of :data:`GGUF_TYPES`, f16 unless given; given,
    it implies ``gguf``); a quantized trial's GGUF is written in its own types, always. ``dtype``
    is what the checkpoint's weights are written in (None: the source's). A trial the study healed
    is written with its healed weights (from ``store``, default: the study's artifact folder)
    unless ``healed`` is False or ``sequential`` asks for the block-after-block variant (a heal is
    of the one-shot one)."""
    if dtype is not None:
        checkpoint_dtype(dtype)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise AutopruneError(f"unknown GGUF type {gguf_type!r} (known: {', '.join(GGUF_TYPES)})")
    check_output_dir(out)
    out_existed = out.exists()
    loaded_study = load_existing_study(storage, study)
    frozen = find_trial(loaded_study, trial)
    if frozen.state != TrialState.COMPLETE:
        raise AutopruneError(
            f"trial {frozen.number} is {frozen.state.name.lower()}; only complete trials can be exported"
        )
    file_type = gguf_type or ("f16" if gguf else None)  # the GGUF type asked for, if any
    if "learned" in frozen.user_attrs:
        return _export_learned(storage, frozen, out, store, file_type, out_existed)
    quantized = trial_plan(frozen).quantization is not None
    if quantized and gguf_type is not None:
        raise AutopruneError(
            f"trial {frozen.number} gives every tensor its own GGUF type; leave out --gguf-type"
        )
    notes = []
    heal = recorded_heal(loaded_study, frozen.number) if healed and not sequential else None
    if heal is not None:
        sequential = False
        store = store if store is not None else artifact_store(storage)
        notes.append(
            f"note: exporting trial {frozen.number} healed with {heal['tokens']:,} tokens (ppl "
            f"{heal['ppl']:.2f}, one-shot {frozen.user_attrs['ppl']:.2f}); --unhealed for the other"
        )
    if sequential is None:
        sequential = sequential_is_better(frozen)
        if sequential:
            notes.append(
                f"note: exporting trial {frozen.number} --sequential, the variant the study measured "
                f"best (ppl {recorded_sequential_ppl(frozen):.2f}, one-shot {frozen.user_attrs['ppl']:.2f}); "
                "--one-shot for the other"
            )
    recipe = trial_recipe(loaded_study, frozen).model_copy(update={"sequential": sequential})
    report = prune(
        recipe.model, recipe.calibration, recipe.plan, out, cache_dir=cache_dir, progress=progress,
        sequential=recipe.sequential, database=database, dtype=dtype,
        load_weights=partial(load_healed_weights, store=store, artifact=heal["artifact"]) if heal else None,
        metadata={"heal": heal} if heal else None,
    )
    recipe.save(out / RECIPE_FILE)
    written = report.gguf
    if written is None and file_type is not None:
        written = _write_gguf(out, file_type, out_existed)
    recorded_bytes = frozen.user_attrs["size"].get("gguf_bytes")
    if quantized and recorded_bytes is not None:
        size = written.stat().st_size
        if abs(size / recorded_bytes - 1) > 0.001:
            notes.append(f"warning: the GGUF file has {size} bytes, the study recorded {recorded_bytes}")
    recorded = frozen.user_attrs["size"]["linear_nonzeros"]
    if report.size.linear_nonzeros != recorded:
        notes.append(
            f"warning: the checkpoint has {report.size.linear_nonzeros} linear non-zeros, the study "
            f"recorded {recorded} (different calibration data or model?)"
        )
    ppl = recorded_sequential_ppl(frozen) if sequential else frozen.user_attrs.get("ppl")
    if heal is not None:
        ppl = heal["ppl"]
    return ExportResult(frozen.number, out, report, recorded, ppl, notes, written,
                        recorded_bytes if written is not None else None)


def _write_gguf(out: Path, gguf_type: str, out_existed: bool) -> Path:
    """The checkpoint in ``out`` as a GGUF beside it; on failure ``out`` is as it was before (absent
    or empty), so a model GGUF cannot express leaves nothing written."""
    path = out / f"model-{gguf_type}.gguf"
    try:
        export_checkpoint_gguf(out, path, gguf_type)
    except BaseException:
        shutil.rmtree(out)
        if out_existed:
            out.mkdir()
        raise
    return path


def _export_learned(
    storage: str, frozen: FrozenTrial, out: Path, store: Any, gguf_type: str | None, out_existed: bool
) -> ExportResult:
    """A learned structure's trial: its saved checkpoint (its weights come from training, not from a
    recipe), the recipe beside it for the record."""
    learned = frozen.user_attrs["learned"]
    if "artifact" not in learned:
        raise AutopruneError(f"trial {frozen.number} is a learned structure whose weights were not kept")
    unpack_learned(store if store is not None else artifact_store(storage), learned["artifact"], out)
    recipe = Recipe.model_validate(read_metadata(out)["recipe"])
    recipe.save(out / RECIPE_FILE)
    gguf = _write_gguf(out, gguf_type, out_existed) if gguf_type is not None else None
    size = SizeReport(**{name: frozen.user_attrs["size"][name] for name in SizeReport.__dataclass_fields__})
    report = PruneReport(recipe, size, learned["ppl"], True)
    notes = [f"note: trial {frozen.number} is a structure learned with {learned['tokens']:,} tokens: "
             "its saved checkpoint is written"]
    return ExportResult(frozen.number, out, report, size.linear_nonzeros, learned["ppl"], notes, gguf)
