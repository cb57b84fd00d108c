"""Latency measured for real, and a per-shape latency table that prices a sub-network.

Two timings, as a user meets them: **prefill** (batch 1, ``seq_len`` prompt tokens, logits for the
last position only, as generation computes them) and **decode** (milliseconds per new token,
batch 1, with a KV cache after a ``prompt_len``-token prompt). Each is the median of repeats.

The table (ZipLM's approach) is measured once per device and model family and cached on disk:
per attention shape (KV groups x query heads per group) and per FFN width (a grid, interpolated
linearly) the cost of one such sub-block, measured as the slope of the end-to-end time of probe
models made of several copies of it, plus the fixed part (embeddings, final norm, lm_head, the
forward's own overhead) measured on a model without blocks. A candidate's predicted time is the
fixed part plus the sum of its sub-blocks' costs, in microseconds, without building it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, PreTrainedModel

from autoprune.calibration import default_cache_dir
from autoprune.structure import BlockShape, ModelDims, subnet_config
from autoprune.structure.remote.modeling_subnet_llama import SubnetLlamaForCausalLM

TABLE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LatencySettings:
    """What a timing means: prompt lengths, repeats, and the CPU threads torch uses."""

    seq_len: int = 512
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 5
    threads: int = 1


@dataclass(frozen=True)
class Timing:
    """Milliseconds: one prefill, and one decoded token."""

    prefill_ms: float
    decode_ms: float


def _ids(model: PreTrainedModel, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator)


@torch.inference_mode()
def prefill_ms(model: PreTrainedModel, settings: LatencySettings) -> float:
    """Median wall time of a batch-1 forward of ``seq_len`` tokens keeping last-position logits."""
    ids = _ids(model, settings.seq_len)
    model(ids, use_cache=False, logits_to_keep=1)  # warm-up
    return _median_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), settings.repeats)


@torch.inference_mode()
def decode_ms(model: PreTrainedModel, settings: LatencySettings) -> float:
    """Median over repeats of the mean time per new token (greedy, KV cache, batch 1)."""
    prompt = _ids(model, settings.prompt_len)
    per_token = []
    for repeat in range(settings.repeats + 1):  # the first is a warm-up
        cache = DynamicCache(config=model.config)
        logits = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
        start = time.perf_counter()
        for _ in range(settings.new_tokens):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits
        if repeat:
            per_token.append((time.perf_counter() - start) * 1000 / settings.new_tokens)
    return statistics.median(per_token)


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(model: PreTrainedModel, settings: LatencySettings) -> Timing:
    """End-to-end prefill and decode timings of ``model`` with ``settings.threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return Timing(prefill_ms(model, settings), decode_ms(model, settings))
    finally:
        torch.set_num_threads(previous)


