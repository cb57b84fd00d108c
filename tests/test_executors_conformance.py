"""Every executor passes the same contract (as every method and every space passes theirs): it
hands the driver a worker's view of the model; each request submitted comes back from
``results()`` exactly once, measured as the worker measures it (stopped early where its bound says
so) or as a ``failed`` result saying why; ``in_flight`` counts what has not come back, and
``results()`` with nothing in flight returns at once; ``shutdown`` may be called again.
In-process, and Ray on a local cluster (``ray`` marker)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_config

from autoprune import prepare
from autoprune.plan import LayerSpec, Plan
from autoprune.study import Executor, InProcessExecutor, TrialRequest, TrialWorker, WorkerSpec
from search_spaces import SearchSpace, SpaceContext

EXECUTORS = [
    pytest.param("in-process"),
    pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow]),
]
METHOD, RANGE = "wanda", (0.3, 0.7)
#: A plan naming a layer the tiny model does not have: every worker raises on it.
FOREIGN = Plan(method=METHOD, layers={"model.layers.9.mlp.up_proj": LayerSpec(sparsity=0.5)})


@pytest.fixture(scope="module")
def spec(tiny_llama_dir, data_dir, tmp_path_factory) -> WorkerSpec:
    """A worker on the tiny model, its calibration statistics cached before any executor starts
    (two Ray workers never compute them at once)."""
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path_factory.mktemp("executors"),
                         eval_windows=2, threads=1)
    prepare(config.model, config.calibration(), Path(config.cache_dir), False)
    return config.worker_spec()


@pytest.fixture(scope="module")
def local(spec: WorkerSpec) -> tuple[TrialWorker, SpaceContext]:
    """A worker in this process, to say what each executor's workers must measure."""
    worker = TrialWorker(spec, progress=False)
    return worker, worker.space_context(METHOD, RANGE)


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest, spec: WorkerSpec) -> Iterator[Executor]:
    if request.param == "ray":
        from autoprune.study._ray import RayExecutor

        request.getfixturevalue("ray_cluster")
        made: Executor = RayExecutor(spec, workers=2)
    else:
        made = InProcessExecutor(spec, progress=False)
    yield made
    made.shutdown()


def collect(executor: Executor, timeout_s: float = 300) -> list:
    """Every result still to come; each ``results()`` call must return at least one."""
    collected = []
    deadline = time.monotonic() + timeout_s
    while executor.in_flight():
        assert time.monotonic() < deadline, f"{executor.in_flight()} trials never came back"
        finished = executor.results(timeout=timeout_s)
        assert finished, "results() returned nothing while trials were in flight"
        collected += finished
    return collected


def test_every_request_comes_back_once_measured_or_failed(executor, local):
    worker, ctx = local
    view = executor.space_context(METHOD, RANGE)
    assert view is not None and view.layers == ctx.layers
    assert view.dense_linear_params == ctx.dense_linear_params
    uniform = SearchSpace.named("uniform")
    plans = {number: uniform.cast({"target": target}, ctx) for number, target in enumerate((0.3, 0.5, 0.7))}
    requests = [TrialRequest(number, plan) for number, plan in plans.items()]
    requests += [TrialRequest(3, FOREIGN), TrialRequest(4, plans[1], stop_above=0.0)]
    assert executor.capacity >= 1
    for count, request in enumerate(requests, start=1):
        executor.submit(request)
        assert executor.in_flight() <= count
    results = collect(executor)
    assert sorted(result.number for result in results) == [request.number for request in requests]
    by_number = {result.number: result for result in results}
    for number, plan in plans.items():
        measured, expected = by_number[number], worker.run(TrialRequest(number, plan))
        assert measured.status == "complete" and measured.windows == 2
        assert measured.size["linear_nonzeros"] == ctx.nonzeros(plan) == expected.size["linear_nonzeros"]
        assert math.isfinite(measured.ppl) and measured.ppl == pytest.approx(expected.ppl, rel=1e-5)
    failed = by_number[3]
    assert failed.status == "failed" and "model.layers.9.mlp.up_proj" in failed.error, failed.error
    assert "\n" not in failed.error
    stopped = by_number[4]
    assert (stopped.status, stopped.windows) == ("stopped_early", 1)
    assert executor.in_flight() == 0


def test_results_with_nothing_in_flight_return_at_once(executor):
    start = time.monotonic()
    assert executor.results(timeout=30) == [] and executor.in_flight() == 0
    assert time.monotonic() - start < 5


def test_shutdown_may_be_called_again(executor):
    executor.shutdown()
    executor.shutdown()
    assert executor.in_flight() == 0
