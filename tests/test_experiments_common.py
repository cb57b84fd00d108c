"""``experiments/_common.py``: what the experiment scripts share measures and writes what the
library does, so moving a script onto it cannot change its numbers or its files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest

from autoprune import CalibrationConfig, PlanRequest, Pruner, load_model, prepare
from autoprune.api import prepare_with_windows
from autoprune.data import evaluation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.pruner import prune_sequentially
from autoprune.study import SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import _common  # noqa: E402  (the experiments folder is not a package)


@pytest.fixture
def tiny(tiny_llama_dir: Path, data_dir: Path) -> tuple[Pruner, CalibrationConfig]:
    calibration = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=32)
    loaded, stats, _ = prepare(str(tiny_llama_dir), calibration, progress=False)
    return Pruner(loaded, stats), calibration


def test_one_shot_measures_what_the_pruner_applies_and_leaves_the_model_dense(tiny, data_dir):
    pruner, _ = tiny
    windows = evaluation_windows(str(data_dir), pruner.loaded.tokenizer, 32, 4)
    plan = PlanRequest("sparsegpt", 0.5).build(pruner.loaded, pruner.stats)
    with pruner.applied(plan) as model:
        expected_ppl = perplexity(model, windows)
        expected_size = measure_size(model, pruner.loaded.adapter, pruner.dense_linear_params)
    dense_ppl = perplexity(pruner.loaded.model, windows)

    measured = _common.measure_one_shot(pruner, plan, windows, progress=False)

    assert measured.ppl == expected_ppl
    assert measured.size == expected_size
    assert measured.size.sparsity == pytest.approx(0.5, abs=0.01)
    assert measured.prune_seconds > 0
    assert perplexity(pruner.loaded.model, windows) == dense_ppl != measured.ppl


def test_sequential_measures_prune_sequentially(tiny_llama_dir, data_dir):
    calibration = CalibrationConfig(source=str(data_dir), n_samples=4, seq_len=32)
    loaded, calib, stats, _ = prepare_with_windows(str(tiny_llama_dir), calibration, None, False)
    pruner = Pruner(loaded, stats)
    windows = evaluation_windows(str(data_dir), loaded.tokenizer, 32, 4)
    plan = PlanRequest("sparsegpt", 0.5).build(loaded, stats)
    fresh = load_model(str(tiny_llama_dir))
    pruned = prune_sequentially(fresh, calib, plan)
    expected_ppl = perplexity(pruned, windows)
    expected_size = measure_size(pruned, fresh.adapter, pruner.dense_linear_params)

    measured = _common.measure_sequential(str(tiny_llama_dir), calib, plan, windows,
                                          pruner.dense_linear_params, progress=False)

    assert measured.ppl == expected_ppl
    assert measured.size == expected_size
    # the sequential weights differ from the one-shot ones: it is not the one-shot path
    with pruner.applied(plan) as model:
        assert perplexity(model, windows) != measured.ppl


def test_study_setup_types_what_search_stored(tiny_llama_dir, data_dir, tmp_path):
    config = SearchConfig(model=str(tiny_llama_dir), data=str(data_dir), storage=f"sqlite:///{tmp_path}/s.db",
                          study="s", method="wanda", objective="kl", eval_windows=3, seq_len=32,
                          calib_samples=4)
    study = optuna.create_study(storage=config.storage, study_name="s", directions=["minimize"] * 2)
    config.settings().write(study)

    settings = _common.load_study_setup(config.storage, "s", test_windows=1).settings

    assert settings.model == str(tiny_llama_dir)
    assert settings.calibration == config.calibration()
    assert (settings.method, settings.objective, settings.eval_seq_len, settings.eval_windows) == (
        "wanda", "kl", 32, 3)
    spec = settings.worker_spec()
    assert (spec.objective, spec.calibration, spec.eval_windows) == ("kl", config.calibration(), 3)


def test_write_results_writes_json_and_the_table(tmp_path):
    rows = [{"name": "a", "ppl": 12.3456, "count": 1234567}, {"name": "b", "ppl": 7.0, "count": 5}]
    columns = [_common.column("name", "name", align="---"), _common.column("ppl", "ppl", ".2f"),
               _common.column("non-zeros", "count", ","),
               _common.Column("note", lambda row: _common.number(None if row["name"] == "b" else 1.5))]
    text = _common.write_results({"rows": rows}, tmp_path / "out", "result",
                                 ["Header.", "", *_common.table(rows, columns)])

    assert text == (
        "Header.\n\n"
        "| name | ppl | non-zeros | note |\n"
        "|---|---:|---:|---:|\n"
        "| a | 12.35 | 1,234,567 | 1.50 |\n"
        "| b | 7.00 | 5 | - |\n"
    )
    assert (tmp_path / "out" / "result.md").read_text() == text
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"rows": rows}
