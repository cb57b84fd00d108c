"""Zero-shot tasks through lm-eval: ``autoprune eval --tasks`` gives exactly lm-eval's own numbers
for the same checkpoint and local task, ``front --tasks`` records front members' scores in the
study, and bad input is one line with nothing written. Skipped where the eval extra is absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import TRIALS_ONLY
import yaml

from autoprune.cli import main

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")

TASK = "autoprune_tiny_mc"
TASK_FOLDER = Path(__file__).parent / "data" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def include_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local task folder, its YAML pointing at the JSONL by absolute path."""
    folder = tmp_path_factory.mktemp("tasks")
    shutil.copy(TASK_FOLDER / "tiny_mc.jsonl", folder)
    text = (TASK_FOLDER / "tiny_mc.yaml").read_text()
    (folder / "tiny_mc.yaml").write_text(text.replace("DATA_FILE", str(folder / "tiny_mc.jsonl")))
    return folder


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lm_eval_scores(model_dir: Path, include_path: Path, limit: int | None = None) -> dict:
    """What lm-eval reports on its own: its HF model class loading the folder by name."""
    from lm_eval.tasks import TaskManager

    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},device=cpu", tasks=[TASK],
        task_manager=TaskManager(include_path=str(include_path)), limit=limit,
    )
    return output["results"][TASK]


def test_eval_tasks_equals_lm_eval(tiny_llama_dir, include_path, capsys):
    code, out, _ = run_cli(capsys, "eval", "--model", tiny_llama_dir, "--tasks", TASK,
                           "--include-path", include_path, "--format", "json")
    assert code == 0
    (row,) = json.loads(out)
    reference = lm_eval_scores(tiny_llama_dir, include_path)
    assert row["task"] == TASK and row["samples"] == 16
    for metric in ("acc", "acc_norm"):
        assert row[metric] == pytest.approx(reference[f"{metric},none"], abs=1e-12)
        assert row[f"{metric}_stderr"] == pytest.approx(reference[f"{metric}_stderr,none"], abs=1e-12)
    assert 0.0 < row["acc_stderr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
        (["--tasks", TASK, "--include-path", "/no/such/folder"], "--include-path /no/such/folder is not a folder"),
        (["--tasks", TASK, "--limit", "0"], "--limit must be at least 1"),
        (["--limit", "3"], "--include-path and --limit need --tasks"),
        (["--tasks", ","], "--tasks needs at least one task name"),
    ],
)
def test_bad_task_input_is_one_line(tiny_llama_dir, tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "eval", "--model", tiny_llama_dir, *args)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or list(tmp_path.iterdir()) == []


def test_front_tasks_records_each_front_members_scores(tiny_llama_dir, data_dir, include_path, tmp_path, capsys):
    config = {
        "model": str(tiny_llama_dir), "data": str(data_dir), "storage": f"sqlite:///{tmp_path / 's.db'}",
        "study": "tasks", "trials": 4, "seeded": False, "population": 4, "space": "layerwise",
        "seed": 1, "method": "wanda", "sparsity_range": [0.3, 0.7], "eval_windows": 2,
        "min_windows": 1, "seq_len": 32, "calib_samples": 8, "cache_dir": str(tmp_path / "cache"),
        **TRIALS_ONLY,
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    assert main(["search", "--config", str(tmp_path / "search.yaml"), "--format", "json"]) == 0
    capsys.readouterr()
    where = ["--storage", config["storage"], "--study", "tasks"]
    code, out, _ = run_cli(capsys, "front", *where, "--tasks", TASK, "--include-path", include_path,
                           "--limit", 8, "--cache-dir", config["cache_dir"], "--format", "json")
    assert code == 0
    rows = json.loads(out)
    study = optuna.load_study(study_name="tasks", storage=config["storage"])
    assert {row["trial"] for row in rows} == {t.number for t in study.best_trials}
    for row in rows:
        recorded = study.user_attrs[f"tasks:{row['trial']}"][TASK]
        assert row[f"acc:{TASK}"] == recorded["acc"] and recorded["limit"] == 8
        assert recorded["samples"] == 8 and recorded["acc_stderr"] is not None
    first = rows[0]["trial"]
    out_dir = tmp_path / "export"
    export = ["export", *where, "--trial", str(first), "--out", str(out_dir), "--cache-dir", config["cache_dir"]]
    assert main(export) == 0
    capsys.readouterr()
    reference = lm_eval_scores(out_dir, include_path, limit=8)
    assert rows[0][f"acc:{TASK}"] == pytest.approx(reference["acc,none"], abs=1e-12)
    code, out, _ = run_cli(capsys, "front", *where, "--format", "json")
    assert json.loads(out)[0][f"acc:{TASK}"] == rows[0][f"acc:{TASK}"]  # a plain front shows them


def test_a_task_whose_data_cannot_be_loaded_is_one_line(tiny_llama_dir, tmp_path, capsys):
    """As a hub task is offline: lm-eval knows the task but cannot read its data."""
    text = (TASK_FOLDER / "tiny_mc.yaml").read_text()
    (tmp_path / "tiny_mc.yaml").write_text(text.replace("DATA_FILE", str(tmp_path / "missing.jsonl")))
    code, out, err = run_cli(capsys, "eval", "--model", tiny_llama_dir, "--tasks", TASK,
                             "--include-path", tmp_path)
    last = err.strip().splitlines()[-1]
    assert code == 2 and out == "" and err.count("autoprune:") == 1
    assert last.startswith(f"autoprune: error: lm-eval could not load the data of {TASK}")
