"""``autoprune predictor fit|report|predict``: the accuracy predictor of a study.

``fit`` trains on the study's complete trials and saves the booster (xgboost JSON) and its
metadata beside the study's storage file (or ``--out``); ``report`` scores both objectives on a
held-out 30% split and by 5-fold cross-validation (the JSON's ``spearman`` is the held-out
regression's), with a warning line on stderr (and ``warning`` in the JSON) when fewer than 10
trials are held out (fewer than 32 complete trials), too few for the figures to mean anything;
``predict`` loads a saved predictor and predicts ``--plan`` files (plans or recipes)
or, without them, the study's own trials beside their measured quality. All three only read the
study; the model and its calibration statistics are loaded as the study recorded them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from autoprune.cli._common import add_format, render
from autoprune.errors import AutopruneError
from autoprune.plan import Plan, Recipe
from autoprune.study import DEFAULT_STORAGE, load_existing_study, trial_plan
from predictors import (
    Predictor,
    default_predictor_path,
    quality_report,
    report_rows,
    study_featurizer,
    training_set,
)
from predictors.model import OBJECTIVES, check_predictor_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predictor", help="fit, assess and use a study's accuracy predictor")
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    fit = _action(actions, "fit", "train on the study's complete trials and save the predictor", _fit)
    fit.add_argument("--objective", choices=list(OBJECTIVES), default="regression")
    fit.add_argument("--seed", type=int, default=0)
    report = _action(actions, "report", "held-out and k-fold quality of the predictor", _report)
    report.add_argument("--seed", type=int, default=0, help="seed of the split and the boosters")
    predict = _action(actions, "predict", "predict plans (or the study's trials) with a saved predictor", _predict)
    predict.add_argument("--plan", type=Path, action="append", default=[],
                         help="a plan or recipe file (JSON/YAML); repeatable; default: the study's trials")


def _action(
    actions: argparse._SubParsersAction, name: str, help_text: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """One action with the flags all three share: which study, where its cache is, output format."""
    parser = actions.add_parser(name, help=help_text)
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL or path")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--cache-dir", type=Path, default=None, help="calibration cache folder")
    if name != "report":
        parser.add_argument("--out" if name == "fit" else "--predictor", dest="path", type=Path,
                            help="predictor file (.json; default: beside the study's storage file)")
    add_format(parser)
    parser.set_defaults(run=run)
    return parser


def _fit(args: argparse.Namespace) -> int:
    path = args.path or default_predictor_path(args.storage, args.study)
    check_predictor_path(path)
    study = load_existing_study(args.storage, args.study)
    featurizer = study_featurizer(study, args.cache_dir)
    predictor = Predictor.fit(training_set(study, featurizer), featurizer.schema, args.objective, args.seed)
    meta_path = predictor.save(path)
    meta = predictor.meta
    row = {"predictor": str(path), "metadata": str(meta_path), "objective": meta.objective,
           "quality": meta.quality, "trials": meta.trials, "model": meta.features.model_fingerprint}
    print(render([row], args.format))
    return 0


def _report(args: argparse.Namespace) -> int:
    study = load_existing_study(args.storage, args.study)
    featurizer = study_featurizer(study, args.cache_dir)
    report = quality_report(training_set(study, featurizer), featurizer.schema, seed=args.seed)
    print(json.dumps(report, indent=2) if args.format == "json" else render(report_rows(report), "table"))
    if report["warning"] is not None:
        print(f"warning: {report['warning']}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    plans = [(str(path), read_plan(path)) for path in args.plan]
    study = load_existing_study(args.storage, args.study)
    predictor = Predictor.load(args.path or default_predictor_path(args.storage, args.study))
    for _, plan in plans:  # before the model loads: a plan of another model is refused at once
        predictor.meta.features.check_plan(plan)
    rows: list[dict[str, Any]]
    if plans:
        rows = [{"plan": name} for name, _ in plans]
        chosen = [plan for _, plan in plans]
    else:
        trials = [t for t in study.get_trials(deepcopy=False) if "plan" in t.user_attrs]
        rows = [{"trial": t.number, "measured": t.values[-1] if t.values else None} for t in trials]
        chosen = [trial_plan(t) for t in trials]
    featurizer = study_featurizer(study, args.cache_dir)
    if predictor.meta.objective == "regression":
        column, values = f"predicted_{predictor.meta.quality}", predictor.predict_quality(chosen, featurizer)
    else:
        column, values = "score", predictor.predict(chosen, featurizer)
    for row, plan, value in zip(rows, chosen, values, strict=True):
        row.update({"nonzeros": featurizer.ctx.nonzeros(plan), column: float(value)})
    print(render(rows, args.format))
    return 0


def read_plan(path: Path) -> Plan:
    """A plan from a JSON/YAML file holding a plan, or a recipe (``autoprune export``) holding one."""
    if not path.is_file():
        raise AutopruneError(f"plan file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
        return Recipe.model_validate(data).plan if isinstance(data, dict) and "plan" in data else Plan.model_validate(data)
    except yaml.YAMLError as error:
        raise AutopruneError(f"{path} is not valid JSON/YAML: {' '.join(str(error).split())[:200]}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "plan"
        raise AutopruneError(f"{path} is not a plan or recipe: {where}: {first['msg']}") from None
