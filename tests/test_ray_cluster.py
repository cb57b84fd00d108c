"""Searches on a real local Ray cluster (2 CPUs, no GPU) and a real PostgreSQL server: a worker
killed mid-trial, a worker that keeps dying or runs out of memory, candidates whose loss is NaN or
inf, the driver SIGKILLed and resumed, and a storage password that shows up nowhere (output, logs,
Ray's job table, recipes, exports, study attributes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import optuna
import pytest
import ray
import ray.cloudpickle
import torch
from conftest import GRACE_S, HEARTBEAT, STATES_QUERY, TRIALS_ONLY_FLAGS, assert_resumed, free_port, kill_mid_trial, tiny_config
from optuna.trial import TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from autoprune.cli import main
from autoprune.study import (
    PASSWORD_ENV,
    PASSWORD_FILE_ENV,
    SearchConfig,
    TrialRequest,
    TrialResult,
    TrialWorker,
    WorkerSpec,
    counts_toward_budget,
    load_existing_study,
    run_search,
)
from autoprune.study._ray import RayExecutor
from search_spaces import SearchSpace

# The workers below are defined here, a module Ray's worker processes cannot import: ship them whole.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRIALS = 8
STALLED = 3  # stalls the first time it runs, until the test kills its worker
DIES = 4  # kills its own worker every time it runs
OOM = 5  # runs out of memory the first time it runs
COLLAPSES = {1: float("nan"), 2: float("inf")}  # its model's output layer filled with this value


def tiny_search(model_dir: Path, data_dir: Path, tmp_path: Path, **overrides) -> SearchConfig:
    """The conftest's tiny search on 2 validation windows, its workers on one thread each."""
    settings = dict(study="ray", trials=TRIALS, eval_windows=2, threads=1)
    return tiny_config(model_dir, data_dir, tmp_path, **{**settings, **overrides})


def cli_args(config: SearchConfig, storage: str) -> list[str]:
    """``autoprune search`` flags for ``config`` on the test cluster, with ``storage`` as given."""
    flags = ["search", "--storage", storage, "--executor", "ray", "--workers", "2", "--format", "json"]
    for name in ("model", "data", "study", "trials", "space", "method", "population", "eval_windows",
                 "min_windows", "seq_len", "calib_samples", "threads", "seeded", "cache_dir"):
        flags += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    return flags + ["--sparsity-range", *map(str, config.sparsity_range), *TRIALS_ONLY_FLAGS]


class Faulty(TrialWorker):
    """Measures as usual, except for five trials. The first time trial ``STALLED`` comes, it
    publishes its pid in ``folder`` and stalls, so the test can kill it mid-trial; trial ``DIES``
    kills its own process every time; the first time trial ``OOM`` comes, it raises the error CUDA
    raises when out of memory; the trials in ``COLLAPSES`` are measured with the output layer
    poisoned, so their losses are NaN or inf."""

    def __init__(self, spec: WorkerSpec, folder: str) -> None:
        super().__init__(spec)
        self.stalled, self.oom = Path(folder) / "stalled.pid", Path(folder) / "oom"

    def run(self, request: TrialRequest) -> TrialResult:
        if request.number == STALLED and not self.stalled.exists():
            staging = self.stalled.with_suffix(".partial")
            staging.write_text(str(os.getpid()))
            staging.rename(self.stalled)
            time.sleep(120)
        if request.number == DIES:
            os.kill(os.getpid(), signal.SIGKILL)
        if request.number == OOM and not self.oom.exists():
            self.oom.touch()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if request.number in COLLAPSES:
            weight = self.loaded.model.get_output_embeddings().weight
            dense = weight.detach().clone()
            weight.data.fill_(COLLAPSES[request.number])
            try:
                return super().run(request)
            finally:
                weight.data.copy_(dense)
        return super().run(request)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_killed_or_out_of_memory_retry_then_fail_and_collapsed_models_are_recorded(
    ray_cluster, tiny_llama_dir, data_dir, tmp_path
):
    stalled, killed, search_over = tmp_path / "stalled.pid", [], threading.Event()

    def kill_the_stalled_worker() -> None:
        # No wall-clock deadline: on a loaded machine Ray may take minutes to reach the trial.
        while not stalled.exists() and not search_over.is_set():
            time.sleep(0.02)
        if stalled.exists():
            killed.append(int(stalled.read_text()))
            os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_stalled_worker, daemon=True)
    killer.start()
    config = tiny_search(tiny_llama_dir, data_dir, tmp_path)
    factory = partial(Faulty, folder=str(tmp_path))
    executor = RayExecutor(config.worker_spec(), workers=2, max_retries=1, factory=factory)
    try:
        summary = run_search(config, executor=executor, progress=False)
    finally:
        search_over.set()
        executor.shutdown()
    killer.join(timeout=1)
    assert killed and killed[0] != os.getpid()

    trials = optuna.load_study(study_name=config.study, storage=config.storage).trials
    assert summary.finished == sum(counts_toward_budget(t) for t in trials) == TRIALS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number in (STALLED, OOM):  # retried once on a fresh worker, then measured
        assert trials[number].state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert trials[number].user_attrs["retries"] == 1 and trials[number].user_attrs["ppl"]
    died = trials[DIES]  # retried once, died again: failed with the reason
    assert died.state == TrialState.FAIL and died.user_attrs["status"] == "failed"
    assert died.user_attrs["reason"].startswith("worker died: ")
    assert died.user_attrs["reason"].endswith("(2 attempts)") and died.user_attrs["retries"] == 1
    for number in COLLAPSES:  # measured once, recorded as collapsed, kept off the front
        collapsed = trials[number]
        assert collapsed.state == TrialState.FAIL and collapsed.user_attrs["retries"] == 0
        assert collapsed.user_attrs["status"] == collapsed.user_attrs["reason"] == "collapsed"
        assert collapsed.user_attrs["ppl"] is None and collapsed.user_attrs["windows"] == 1
    assert summary.front and set(COLLAPSES).isdisjoint(row["trial"] for row in summary.front)
    others = [t for t in trials if t.number not in (STALLED, DIES, OOM, *COLLAPSES)]
    assert all(t.user_attrs.get("retries", 0) == 0 for t in others)  # duplicates never ran


