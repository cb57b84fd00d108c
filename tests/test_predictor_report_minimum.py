"""``predictor report`` says when a study holds too few complete trials for its figures to mean
anything: a ``warning`` in the report and a warning line from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from test_predictors import searched, searched_source  # noqa: F401  (the shared layer-wise study)

from autoprune.plan import Plan
from predictors import TrainingSet, quality_report
from predictors.features import FeatureSchema
from predictors.model import KEPT_FEATURE
from predictors.quality import MIN_HELDOUT, min_complete_trials


def synthetic(count: int) -> tuple[TrainingSet, FeatureSchema]:
    """``count`` trials whose log-quality falls with the kept fraction, plus noise."""
    rng = np.random.default_rng(0)
    kept = rng.uniform(0.3, 0.7, count)
    features = np.column_stack([kept, rng.normal(size=count)])
    quality = np.exp(4.0 - 3.0 * kept + 0.1 * rng.normal(size=count))
    schema = FeatureSchema(model_fingerprint="m", calibration="c", num_blocks=1, layers=("l",),
                           layers_hash="h", names=(KEPT_FEATURE, "noise"))
    data = TrainingSet("s", "ppl", np.arange(count), [Plan()] * count, kept, quality, features,
                       np.ones(count, dtype=bool))
    return data, schema


def test_the_minimum_is_ten_held_out_trials():
    assert MIN_HELDOUT == 10 and min_complete_trials() == 32 and min_complete_trials(0.5) == 19


@pytest.mark.parametrize("count", [12, 31])
def test_too_few_complete_trials_are_flagged(count):
    data, schema = synthetic(count)
    report = quality_report(data, schema)
    held = round(0.3 * count)
    assert report["heldout_trials"] == held < MIN_HELDOUT
    assert report["warning"].startswith(f"study 's' has {count} complete trials, so the held-out figures "
                                        f"come from {held} trials: too few to mean anything")
    assert "at least 32 complete trials (10 held out) are needed" in report["warning"]
    assert isinstance(report["spearman"], float)  # the figures are still there, flagged


def test_enough_complete_trials_carry_no_warning():
    data, schema = synthetic(32)
    report = quality_report(data, schema)
    assert report["heldout_trials"] == 10 and report["warning"] is None


def test_cli_prints_the_warning_line(searched, capsys):  # noqa: F811
    config, study, _, _ = searched
    common = ["--storage", config.storage, "--study", study.study_name, "--cache-dir", config.cache_dir]
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    assert complete < min_complete_trials()  # the shared study is small
    code, out, err = run_cli(capsys, "predictor", "report", *common, "--format", "json")
    assert code == 0 and json.loads(out)["warning"] is not None
    lines = [line for line in err.splitlines() if line.startswith("warning:")]  # not the loading bars
    assert len(lines) == 1 and lines[0].startswith(f"warning: study 'tiny' has {complete} complete trials")
    assert "too few to mean anything" in lines[0] and "at least 32 complete trials" in lines[0]
