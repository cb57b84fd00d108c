"""Latency measured for real, and a latency table that prices a sub-network without building it.

Two timings, as a user meets them: **prefill** (batch 1, ``seq_len`` prompt tokens, logits for the
last position only, as generation computes them) and **decode** (milliseconds per new token,
batch 1, with a KV cache after a ``prompt_len``-token prompt).

On a CPU that other processes share, the same forward's time varies by tens of percent from one
second to the next, and not because the process waits for a core: it runs slower while others
contend for the memory system and the host. Such disturbances only ever add time, so a timing is
the lower quartile of many samples (:func:`estimate`), and models compared with each other are
timed **interleaved** (each round times every model in turn; decode steps the models one token at
a time), so that they see the same load.

The table (ZipLM's idea, fitted rather than tabulated) is measured once per device and model
family and cached on disk. Random-weight probe models of the family with varied depth, heads, KV
groups, FFN widths and dropped sub-blocks are timed interleaved, and a linear cost model is fitted
to their end-to-end timings by non-negative least squares on relative error: a fixed part
(embeddings, final norm, ``lm_head`` at one position, the forward's own overhead), a cost per
block, per attention sub-block, per query head, per KV head, per MLP sub-block and per FFN
channel. Fitting whole-model timings prices what per-sub-block slopes miss (the per-layer Python
overhead of decode, the cache behaviour of a model of realistic depth), and every probe informs
every coefficient, so one noisy timing does not decide a cell. Pricing a candidate is a dot
product: microseconds.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from autoprune._atomic import write_text_atomic
from autoprune.calibration import default_cache_dir
from autoprune.export import dtype_name
from autoprune.models import LoadedModel
from autoprune.structure import BlockShape, ModelDims, subnet_config
from autoprune.models.remote.modeling_subnet_llama import SubnetLlamaForCausalLM

#: Version 1 held per-cell slopes; version 2 holds the probes' timings the cost model is fitted to.
TABLE_FORMAT_VERSION = 2

#: The cost model's terms, in the order of :func:`shape_features`.
FEATURES = ("fixed", "blocks", "attention", "heads", "kv_heads", "mlp", "ffn")


@dataclass(frozen=True)
class LatencySettings:
    """What a timing means: prompt lengths, repeats (rounds), the CPU threads torch uses, and the
    dtype the weights and activations are in: the one an export's files load as, since a user's
    ``from_pretrained`` computes in it, and bf16 shrinks the matmuls' time more than the fixed
    costs (a ratio to the dense model priced in float32 is not the ratio a bf16 file shows)."""

    seq_len: int = 512
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 8
    threads: int = 1
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Timing:
    """Milliseconds: one prefill, and one decoded token."""

    prefill_ms: float
    decode_ms: float


def _ids(model: PreTrainedModel, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator)


@torch.inference_mode()
def _prefill_once(model: PreTrainedModel, settings: LatencySettings) -> float:
    ids = _ids(model, settings.seq_len)
    start = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return (time.perf_counter() - start) * 1000


@torch.inference_mode()
def _decode_round(models: Sequence[PreTrainedModel], settings: LatencySettings, tokens: int) -> list[list[float]]:
    """Milliseconds of each of ``tokens`` greedy new tokens per model (KV cache after an untimed
    ``prompt_len``-token prompt), the models stepping in turn one token at a time."""
    caches = [DynamicCache(config=model.config) for model in models]
    logits = [
        model(_ids(model, settings.prompt_len), cache=cache, use_cache=True, logits_to_keep=1).logits
        for model, cache in zip(models, caches)
    ]
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(tokens):
        for index, (model, cache) in enumerate(zip(models, caches)):
            token = logits[index][:, -1:].argmax(-1)
            start = time.perf_counter()
            logits[index] = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits
            samples[index].append((time.perf_counter() - start) * 1000)
    return samples


def estimate(samples: Sequence[float]) -> float:
    """The timing a set of samples stands for: their lower quartile. Other processes on a shared
    CPU only ever add time, in bursts, so the upper samples spread far and the lower ones stay
    close to the undisturbed time; the quartile rather than the minimum, so that no single lucky
    sample decides."""
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 4]


def prefill_ms(model: PreTrainedModel, settings: LatencySettings) -> float:
    """Batch-1 forward of ``seq_len`` tokens keeping last-position logits (:func:`estimate` of
    ``repeats`` samples)."""
    return measure(model, settings, decode=False).prefill_ms


def decode_ms(model: PreTrainedModel, settings: LatencySettings) -> float:
    """One new token, greedy, KV cache, batch 1 (:func:`estimate` of ``repeats`` x
    ``new_tokens`` samples)."""
    return measure(model, settings, prefill=False).decode_ms


def measure(
    model: PreTrainedModel, settings: LatencySettings, prefill: bool = True, decode: bool = True
) -> Timing:
    """End-to-end prefill and decode timings of ``model`` with ``settings.threads`` threads (a
    timing not asked for is 0)."""
    return measure_interleaved([model], settings, prefill, decode)[0]


def measure_interleaved(
    models: Sequence[PreTrainedModel], settings: LatencySettings, prefill: bool = True, decode: bool = True
) -> list[Timing]:
    """Timings of ``models`` measured in ``settings.repeats`` rounds after one warm-up of each:
    a round times every model's prefill in turn, then decodes ``new_tokens`` tokens with all of
    them, one token of each in turn; so that models timed together see the same load of a shared
    machine. Each timing is the :func:`estimate` of its samples."""
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    prefills: list[list[float]] = [[] for _ in models]
    decodes: list[list[float]] = [[] for _ in models]
    try:
        for model in models:
            if prefill:
                _prefill_once(model, settings)
        if decode:
            _decode_round(models, settings, 2)
        for _ in range(settings.repeats):
            for model, samples in zip(models, prefills):
                if prefill:
                    samples.append(_prefill_once(model, settings))
            if decode:
                for samples, new in zip(decodes, _decode_round(models, settings, settings.new_tokens)):
                    samples.extend(new)
    finally:
        torch.set_num_threads(previous)
    return [Timing(estimate(p) if p else 0.0, estimate(d) if d else 0.0) for p, d in zip(prefills, decodes)]


def shape_features(shapes: Sequence[BlockShape | None]) -> list[float]:
    """The cost model's inputs for blocks of ``shapes`` (None: removed), in :data:`FEATURES` order."""
    totals = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    for shape in shapes:
        if shape is None:
            continue
        totals[1] += 1
        if shape.heads:
            totals[2] += 1
            totals[3] += shape.heads
            totals[4] += shape.kv_groups
        if shape.ffn:
            totals[5] += 1
            totals[6] += shape.ffn
    return totals


