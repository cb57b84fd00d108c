"""Orchestration overhead and scaling of the Ray executor with 1, 2, 4 and 8 workers.

Every run is a real search (Optuna ask/tell driver, NSGA-II, the layer-wise space, a journal-file
storage by default) on a local Ray cluster sized to this machine's cores. Two kinds of trials:

- ``real``: the workers prune and evaluate a tiny random-weight Llama (6 blocks, hidden 256, a
  word-level tokenizer trained here on the data), one torch thread each, one CPU reserved each; only
  as many workers as there are cores, since more would measure CPU contention, not Ray;
- ``sleep``: each trial is a fixed ``--sleep`` seconds in the worker (a :class:`SleepWorker`, which
  loads the same model so the driver gets a real search-space context but never touches it in a
  trial), so any throughput lost between 1 and 8 workers is orchestration: the driver's ask/tell and
  storage writes, Ray's task round trips. Eight such workers share the cores (fractional CPUs).

Each configuration first warms its workers up (one trial each in a throw-away study, so every actor
has loaded the model), then runs ``--rounds`` trials per worker in a fresh study. Throughput is
measured in steady state: after the first round every ask waits for a finished trial, so it is the
asks per minute from the ``workers``-th ask to the last one; efficiency is throughput over
``workers`` times the 1-worker throughput; overhead per trial is how long a worker slot spends per
trial beyond the trial itself (the sleep, or the worker's measured prune + evaluate time).

The driver asks, records and tells every trial itself, one storage write per parameter and per
attribute, so its time per trial caps any search at 60 / that many trials per minute however many
workers there are. The last table measures that ceiling per storage (one worker, trials that sleep
0 s): SQLite and journal files here, and PostgreSQL when ``--postgres URL`` names a database
(password from ``AUTOPRUNE_STORAGE_PASSWORD``). Writes ``results/ray_scaling.json`` and
``results/ray_scaling.md``.

    python experiments/ray_scaling.py [--workers 1 2 4 8] [--sleep 3] [--rounds 8]
        [--storage journal|sqlite|URL] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import optuna
import ray
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from _common import (
    DEFAULT_DATA,
    Column,
    add_out,
    apply_threads,
    column,
    table,
    write_results,
)
from _common import parser as parser_for

from autoprune.study import (
    SearchConfig,
    TrialRequest,
    TrialResult,
    TrialWorker,
    WorkerSpec,
    open_storage,
    run_search,
)
from autoprune.study._ray import RayExecutor

CORES = os.cpu_count() or 1
#: The scaling table and the driver's ceiling per storage.
ROW_COLUMNS = [
    column("trials", "kind", align="---"), column("workers", "workers"),
    column("CPUs each", "cpus_per_worker", "g"), column("trials/min", "trials_per_min", ".1f"),
    Column("speedup", lambda row: f"{row['speedup']:.2f}x"),
    Column("efficiency", lambda row: f"{100 * row['efficiency']:.0f}%"),
    column("trial s", "trial_s", ".3f"), column("overhead s/trial", "overhead_per_trial_s", ".3f"),
    column("bookkeeping s/trial", "bookkeeping_s_per_trial", ".3f"),
]
CEILING_COLUMNS = [
    column("storage", "storage", align="---"), column("trials", "trials"),
    Column("driver s/trial", lambda row: f"{60 / row['trials_per_min']:.3f}"),
    column("ceiling trials/min", "trials_per_min", ".0f"),
]


class SleepWorker(TrialWorker):
    """A loaded worker whose trials only sleep: a complete result sized from the plan's shapes, with
    a made-up perplexity that rises with sparsity, after ``seconds``."""

    def __init__(self, spec: WorkerSpec, seconds: float) -> None:
        super().__init__(spec)
        self.seconds = seconds
        self.ctx = self.space_context("wanda", (0.0, 0.9))  # shapes only; method and range unused

    def run(self, request: TrialRequest) -> TrialResult:
        time.sleep(self.seconds)
        nonzeros = self.ctx.nonzeros(request.plan)
        sparsity = 1 - nonzeros / self.ctx.dense_linear_params
        ppl = 10.0 / (1.0 - sparsity)
        size = {"linear_nonzeros": nonzeros, "sparsity": sparsity}
        timings = {"prune": 0.0, "evaluate": self.seconds, "bookkeeping": 0.0, "total": self.seconds}
        return TrialResult(
            request.number, "complete", ppl, ppl, windows=len(self.windows), size=size, seconds=timings
        )


def tiny_model(folder: Path, data: Path) -> Path:
    """A random-weight Llama small enough that several copies fit any machine."""
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"])
    raw.train([str(data / "wiki.valid.tokens")], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def storage_url(name: str, tmp: Path, run: str) -> str:
    """``journal`` and ``sqlite`` name a new file per run; anything else is a database URL."""
    files = {"journal": f"journal://{tmp}/{run}.log", "sqlite": f"sqlite:///{tmp}/{run}.db"}
    return files.get(name, name)


def measure(
    kind: str,
    workers: int,
    sleep: float,
    rounds: int,
    storage: str,
    model: Path,
    args: argparse.Namespace,
) -> dict:
    """One configuration: warm-up, then ``rounds`` trials per worker; throughput and overheads."""
    run = f"{kind}-{workers}-{sleep:g}s-{time.time_ns()}"  # unique: a database holds many studies
    config = SearchConfig(
        model=str(model), data=str(args.data), storage=storage_url(storage, model.parent, run),
        study=f"{run}-warm-up", trials=workers, space="layerwise", seeded=False, population=8,
        seq_len=args.seq_len, calib_samples=16, eval_windows=args.eval_windows, min_windows=1,
        early_stop_margin=None, threads=1, cache_dir=str(model.parent / "cache"),
        database=False, refine_targets=[],  # trials alone: what is timed
    )
    factory = partial(SleepWorker, seconds=sleep) if kind == "sleep" else TrialWorker
    cpus = 1.0 if kind == "real" else min(1.0, CORES / workers)
    executor = RayExecutor(config.worker_spec(), workers, cpus_per_worker=cpus, factory=factory)
    try:
        run_search(config, executor=executor, progress=False)  # one trial per actor: all loaded
        config = config.model_copy(update={"study": run, "trials": rounds * workers})
        run_search(config, executor=executor, progress=False)
    finally:
        executor.shutdown()
    opened = open_storage(config.storage)
    ran = [t for t in optuna.load_study(study_name=run, storage=opened).trials if "worker" in t.user_attrs]
    for name in (f"{run}-warm-up", run):  # leave a shared database as it was
        optuna.delete_study(study_name=name, storage=opened)
    # Every ask after the first round waits for a finished trial, so asks per second from the
    # workers-th to the last measure throughput free of the start-up ramp and the last stragglers.
    asks = sorted(t.datetime_start for t in ran)
    span = (asks[-1] - asks[workers - 1]).total_seconds()
    rate = (len(ran) - workers) / span
    seconds = [t.user_attrs["seconds"] for t in ran]
    trial_seconds = statistics.fmean(s["prune"] + s["evaluate"] for s in seconds)
    return {
        "kind": kind,
        "storage": storage.split(":")[0],  # journal, sqlite, or a database URL's scheme
        "workers": workers,
        "cpus_per_worker": cpus,
        "trials": len(ran),
        "span_s": round(span, 2),
        "trials_per_min": round(60 * rate, 2),
        "trial_s": round(trial_seconds, 3),
        "overhead_per_trial_s": round(workers / rate - trial_seconds, 3),
        "bookkeeping_s_per_trial": round(statistics.fmean(s["bookkeeping"] for s in seconds), 3),
    }


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds per sleep trial")
    parser.add_argument("--rounds", type=int, default=8, help="measured trials per worker")
    parser.add_argument("--ceiling-trials", type=int, default=20, help="trials per ceiling run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--storage", default="journal", help="journal, sqlite or a database URL")
    parser.add_argument("--postgres", help="also measure the driver's ceiling on this database")
    add_out(parser)
    args = parser.parse_args()
    apply_threads(args)

    start, load = time.perf_counter(), round(os.getloadavg()[0], 2)
    ray.init(address="local", num_cpus=CORES, include_dashboard=False, log_to_driver=False)
    rows, ceilings = [], []
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(Path(folder) / "tiny-llama", args.data)
        for kind, counts in (("real", [w for w in args.workers if w <= CORES]), ("sleep", args.workers)):
            for workers in counts:
                rows.append(measure(kind, workers, args.sleep, args.rounds, args.storage, model, args))
                print(json.dumps(rows[-1]), flush=True)
        for storage in ["sqlite", "journal"] + ([args.postgres] if args.postgres else []):
            ceilings.append(measure("sleep", 1, 0.0, args.ceiling_trials, storage, model, args))
            print(json.dumps(ceilings[-1]), flush=True)
    ray.shutdown()
    for row in rows:
        one = next(r for r in rows if r["kind"] == row["kind"] and r["workers"] == 1)
        row["speedup"] = round(row["trials_per_min"] / one["trials_per_min"], 2)
        row["efficiency"] = round(row["speedup"] / row["workers"], 3)
    result = {
        "cores": CORES,
        "load_average_1min": [load, round(os.getloadavg()[0], 2)],  # other jobs on the machine
        "ray": ray.__version__,
        "sleep_s": args.sleep,
        "rounds": args.rounds,
        "seq_len": args.seq_len,
        "eval_windows": args.eval_windows,
        "storage": args.storage,
        "rows": rows,
        "driver_ceiling": ceilings,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(write_results(result, args.out, "ray_scaling", markdown(result)), end="")


def markdown(result: dict) -> str:
    lines = [
        f"Local Ray {result['ray']} cluster on {result['cores']} cores (1-minute load average "
        f"{result['load_average_1min'][0]:g} at the start, {result['load_average_1min'][1]:g} at the end), "
        f"{result['storage']} storage; "
        f"each configuration runs {result['rounds']} trials per worker after a warm-up (NSGA-II); "
        "trials/min in steady state (asks after the first round, each waiting for a finished trial). "
        f"`sleep` trials are a fixed {result['sleep_s']:g} s in the worker; `real` trials prune "
        f"(Wanda) and evaluate a tiny random-weight Llama on {result['eval_windows']} windows of "
        f"{result['seq_len']} tokens. Overhead: worker-slot time per trial beyond the trial itself "
        "(prune + evaluate, or the sleep); bookkeeping: the size measurement (real trials) plus the "
        "driver's ask/record time, per trial.",
        "",
        *table(result["rows"], ROW_COLUMNS),
    ]
    lines += [
        "",
        "The driver's ceiling: one worker, trials that sleep 0 s; every second per trial is the "
        "driver's ask/record/tell and Ray's round trip, so no number of workers gets past these "
        "trials per minute on that storage.",
        "",
        *table(result["driver_ceiling"], CEILING_COLUMNS),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