@dataclass(eq=False)
class LatencyTable:
    """Per-shape costs in milliseconds (one sub-block each) and the fixed part."""

    key: str
    settings: LatencySettings
    base: Timing
    attention: dict[str, Timing]  # "groups x heads_per_group"
    mlp: dict[int, Timing]  # FFN width -> cost

    def predict(self, shapes: list[BlockShape | None]) -> Timing:
        """Predicted end-to-end timing of a model whose blocks have ``shapes`` (None: removed).

        Sub-block costs come from least-squares lines through the measured cells (attention:
        a + b * query heads + c * KV heads; MLP: a + b * width), not from the cells themselves:
        on a shared CPU one cell is a difference of two noisy timings, and the cost of a matrix
        product is linear in its width, so the line is the better estimate of every cell."""
        prefill, decode = self.base.prefill_ms, self.base.decode_ms
        for shape in shapes:
            if shape is None:
                continue
            for cost in self._costs(shape):
                prefill, decode = prefill + cost.prefill_ms, decode + cost.decode_ms
        return Timing(prefill, decode)

    def _costs(self, shape: BlockShape) -> list[Timing]:
        costs = []
        if shape.heads:
            features = [1.0, shape.heads, shape.kv_groups]
            costs.append(_apply(self._fit("attention"), features))
        if shape.ffn:
            costs.append(_apply(self._fit("mlp"), [1.0, shape.ffn]))
        return costs

    def _fit(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients of the prefill and decode lines of ``kind`` (cached on the instance)."""
        cache = self.__dict__.setdefault("_fits", {})
        if kind not in cache:
            if kind == "attention":
                cells = [(_attention_features(key), timing) for key, timing in self.attention.items()]
            else:
                cells = [([1.0, float(width)], timing) for width, timing in self.mlp.items()]
            x = torch.tensor([features for features, _ in cells], dtype=torch.float64)
            y = torch.tensor([[t.prefill_ms, t.decode_ms] for _, t in cells], dtype=torch.float64)
            solution = torch.linalg.lstsq(x, y).solution
            cache[kind] = (solution[:, 0], solution[:, 1])
        return cache[kind]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyTable) and self.to_json() == other.to_json()

    def to_json(self) -> str:
        return json.dumps({
            "format_version": TABLE_FORMAT_VERSION,
            "key": self.key,
            "settings": asdict(self.settings),
            "base": asdict(self.base),
            "attention": {k: asdict(v) for k, v in self.attention.items()},
            "mlp": {str(k): asdict(v) for k, v in self.mlp.items()},
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        data = json.loads(text)
        return cls(
            key=data["key"],
            settings=LatencySettings(**data["settings"]),
            base=Timing(**data["base"]),
            attention={k: Timing(**v) for k, v in data["attention"].items()},
            mlp={int(k): Timing(**v) for k, v in data["mlp"].items()},
        )


def _attention_key(groups: int, per_group: int) -> str:
    return f"{groups}x{per_group}"


def _attention_features(key: str) -> list[float]:
    groups, per_group = (int(part) for part in key.split("x"))
    return [1.0, float(groups * per_group), float(groups)]


def _apply(fit: tuple[torch.Tensor, torch.Tensor], features: list[float]) -> Timing:
    x = torch.tensor(features, dtype=torch.float64)
    return Timing(float(x @ fit[0]), float(x @ fit[1]))


def table_key(config: LlamaConfig, settings: LatencySettings) -> str:
    """One table per device (CPU model / GPU name), model family shape, and settings."""
    dims = ModelDims.of(config)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    parts = [config.model_type, f"h{dims.hidden}", f"hd{dims.head_dim}", f"q{dims.num_heads}",
             f"kv{dims.num_kv_heads}", f"f{dims.ffn}", f"v{config.vocab_size}", device.replace(" ", "_"),
             f"s{settings.seq_len}-p{settings.prompt_len}-n{settings.new_tokens}-t{settings.threads}"]
    return "-".join(parts)


def latency_table(
    config: LlamaConfig,
    settings: LatencySettings = LatencySettings(),
    cache_dir: Path | None = None,
    ffn_step: int = 128,
    copies: tuple[int, int] = (1, 3),
) -> LatencyTable:
    """The table for ``config``'s family on this device, from the cache or measured now (random
    weights: time does not depend on their values) and cached."""
    key = table_key(config, settings)
    path = (cache_dir or default_cache_dir()) / "latency" / f"{key}-v{TABLE_FORMAT_VERSION}.json"
    if path.is_file():
        return LatencyTable.from_json(path.read_text())
    dims = ModelDims.of(config)
    base = measure(_probe(config, dims, []), settings)
    attention = {
        _attention_key(g, p): _slope(config, dims, BlockShape(g, p, 0), settings, copies)
        for g in range(1, dims.num_kv_heads + 1)
        for p in range(1, dims.heads_per_group + 1)
    }
    widths = sorted({*range(ffn_step, dims.ffn + 1, ffn_step), dims.ffn})
    mlp = {w: _slope(config, dims, BlockShape(0, 0, w), settings, copies) for w in widths}
    table = LatencyTable(key, settings, base, attention, mlp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.to_json())
    return table


def _slope(
    config: LlamaConfig, dims: ModelDims, shape: BlockShape, settings: LatencySettings, copies: tuple[int, int]
) -> Timing:
    """Cost of one sub-block: the time difference between probes of ``copies`` copies of it."""
    few, many = (measure(_probe(config, dims, [shape] * n), settings) for n in copies)
    span = copies[1] - copies[0]
    return Timing(
        max(0.0, (many.prefill_ms - few.prefill_ms) / span), max(0.0, (many.decode_ms - few.decode_ms) / span)
    )


def _probe(config: LlamaConfig, dims: ModelDims, shapes: list[BlockShape]) -> PreTrainedModel:
    """A random-weight model of the family with blocks of ``shapes`` (none: only the fixed part)."""
    torch.manual_seed(0)
    if not shapes:
        probe_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 0, "head_dim": dims.head_dim})
    else:
        probe_config = subnet_config(config, shapes, dims)
    model = SubnetLlamaForCausalLM(probe_config)
    return model.eval()