@dataclass(frozen=True)
class Probe:
    """A probe model's blocks and its measured timing."""

    shapes: tuple[BlockShape, ...]
    timing: Timing


@dataclass(eq=False)
class LatencyTable:
    """The probes' timings and the cost model fitted to them (prefill and decode coefficients per
    term of :data:`FEATURES`, in milliseconds)."""

    key: str
    settings: LatencySettings
    probes: list[Probe]
    prefill_coefficients: list[float] = field(init=False)
    decode_coefficients: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if not self.probes:
            raise ValueError("a latency table needs probe timings")
        x = torch.tensor([shape_features(p.shapes) for p in self.probes], dtype=torch.float64)
        self.prefill_coefficients = _fit(x, [p.timing.prefill_ms for p in self.probes])
        self.decode_coefficients = _fit(x, [p.timing.decode_ms for p in self.probes])

    def predict(self, shapes: Sequence[BlockShape | None]) -> Timing:
        """Predicted end-to-end timing of a model whose blocks have ``shapes`` (None: removed)."""
        features = shape_features(shapes)
        return Timing(
            sum(f * c for f, c in zip(features, self.prefill_coefficients)),
            sum(f * c for f, c in zip(features, self.decode_coefficients)),
        )

    @cached_property
    def digest(self) -> str:
        """A short fingerprint of the table's contents: what a study records to refuse mixing
        latencies priced by two tables."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def coefficients(self) -> dict[str, Timing]:
        """Each term's cost (ms) in prefill and decode: what the table says the device charges."""
        return {
            name: Timing(p, d)
            for name, p, d in zip(FEATURES, self.prefill_coefficients, self.decode_coefficients)
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyTable) and self.to_json() == other.to_json()

    def to_json(self) -> str:
        return json.dumps({
            "format_version": TABLE_FORMAT_VERSION,
            "key": self.key,
            "settings": asdict(self.settings),
            "probes": [
                {"shapes": [asdict(s) for s in p.shapes], "timing": asdict(p.timing)} for p in self.probes
            ],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        """The table in ``text``; ``ValueError`` when it is not one of this format version."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format_version") != TABLE_FORMAT_VERSION:
            raise ValueError(f"not a latency table of format version {TABLE_FORMAT_VERSION}")
        return cls(
            key=data["key"],
            settings=LatencySettings(**data["settings"]),
            probes=[
                Probe(tuple(BlockShape(**s) for s in p["shapes"]), Timing(**p["timing"]))
                for p in data["probes"]
            ],
        )


def _fit(x: torch.Tensor, times: list[float]) -> list[float]:
    """Non-negative least-squares coefficients minimizing the probes' relative errors (each row
    divided by its time, so that small and large models count alike). Every term is a cost, and
    on a shared CPU an unconstrained fit trades a negative cost of one term against inflated
    costs of correlated ones (attention sub-blocks against heads); so the term with the most
    negative cost is dropped (cost 0) and the others refitted, until none is negative."""
    y = torch.tensor(times, dtype=torch.float64)
    weight = 1.0 / y.clamp_min(1e-9)
    rows, target = x * weight[:, None], (y * weight)[:, None]
    kept = list(range(x.shape[1]))
    coefficients = torch.zeros(x.shape[1], dtype=torch.float64)
    while kept:
        solution = torch.linalg.lstsq(rows[:, kept], target, driver="gelsd").solution[:, 0]
        if bool((solution >= 0).all()):
            coefficients[kept] = solution
            break
        kept.pop(int(solution.argmin()))
    return [float(v) for v in coefficients]


def table_key(config: LlamaConfig, settings: LatencySettings) -> str:
    """One table per device (CPU model / GPU name), model family shape, and settings (dtype
    included)."""
    dims = ModelDims.of(config)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    parts = [config.model_type, f"h{dims.hidden}", f"hd{dims.head_dim}", f"q{dims.num_heads}",
             f"kv{dims.num_kv_heads}", f"f{dims.ffn}", f"v{config.vocab_size}", device.replace(" ", "_"),
             f"s{settings.seq_len}-p{settings.prompt_len}-n{settings.new_tokens}-t{settings.threads}",
             settings.dtype]
    return "-".join(parts)


def table_path(config: LlamaConfig, settings: LatencySettings, cache_dir: Path | None = None) -> Path:
    """Where the table of ``config``'s family for ``settings`` on this device is cached."""
    return (cache_dir or default_cache_dir()) / "latency" / f"{table_key(config, settings)}.json"


def latency_table(
    config: LlamaConfig,
    settings: LatencySettings = LatencySettings(),
    cache_dir: Path | None = None,
    probes: int = 12,
) -> LatencyTable:
    """The table for ``config``'s family on this device, from the cache or measured now on
    ``probes`` random probes (plus a model without blocks and one of full width; random weights:
    time does not depend on their values) and cached. A cached table of another format version is
    measured again."""
    path = table_path(config, settings, cache_dir)
    if path.is_file():
        try:
            return LatencyTable.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):
            pass
    table, _ = build_table(config, settings, probes=probes)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, table.to_json())
    return table


