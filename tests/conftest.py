"""Shared fixtures and helpers: tiny random-weight models built from a config, a tokenizer trained
on the spot, a synthetic text folder laid out like WikiText-2, the small search every study test
starts from, the finished refine study (built once, copied for each test), a local Ray cluster and
a PostgreSQL database. Nothing here touches a hub or the network.

Test modules import the plain helpers from here (``from conftest import tiny_config``), never from
one another. Markers (registered in pyproject.toml): ``ray`` and ``postgres`` name what a test
starts or needs; ``cuda`` tests are skipped where no CUDA device is present; ``slow`` ones take
tens of seconds alone (``-m "not slow"`` leaves them out)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from autoprune.calibration import LinearStats
from autoprune.cli import main
from autoprune.methods import LayerJob
from autoprune.plan import LayerSpec
from autoprune.study import RefineConfig, SearchConfig, counts_toward_budget, run_search

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

WORDS = (
    "the of and to in a is was for on as with by he at from his an were are which this be or "
    "has had first one their its new after who they two her she been other when there all during "
    "into school time may years more most only over city some world would where later up such used "
    "many can state about national out known university united then made"
).split()


def synthetic_text(seed: int, n_lines: int = 400) -> str:
    """Lines of random words with a skewed distribution, so a model can learn something."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    lines = []
    for _ in range(n_lines):
        length = rng.randint(8, 30)
        lines.append(" ".join(rng.choices(WORDS, weights, k=length)) + " .")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a validation split (calibration) and a test split (evaluation)."""
    folder = tmp_path_factory.mktemp("wikitext-like")
    (folder / "wiki.valid.tokens").write_text(synthetic_text(1))
    (folder / "wiki.test.raw").write_text(synthetic_text(2))
    return folder


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    raw.train_from_iterator([synthetic_text(0)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (SmolLM2's kind: digits split one by one, then GPT-2's split)."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator([synthetic_text(0), " ".join(WORDS)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def gguf_llama_config(vocab_size: int) -> LlamaConfig:
    """A tiny LLaMA shaped like SmolLM2 for GGUF types: rows of 320 (a multiple of 32, not of the
    256 K-quants need) except the FFN's down projection (512 inputs)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=320, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=10, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def tiny_opt_config(vocab_size: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def save_tiny_model(config, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    with torch.random.fork_rng(devices=[]):  # the same weights, whichever test asks first
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return save_tiny_model(
        tiny_llama_config(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-llama")
    )


@pytest.fixture(scope="session")
def gguf_llama_dir(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer) -> Path:
    return save_tiny_model(
        gguf_llama_config(len(bpe_tokenizer)), bpe_tokenizer, tmp_path_factory.mktemp("gguf-llama")
    )


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return save_tiny_model(
        tiny_opt_config(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-opt")
    )


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own calibration cache, so cache hits are never accidental."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(cache))
    return cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``cuda`` tests are skipped, saying why, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    no_device = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(no_device)


# --- The command line ----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``autoprune ARGS`` in this process: exit code, stdout and stderr."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune_args(model: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """``autoprune prune`` flags for a quick prune of a tiny model, reported as JSON."""
    return [
        "prune", "--model", str(model), "--data", str(data_dir), "--calib-samples", "8",
        "--seq-len", "32", "--eval-windows", "4", "--out", str(out), "--format", "json", *extra,
    ]


# --- Pruning methods on synthetic layers -------------------------------------------------------


def make_jobs(seed: int = 0, shapes=((48, 64), (24, 64), (40, 128))) -> list[LayerJob]:
    """Layers with their own statistics; the first two share an input group, as q/k/v do."""
    generator = torch.Generator().manual_seed(seed)
    jobs = []
    inputs: dict[int, LinearStats] = {}
    for index, (rows, cols) in enumerate(shapes):
        if cols not in inputs:
            x = torch.randn(512, cols, generator=generator) * torch.rand(cols, generator=generator)
            inputs[cols] = LinearStats(f"group{cols}", (x * x).sum(0), x.T @ x, 512)
        weight = torch.randn(rows, cols, generator=generator)
        jobs.append(LayerJob(f"layer{index}", weight, inputs[cols], LayerSpec()))
    return jobs


def with_spec(jobs: list[LayerJob], spec: LayerSpec) -> list[LayerJob]:
    """The same layers, every one pruned to ``spec``."""
    return [LayerJob(j.name, j.weight, j.stats, spec) for j in jobs]


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Layer inputs whose features are correlated, as real activations are (where a weight update
    can make up for a pruned one)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    return torch.randn(tokens, width, generator=generator) @ (torch.eye(width) + mixing)


def reconstruction_error(original: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """``||X W^T - X W'^T||^2``: the layer output error the methods minimise."""
    return float(((x @ original.T - x @ pruned.T) ** 2).sum())


# --- Studies ---------------------------------------------------------------------------------------


#: The trials alone: no variant database, no finishing refinement (both on by default, as in the
#: main job). Tests of something else start from these, so that only what they test runs.
TRIALS_ONLY = {"database": False, "refine_targets": []}
#: :data:`TRIALS_ONLY` as ``autoprune search`` flags.
TRIALS_ONLY_FLAGS = ["--database", "false", "--refine-targets"]


def tiny_config(model_dir: Path, data_dir: Path, folder: Path, **overrides) -> SearchConfig:
    """A small search on the tiny model whose study file and cache live in ``folder`` (trials
    only, :data:`TRIALS_ONLY`, unless ``overrides`` say otherwise)."""
    settings = dict(
        model=str(model_dir), data=str(data_dir), storage=f"sqlite:///{folder / 'study.db'}",
        study="tiny", trials=10, population=4, seeded=False, space="layerwise", method="wanda",
        sparsity_range=(0.3, 0.7), eval_windows=3, min_windows=1, seq_len=32, calib_samples=8,
        cache_dir=str(folder / "cache"), **TRIALS_ONLY,
    )
    return SearchConfig(**{**settings, **overrides})


def copy_study_folder(folder: Path, to: Path, config: dict) -> dict:
    """A private copy of ``folder`` (a finished study's file, its calibration cache, whatever else
    it holds) at ``to``, and ``config`` with every path into ``folder`` pointing into the copy; a
    test may then add trials, write files or delete statistics without another test noticing."""
    shutil.copytree(folder, to, dirs_exist_ok=True)
    return {key: value.replace(str(folder), str(to)) if isinstance(value, str) else value
            for key, value in config.items()}


def copy_search(folder: Path, to: Path, config: SearchConfig) -> SearchConfig:
    """:func:`copy_study_folder` for a :class:`SearchConfig`."""
    return SearchConfig(**copy_study_folder(folder, to, config.model_dump()))


REFINE_STUDY = "refine"


class RefineStudy(NamedTuple):
    """A finished SparseGPT study (KL objective) to refine trials of: its folder (``s.db``, the
    calibration cache in ``cache/``) and the search's settings."""

    folder: Path
    config: SearchConfig

    def refine_config(self, **overrides) -> RefineConfig:
        """A short refinement of the study's best trial by KL."""
        study = optuna.load_study(study_name=REFINE_STUDY, storage=self.config.storage)
        complete = (t for t in study.trials if t.state == TrialState.COMPLETE)
        parent = min(complete, key=lambda t: t.values[1])
        settings = dict(storage=self.config.storage, study=REFINE_STUDY, trial=parent.number,
                        generations=6, offspring=3, pool_windows=6, screen_tokens=16,
                        cache_dir=str(self.folder / "cache"))
        return RefineConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def refine_study_source(tiny_llama_dir, data_dir, tmp_path_factory) -> RefineStudy:
    """The refine study, searched once per session; tests get copies (:func:`studied`)."""
    folder = tmp_path_factory.mktemp("refine")
    config = SearchConfig(
        model=str(tiny_llama_dir), data=str(data_dir), storage=f"sqlite:///{folder / 's.db'}",
        study=REFINE_STUDY, trials=6, population=4, seeded=False, space="layerwise",
        method="sparsegpt", sparsity_range=(0.5, 0.7), eval_windows=3, min_windows=1, seq_len=32,
        calib_samples=8, cache_dir=str(folder / "cache"), objective="kl", **TRIALS_ONLY,
    )
    run_search(config, progress=False)
    return RefineStudy(folder, config)


@pytest.fixture
def studied(refine_study_source: RefineStudy, tmp_path: Path) -> RefineStudy:
    """This test's own copy of the refine study: what it adds or deletes, no other test sees."""
    folder = tmp_path / "refine-study"
    source = refine_study_source
    return RefineStudy(folder, copy_search(source.folder, folder, source.config))


# --- Killing and resuming a search ---------------------------------------------------------------

#: Trial states that mean finished.
FINISHED = ("COMPLETE", "PRUNED", "FAIL")

#: The states of study ``:study`` in an Optuna RDB (RUNNING only once its parameters are written),
#: by trial number.
STATES_QUERY = (
    "SELECT CASE WHEN t.state = 'RUNNING' AND NOT EXISTS "
    "(SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id) "
    "THEN 'ASKING' ELSE CAST(t.state AS TEXT) END "
    "FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :study "
    "ORDER BY t.number"
)


#: A short driver heartbeat for tests, so a killed driver's trials are stale (re-queued) after
#: GRACE_S seconds; pass HEARTBEAT in the environment of the search processes.
GRACE_S = 3.0
HEARTBEAT = {"AUTOPRUNE_HEARTBEAT_S": "0.3", "AUTOPRUNE_HEARTBEAT_GRACE_S": str(GRACE_S)}


def kill_mid_trial(
    process: subprocess.Popen, states: Callable[[], list[str] | None], deadline_s: float = 900
) -> None:
    """SIGKILL once >= 2 trials finished while another one runs (see :func:`stop_mid_trial`)."""
    stop_mid_trial(process, states, deadline_s)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def stop_mid_trial(
    process: subprocess.Popen, states: Callable[[], list[str] | None], deadline_s: float = 900
) -> None:
    """SIGSTOP once >= 2 trials finished while another one runs: stop the process first so the
    check and the stop see the same state. A process that ends first fails at once; the deadline
    only bounds a hung one, generously: on a loaded machine (CI, a shared box) a search's start,
    Ray's above all, takes minutes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        if _mid_trial(states()):
            os.kill(process.pid, signal.SIGSTOP)
            if _mid_trial(states()):
                return
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError("the search never had two finished trials and a running one")


def _mid_trial(states: list[str] | None) -> bool:
    return bool(states) and sum(s in FINISHED for s in states) >= 2 and "RUNNING" in states


def assert_resumed(before: list[FrozenTrial], after: list[FrozenTrial], trials: int) -> None:
    """``after`` (the study once the rerun finished) kept what ``before`` (right after the kill) had
    finished, failed and retried once each trial the kill interrupted, and holds no duplicate."""
    orphans = {  # what each interrupted trial was to measure (parameters are written one by one)
        t.number: t.system_attrs.get("fixed_params") or t.params
        for t in before
        if t.state == TrialState.RUNNING
    }
    kept = {t.number: (t.state, t.values, t.params) for t in before if t.state.is_finished()}
    assert orphans and len(kept) >= 2
    assert {t.number: (t.state, t.values, t.params) for t in after if t.number in kept} == kept
    for number, params in orphans.items():
        assert after[number].state == TrialState.FAIL
        assert after[number].user_attrs["reason"] == "orphaned"
        retries = [t for t in after if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and params.items() <= retries[0].params.items()
        assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    complete = [json.dumps(t.params, sort_keys=True) for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == len(set(complete))
    assert sum(counts_toward_budget(t) for t in after) == trials
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]


# --- Ray and PostgreSQL --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A local Ray of 2 CPUs; its files (logs included) in a short folder, since socket paths are
    length-limited. Yields the address drivers in other processes join, and that folder."""
    import ray

    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(folder))
    try:
        yield ray.get_runtime_context().gcs_address, folder
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


#: The variable that names CI's PostgreSQL database, and how to get one.
POSTGRES_ENV = "AUTOPRUNE_TEST_POSTGRES"
POSTGRES_HOW = f'export {POSTGRES_ENV}="$(bash .ci/postgres.sh)"'
#: The password of a throw-away server :func:`postgres_url` starts.
POSTGRES_PASSWORD = "s3cret-Pa55"


def _postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program: on the PATH, else in Debian's versioned folder (newest)."""
    versioned = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return shutil.which(name) or (str(versioned[-1]) if versioned else None)


def _check_answers(dsn: str) -> None:
    """Fail the test, loudly, when the database ``AUTOPRUNE_TEST_POSTGRES`` names does not answer:
    CI set it to have these tests run, so they must not quietly skip."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(dsn)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    engine = create_engine(url, connect_args={"connect_timeout": 10})
    reason = None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # the driver's own error types: all mean "does not answer"
        reason = " ".join(str(error).split("\n")[0].split())[:300]
    finally:
        engine.dispose()
    if reason is not None:
        if url.password:
            reason = reason.replace(url.password, "***")
        shown = make_url(dsn).render_as_string()  # the password masked
        pytest.fail(f"{POSTGRES_ENV} names {shown}, which does not answer ({reason}); "
                    "start it with `bash .ci/postgres.sh`", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[tuple[str, str | None]]:
    """A URL without password of a PostgreSQL database, and the password it wants: CI's (the DSN
    in ``AUTOPRUNE_TEST_POSTGRES``, which must answer), else a throw-away server started here from
    the installed PostgreSQL programs, else the test is skipped saying how to get one."""
    from sqlalchemy.engine import URL, make_url

    given = os.environ.get(POSTGRES_ENV)
    if given:
        _check_answers(given)
        url = make_url(given)  # URL.set(password=None) keeps the password: build one without
        bare = URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
        yield bare.render_as_string(), url.password
        return
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} to a database's DSN ({POSTGRES_HOW} "
                    "installs, starts and prints one) or install the PostgreSQL server programs")
    folder = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    (folder / "pw").write_text(POSTGRES_PASSWORD)
    port = free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    for command in (
        [initdb, "-D", str(folder / "data"), "-U", "autoprune", "--auth=scram-sha-256",
         f"--pwfile={folder / 'pw'}", "--no-sync"],
        [pg_ctl, "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"), "-w", "start"],
    ):
        done = subprocess.run([*as_user, *command], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.fail(f"cannot start a throw-away PostgreSQL server ({Path(command[0]).name}: "
                        f"{done.stderr.strip()[-300:]}); or use one: {POSTGRES_HOW}", pytrace=False)
    try:
        yield f"postgresql://autoprune@127.0.0.1:{port}/postgres", POSTGRES_PASSWORD
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
