"""``autoprune export``: one trial of a study as a recipe and a pruned Hugging Face checkpoint.

``DIR`` becomes the checkpoint (loadable with plain transformers) with ``DIR/recipe.yaml`` beside
it; ``autoprune prune --recipe DIR/recipe.yaml --out OTHER`` rebuilds the same model. The recipe
holds the model, the calibration settings and the plan, never the storage URL. ``--sequential``
exports the variant ``prune --sequential`` makes of the trial's plan (and says so in the recipe);
its ``recorded_ppl`` is then the study's measurement of that variant, which only trials refined for
it have (empty for the rest: the study never measured it). ``--format gguf`` also writes
``DIR/model-<type>.gguf`` (:mod:`autoprune.export_gguf`) and prints the table; a model GGUF
cannot express leaves nothing behind."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from optuna.trial import TrialState

from autoprune.api import prune
from autoprune.cli._common import add_format, render
from autoprune.errors import AutopruneError
from autoprune.export import check_output_dir
from autoprune.export_gguf import GGUF_TYPES, export_checkpoint_gguf
from autoprune.study import (
    DEFAULT_STORAGE,
    find_trial,
    load_existing_study,
    recorded_sequential_ppl,
    trial_recipe,
)

RECIPE_FILE = "recipe.yaml"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a trial as a recipe and a checkpoint")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL or path")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--trial", type=int, required=True, help="trial number (see autoprune front)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="calibration cache folder")
    parser.add_argument(
        "--sequential", action="store_true",
        help="prune block after block from the already-pruned model's statistics (the recipe "
        "keeps it): what `refine --sequential-every` tunes a trial for, not what the study measured",
    )
    add_format(parser, ("table", "json", "gguf"))
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                        help="with --format gguf: f16 (default) or q8_0")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.gguf_type is not None and args.format != "gguf":
        raise AutopruneError("--gguf-type needs --format gguf")
    check_output_dir(args.out)
    out_existed = args.out.exists()
    study = load_existing_study(args.storage, args.study)
    trial = find_trial(study, args.trial)
    if trial.state != TrialState.COMPLETE:
        raise AutopruneError(
            f"trial {trial.number} is {trial.state.name.lower()}; only complete trials can be exported"
        )
    if trial.user_attrs.get("refine", {}).get("sequential_every") and not args.sequential:
        print(
            f"autoprune: note: trial {trial.number} was refined for --sequential; exporting it "
            "one-shot, as the study measured it",
            file=sys.stderr,
        )
    recipe = trial_recipe(study, trial).model_copy(update={"sequential": args.sequential})
    report = prune(recipe.model, recipe.calibration, recipe.plan, args.out,
                   cache_dir=args.cache_dir, sequential=recipe.sequential)
    recipe.save(args.out / RECIPE_FILE)
    gguf_file = None
    if args.format == "gguf":
        gguf_file = _write_gguf(args.out, args.gguf_type or "f16", out_existed)
    recorded = trial.user_attrs["size"]["linear_nonzeros"]
    if report.size.linear_nonzeros != recorded:
        print(
            f"autoprune: warning: the checkpoint has {report.size.linear_nonzeros} linear non-zeros, "
            f"the study recorded {recorded} (different calibration data or model?)",
            file=sys.stderr,
        )
    row = {
        "trial": trial.number,
        "out": str(args.out),
        "recipe": str(args.out / RECIPE_FILE),
        "sparsity": round(report.size.sparsity, 6),
        "nonzeros": report.size.linear_nonzeros,
        "recorded_nonzeros": recorded,
        "recorded_ppl": recorded_sequential_ppl(trial) if args.sequential else trial.user_attrs.get("ppl"),
    }
    if gguf_file is not None:
        row["gguf"] = str(gguf_file)
    print(render([row], "table" if args.format == "gguf" else args.format))
    return 0


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