@pytest.mark.ray
@pytest.mark.slow
def test_a_retried_trial_comes_back_from_the_same_results_call(ray_cluster, tiny_llama_dir, data_dir, tmp_path):
    """``results()`` waits for at least one result: a trial whose worker had to be replaced goes
    back to the queue, and the same call waits on for its retry rather than returning nothing."""
    config = tiny_search(tiny_llama_dir, data_dir, tmp_path)
    factory = partial(Faulty, folder=str(tmp_path))
    executor = RayExecutor(config.worker_spec(), workers=1, max_retries=1, factory=factory)
    try:
        context = executor.space_context(config.method, config.sparsity_range)
        plan = SearchSpace.named("uniform").cast({"target": 0.5}, context)
        executor.submit(TrialRequest(OOM, plan))
        finished = executor.results(timeout=300)
    finally:
        executor.shutdown()
    assert [(result.number, result.status, result.retries) for result in finished] == [(OOM, "complete", 1)]
    assert executor.in_flight() == 0


@pytest.mark.ray
@pytest.mark.postgres
@pytest.mark.slow
def test_ray_search_on_postgres_resumes_after_driver_sigkill_and_never_shows_the_password(
    ray_cluster, postgres_url, tiny_llama_dir, data_dir, tmp_path, capsys, monkeypatch
):
    """The first driver joins the cluster by HOST:PORT, reads the password from a file (as the
    cluster guide says) and is killed; the second joins by ``auto`` as a ``ray job submit`` driver
    does (``RAY_ADDRESS`` set) and has the password in the URL. Neither the outputs, nor Ray's logs
    or job table, nor the study, nor an export holds it."""
    address, ray_folder = ray_cluster
    url, password = postgres_url
    assert password, "the test database must want a password"
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    secret_url = make_url(url).set(password=password).render_as_string(hide_password=False)
    config = tiny_search(tiny_llama_dir, data_dir, tmp_path, study=f"ray-pg-{time.time_ns()}",
                         trials=10)
    (tmp_path / "pw").write_text(password + "\n")
    env = {**os.environ, PASSWORD_FILE_ENV: str(tmp_path / "pw"), "TQDM_DISABLE": "1", **HEARTBEAT}

    def driver(storage: str, ray_address: str) -> list[str]:
        return [sys.executable, "-m", "autoprune", *cli_args(config, storage), "--ray-address", ray_address]

    engine = create_engine(make_url(secret_url).set(drivername="postgresql+psycopg2"))

    def states() -> list[str] | None:
        try:
            with engine.connect() as connection:
                rows = connection.execute(text(STATES_QUERY), {"study": config.study})
                return [str(row[0]) for row in rows]
        except SQLAlchemyError:
            return None

    process = subprocess.Popen(driver(url, address), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_mid_trial(process, states)
    storage = optuna.storages.RDBStorage(engine.url.render_as_string(hide_password=False))
    before = optuna.load_study(study_name=config.study, storage=storage).trials
    shown = [process.stdout.read().decode(), process.stderr.read().decode()]
    time.sleep(GRACE_S)  # the killed driver's heartbeat goes stale: only then is it taken over

    rerun = subprocess.run(driver(secret_url, "auto"), capture_output=True, text=True, timeout=300,
                           env={**env, PASSWORD_FILE_ENV: "", "RAY_ADDRESS": address})
    shown += [rerun.stdout, rerun.stderr]
    assert rerun.returncode == 0, rerun.stderr[-2000:].replace(password, "<leaked>")
    assert "re-queued" in rerun.stderr and ":***@" in rerun.stderr  # the summary, masked
    assert_resumed(before, optuna.load_study(study_name=config.study, storage=storage).trials, 10)
    engine.dispose()

    front = json.loads(_cli(capsys, shown, "front", "--storage", secret_url, "--study", config.study,
                            "--format", "json"))
    out = tmp_path / "export"
    _cli(capsys, shown, "export", "--storage", secret_url, "--study", config.study, "--trial",
         str(front[0]["trial"]), "--out", str(out), "--cache-dir", config.cache_dir)
    study_id = storage.get_study_id_from_name(config.study)
    study = load_existing_study(secret_url, config.study)
    shown.append(json.dumps(
        [study.user_attrs, storage.get_study_system_attrs(study_id)]
        + [[t.user_attrs, t.system_attrs] for t in study.trials], default=str
    ))
    assert "postgresql" not in shown[-1]
    # What Ray keeps of each driver (its command line among it), as `ray list jobs` shows it.
    jobs = json.dumps(ray._private.state.jobs(), default=str)
    assert "--storage postgresql://autoprune:***@" in jobs
    shown.append(jobs)
    files = [path for root in (out, ray_folder) for path in root.rglob("*") if path.is_file()]
    assert (out / "recipe.yaml") in files and any("logs" in path.parts for path in files)
    leaks = [str(path) for path in files if password.encode() in path.read_bytes()]
    leaks += [f"output {i}" for i, printed in enumerate(shown) if password in printed]
    assert not leaks


@pytest.mark.slow
@pytest.mark.ray
def test_ray_address_that_does_not_answer_is_a_one_line_error(tiny_llama_dir, data_dir, tmp_path):
    """At once, where Ray alone would retry it for many minutes."""
    address = f"127.0.0.1:{free_port()}"
    search = subprocess.run(
        [sys.executable, "-m", "autoprune", "search", "--executor", "ray", "--ray-address", address,
         "--model", str(tiny_llama_dir), "--data", str(data_dir), "--storage", str(tmp_path / "s.db")],
        capture_output=True, text=True, timeout=300,
    )
    assert search.returncode == 2
    assert search.stderr == f"autoprune: error: cannot connect to Ray at {address}: Connection refused\n"


@pytest.mark.postgres
def test_postgres_password_never_in_errors(postgres_url, capsys, tmp_path, monkeypatch):
    """An unreachable database, a wrong password, a missing password file: one line each, masked."""
    url, password = postgres_url
    assert password, "the test database must want a password"
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    closed = f"postgresql://autoprune:{password}@127.0.0.1:{free_port()}/nowhere"
    shown: list[str] = []
    _cli(capsys, shown, "front", "--storage", closed, "--study", "x", code=2)
    assert "cannot open storage postgresql://autoprune:***@127.0.0.1:" in shown[-1]
    wrong = make_url(url).set(password=password[::-1]).render_as_string(hide_password=False)
    _cli(capsys, shown, "front", "--storage", wrong, "--study", "x", code=2)
    assert "password authentication failed" in shown[-1]
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "missing"))
    _cli(capsys, shown, "front", "--storage", url, "--study", "x", code=2)
    assert f"{PASSWORD_FILE_ENV}: cannot read {tmp_path / 'missing'}" in shown[-1]
    config = SearchConfig(storage=closed)
    shown += [repr(config), str(config)]
    assert not [printed for printed in shown if password in printed or password[::-1] in printed]


def _cli(capsys, shown: list[str], *argv: str, code: int = 0) -> str:
    """Run ``autoprune ARGV`` here, keep what it printed in ``shown``; its stdout."""
    assert main(list(argv)) == code
    printed = capsys.readouterr()
    shown += [printed.out, printed.err]
    return printed.out