def export_table(loaded: LoadedModel, cache_dir: Path | None = None) -> LatencyTable:
    """The table that prices ``loaded``'s sub-networks as their exports run: in the source's
    dtype, the one exports are written in (see :class:`LatencySettings`)."""
    settings = LatencySettings(dtype=dtype_name(loaded.source_dtype))
    return latency_table(loaded.model.config, settings, cache_dir=cache_dir)


def build_table(
    config: LlamaConfig,
    settings: LatencySettings,
    others: Sequence[PreTrainedModel] = (),
    probes: int = 12,
    seed: int = 0,
) -> tuple[LatencyTable, list[Timing]]:
    """Measure a new table, its probes in ``settings.dtype``, and ``others`` (in the dtype they
    are in) in the same interleaved rounds as the probes (their timings are returned beside the
    table: what a check of the table compares it with)."""
    dims = ModelDims.of(config)
    designs = probe_designs(dims, probes, seed)
    models = [probe_model(config, shapes).to(settings.torch_dtype) for shapes in designs]
    timings = measure_interleaved([*models, *others], settings)
    table = LatencyTable(
        table_key(config, settings), settings,
        [Probe(tuple(shapes), timing) for shapes, timing in zip(designs, timings)],
    )
    return table, timings[len(models):]


def probe_designs(dims: ModelDims, count: int, seed: int = 0) -> list[list[BlockShape]]:
    """The probes' blocks: none (the fixed part), the dense model's, and ``count`` random ones of
    half the depth to the full depth (the depths candidates have: decode reads every weight once
    per token, so its cost per block depends on how much of the model the caches hold) whose
    blocks each draw KV groups, query heads per group and FFN width, and drop the attention or the
    MLP sub-block now and then."""
    rng = random.Random(seed)
    full = BlockShape(dims.num_kv_heads, dims.heads_per_group, dims.ffn)
    step = max(1, dims.ffn // 48)
    designs: list[list[BlockShape]] = [[], [full] * dims.num_blocks]
    for _ in range(count):
        blocks = []
        for _ in range(rng.randint(max(1, dims.num_blocks // 2), dims.num_blocks)):
            groups, per_group = rng.randint(1, dims.num_kv_heads), rng.randint(1, dims.heads_per_group)
            ffn = step * rng.randint(1, dims.ffn // step)
            kind = rng.random()
            if kind < 0.15:
                groups = per_group = 0
            elif kind < 0.3:
                ffn = 0
            blocks.append(BlockShape(groups, per_group, ffn))
        designs.append(blocks)
    return designs


def probe_model(config: LlamaConfig, shapes: Sequence[BlockShape]) -> PreTrainedModel:
    """A random-weight model of ``config``'s family with blocks of ``shapes`` (none: only the fixed
    part), of the class an export of such blocks loads as: stock LLaMA for equal full blocks, the
    shipped per-block model otherwise."""
    torch.manual_seed(0)
    dims = ModelDims.of(config)
    if not shapes:
        probe_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 0, "head_dim": dims.head_dim})
    else:
        probe_config = subnet_config(config, list(shapes), dims)
    cls = SubnetLlamaForCausalLM if probe_config.is_heterogeneous else LlamaForCausalLM
    return cls(probe_config).eval()
