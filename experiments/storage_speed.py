"""The driver's storage writes per trial: a SQLite file in Optuna's default mode against the
write-ahead mode ``autoprune search`` puts it in, and a journal file.

A search's driver asks Optuna for a trial, records the plan and the worker's results as user
attributes and tells the result; with Optuna's RDB storage each suggested parameter and each
attribute is its own commit. This replays what one SmolLM2 layer-wise trial writes (38 parameters,
18 attributes, among them its ~16 KB plan: counted in ``runs/search_vs_baselines.db``) with a
random sampler, so the time is the storage's alone, and alternates the storages round by round so
a busy disk slows each of them alike. Writes ``results/storage_speed.json`` and ``.md``.

    python experiments/storage_speed.py [--rounds 5] [--trials 10]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import BaseStorage, RDBStorage

from _common import Column, add_out, apply_threads, column, parser, table, write_results
from autoprune.study import open_storage, opened_storage, write_ahead

PARAMETERS = 38
LAYERS = 210  # SmolLM2: 30 blocks x 7 projections
SCALARS = ("driver", "expected_nonzeros", "kl", "ppl", "predicted_ppl", "proposed", "quality",
           "retries", "screen_pick", "screened", "status", "stop_above", "windows", "worker")


@contextmanager
def optuna_default(path: Path) -> Iterator[BaseStorage]:
    storage = RDBStorage(f"sqlite:///{path}")
    try:
        yield storage
    finally:
        storage.engine.dispose()


@contextmanager
def autoprune_search(path: Path) -> Iterator[BaseStorage]:
    with opened_storage(str(path), create=True) as storage:
        write_ahead(storage)
        yield storage


@contextmanager
def journal_file(path: Path) -> Iterator[BaseStorage]:
    yield open_storage(f"journal://{path}.log", create=True)


STORAGES: dict[str, Callable[[Path], AbstractContextManager[BaseStorage]]] = {
    "SQLite, Optuna's default (rollback journal)": optuna_default,
    "SQLite, as autoprune search opens it (write-ahead log)": autoprune_search,
    "journal file": journal_file,
}


def one_trial(study: optuna.Study, number: int) -> float:
    """Seconds to ask, record and tell one trial shaped like a SmolLM2 layer-wise trial."""
    distributions = {f"p{i}": FloatDistribution(-1.0, 1.0) for i in range(PARAMETERS)}
    plan = {"method": "sparsegpt", "layers": {
        f"model.layers.{i // 7}.proj_{i % 7}": {"sparsity": 0.6 + i / 1e4, "nm": None} for i in range(LAYERS)
    }}
    start = time.perf_counter()
    trial = study.ask(distributions)
    trial.set_user_attr("plan", plan)
    trial.set_user_attr("plan_summary", {"method": "sparsegpt", "mean_layer_sparsity": 0.6})
    for key in SCALARS:
        trial.set_user_attr(key, number)
    trial.set_user_attr("size", {"linear_nonzeros": 42_467_328, "sparsity": 0.6, "bytes_dense": 1})
    trial.set_user_attr("seconds", {"prune": 5.0, "evaluate": 20.0, "bookkeeping": 0.3})
    study.tell(trial, [float(number), 1.0])
    return time.perf_counter() - start


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--rounds", type=int, default=5)
    arguments.add_argument("--trials", type=int, default=10, help="trials per storage and round")
    add_out(arguments)
    args = arguments.parse_args()
    apply_threads(args)

    seconds: dict[str, list[float]] = {name: [] for name in STORAGES}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for index, (name, opened) in enumerate(STORAGES.items()):
                with opened(Path(folder) / f"s{index}.db") as storage:
                    study = optuna.create_study(
                        storage=storage, study_name="s", directions=["minimize", "minimize"],
                        sampler=optuna.samplers.RandomSampler(seed=round_), load_if_exists=True,
                    )
                    seconds[name] += [one_trial(study, n) for n in range(args.trials)]
    rows = [{"storage": name, "trials": len(times), "median_s": statistics.median(times),
             "mean_s": statistics.fmean(times)} for name, times in seconds.items()]
    default = rows[0]["median_s"]
    for row in rows:
        row["speedup_vs_default"] = default / row["median_s"]
    result = {"rows": rows, "rounds": args.rounds, "trials": args.trials}
    print(write_results(result, args.out, "storage_speed", markdown(result)), end="")


def markdown(result: dict) -> str:
    """The median and mean seconds per trial of each storage."""
    columns = [
        column("storage", "storage", align="---"), column("trials", "trials"),
        column("median s/trial", "median_s", ".4f"), column("mean s/trial", "mean_s", ".4f"),
        Column("vs Optuna's default", lambda row: f"{row['speedup_vs_default']:.1f}x"),
    ]
    lines = [
        f"Storage writes of one SmolLM2 layer-wise trial ({PARAMETERS} parameters, "
        f"{len(SCALARS) + 4} attributes), {result['rounds']} rounds of {result['trials']} trials per "
        "storage, alternating.",
        "",
        *table(result["rows"], columns),
    ]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
