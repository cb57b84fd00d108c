"""Issue #24's scenario, re-run: the same ``autoprune search`` twice on one SQLite study.

A. tiny random-weight LLaMA, 60 trials; the second driver starts while the first has a trial in
   flight (RUNNING with its parameters written).
B. two drivers with ``--trials 30`` started one second apart, before either has a trial in flight.
C. as A, but the second driver has imported autoprune beforehand and starts the moment the first
   has a trial in flight (in A, on a loaded 2-core machine, the second one's start-up can outlast
   the first one's 60 tiny trials, so the two may never overlap).

Default heartbeat settings (no AUTOPRUNE_HEARTBEAT_* in the environment). Writes the exit codes,
each driver's last stderr line, whether any stderr holds a traceback, and what the study holds
(finished trials, orphaned trials, plans measured twice) to experiments/results/two_drivers.json,
and a table of it to ``two_drivers.md``.

    PYTHONPATH=$PWD python experiments/two_drivers.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import save_tiny_model, synthetic_text, tiny_llama_config  # noqa: E402

from autoprune.study import counts_toward_budget  # noqa: E402

from _common import Column, add_out, column, parser, table, write_results  # noqa: E402


def tiny_model(folder: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    data = folder / "data"
    data.mkdir()
    (data / "wiki.valid.tokens").write_text(synthetic_text(1))
    (data / "wiki.test.raw").write_text(synthetic_text(2))
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([synthetic_text(0)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return save_tiny_model(tiny_llama_config(len(tokenizer)), tokenizer, folder / "model"), data


def command(model: Path, data: Path, db: Path, study: str, trials: int) -> list[str]:
    return [
        sys.executable, "-m", "autoprune", "search", "--model", str(model), "--data", str(data),
        "--storage", f"sqlite:///{db}", "--study", study, "--trials", str(trials), "--seeded", "false",
        "--population", "8", "--sparsity-range", "0.3", "0.7", "--eval-windows", "4", "--min-windows", "1",
        "--seq-len", "32", "--calib-samples", "8", "--threads", "1", "--format", "json",
    ]


def in_flight(db: Path, study: str) -> bool:
    try:
        trials = optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials(deepcopy=False)
    except Exception:
        return False
    return any(t.state == TrialState.RUNNING and t.params for t in trials)


def outcome(process: subprocess.Popen) -> dict:
    _, err = process.communicate(timeout=1800)
    lines = err.decode().strip().splitlines()
    return {"exit": process.returncode, "traceback": "Traceback" in err.decode(), "last_line": lines[-1] if lines else ""}


def study_facts(db: Path, study: str) -> dict:
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{db}").trials
    measured = [json.dumps(t.user_attrs["plan"], sort_keys=True) for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "plan" in t.user_attrs]
    return {
        "finished_counted": sum(counts_toward_budget(t) for t in trials),
        "orphaned": sum(t.user_attrs.get("reason") == "orphaned" for t in trials),
        "running_or_waiting": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "plans_measured_twice": len(measured) - len(set(measured)),
    }


def main() -> None:
    arguments = parser(__doc__)
    add_out(arguments)
    args = arguments.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="two-drivers-"))
    model, data = tiny_model(folder)
    env = {**os.environ, "AUTOPRUNE_CACHE": str(folder / "cache"), "TQDM_DISABLE": "1"}
    results = {}
    db = folder / "a.db"
    first = subprocess.Popen(command(model, data, db, "a", 60), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    while not in_flight(db, "a"):
        assert first.poll() is None
        time.sleep(0.05)
    second = subprocess.Popen(command(model, data, db, "a", 60), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    results["A_second_while_first_has_a_trial_in_flight"] = {
        "first": outcome(first), "second": outcome(second), "study": study_facts(db, "a"), "asked": 60,
    }
    db = folder / "b.db"
    first = subprocess.Popen(command(model, data, db, "b", 30), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    second = subprocess.Popen(command(model, data, db, "b", 30), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    results["B_two_drivers_one_second_apart"] = {
        "first": outcome(first), "second": outcome(second), "study": study_facts(db, "b"), "asked": 30,
    }
    db = folder / "c.db"
    warm = "import sys; from autoprune.cli import main; sys.stdin.readline(); sys.exit(main(sys.argv[1:]))"
    second = subprocess.Popen([sys.executable, "-c", warm, *command(model, data, db, "c", 60)[3:]], env=env,
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    first = subprocess.Popen(command(model, data, db, "c", 60), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    while not in_flight(db, "c"):
        assert first.poll() is None
        time.sleep(0.05)
    second.stdin.write(b"go\n")
    second.stdin.flush()  # communicate() closes it
    results["C_warm_second_while_first_has_a_trial_in_flight"] = {
        "first": outcome(first), "second": outcome(second), "study": study_facts(db, "c"), "asked": 60,
    }
    write_results(results, args.out, "two_drivers", markdown(results))
    print(json.dumps(results, indent=1))


#: The table's columns: each scenario's two drivers and what the study holds afterwards.
COLUMNS = [
    column("scenario", "scenario", align="---"), column("trials asked", "asked"),
    Column("exit codes (first, second)", lambda r: f"{r['first']['exit']}, {r['second']['exit']}", "---"),
    Column("traceback", lambda r: r["first"]["traceback"] or r["second"]["traceback"], "---"),
    *(Column(title, lambda r, key=key: r["study"][key]) for title, key in (
        ("finished (counted)", "finished_counted"), ("orphaned", "orphaned"),
        ("running or waiting", "running_or_waiting"), ("plans measured twice", "plans_measured_twice"))),
    Column("second driver's last stderr line", lambda r: r["second"]["last_line"].replace("|", "\\|"), "---"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone."""
    rows = [{"scenario": name, **scenario} for name, scenario in result.items()]
    return "\n".join([
        "# Two `autoprune search` drivers on one SQLite study (issue #24)",
        "",
        "`PYTHONPATH=$PWD python experiments/two_drivers.py`",
        "",
        *table(rows, COLUMNS),
    ]) + "\n"


if __name__ == "__main__":
    main()
