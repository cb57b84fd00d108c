"""What a study minimizes: one or two costs and one quality, chosen in its config.

``objectives: [params, latency, ppl]`` (any order, two or three names): the quality is ``ppl`` or
``kl``; the costs are decoder linear non-zeros (``nonzeros``, what unstructured sparsity shrinks),
decoder linear weights kept (``params``, what a sub-network's files hold), the bytes of the
exported checkpoint at two bytes per weight (``bytes``: bfloat16 or float16 files), the latency
predicted for the search's device from the per-shape table (``latency``: prefill of one prompt;
``decode_latency``: ms per new token; see :mod:`autoprune.latency`), and the bytes of the model's
GGUF file (``gguf_bytes``: each tensor in the type a quantized plan gives it, f16 otherwise; see
:mod:`autoprune.gguf_size`). A trial's objective values are its costs in the configured order, then
its quality, so ``values[0]`` is the primary cost and ``values[-1]`` the quality in every study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import optuna

from autoprune.errors import AutopruneError

Cost = Literal["nonzeros", "params", "bytes", "latency", "decode_latency", "gguf_bytes"]
Quality = Literal["ppl", "kl"]

#: Where each cost is in a trial's recorded ``size``.
SIZE_KEYS: dict[str, str] = {
    "nonzeros": "linear_nonzeros",
    "params": "linear_params",
    "bytes": "bytes_dense_fp16",
    "latency": "latency_ms",
    "decode_latency": "decode_ms",
    "gguf_bytes": "gguf_bytes",
}
#: Costs that need the device's latency table.
LATENCY_COSTS = frozenset({"latency", "decode_latency"})


def split_objectives(names: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """``(costs, quality)`` of an objectives list, or a one-line error naming what is wrong."""
    costs, qualities = get_args(Cost), get_args(Quality)
    unknown = [name for name in names if name not in costs + qualities]
    if unknown:
        raise AutopruneError(
            f"unknown objective {unknown[0]!r} (qualities: {', '.join(qualities)}; costs: {', '.join(costs)})"
        )
    if len(set(names)) != len(names):
        raise AutopruneError(f"objectives name one thing twice: {list(names)}")
    if not 2 <= len(names) <= 3:
        raise AutopruneError(f"objectives takes two or three names, got {len(names)}")
    chosen = [name for name in names if name in qualities]
    if len(chosen) != 1:
        raise AutopruneError(f"objectives needs exactly one quality (ppl or kl), got {chosen or 'none'}")
    return tuple(name for name in names if name in costs), chosen[0]


def compared_size(costs: Sequence[str]) -> str:
    """The size key by which early stopping compares a candidate with the front: the GGUF file's
    bytes in a study that minimizes them (its candidates differ in bytes, not in non-zeros), the
    decoder linear non-zeros otherwise."""
    return SIZE_KEYS["gguf_bytes"] if "gguf_bytes" in costs else "linear_nonzeros"


def objective_values(costs: Sequence[str], size: Mapping[str, float | int], quality: float) -> list[float]:
    """A measured trial's objective values: its costs in order, then its quality."""
    return [float(size[SIZE_KEYS[cost]]) for cost in costs] + [float(quality)]


#: The study attribute naming the latency table its trials were priced by.
LATENCY_TABLE_ATTR = "latency_table"


def check_latency_table(study: optuna.Study, size: Mapping[str, Any]) -> None:
    """Refuse, in one line, a latency priced by another table than the study's earlier trials: a
    table re-measured (another cache, a new format) or another device's prices the same shapes
    differently, so the two sets of latencies would share one front without being comparable. The
    first priced trial names the study's table."""
    digest = size.get(LATENCY_TABLE_ATTR)
    if digest is None:
        return
    recorded = study.user_attrs.get(LATENCY_TABLE_ATTR)
    if recorded is None:
        study.set_user_attr(LATENCY_TABLE_ATTR, digest)
    elif recorded != digest:
        raise AutopruneError(
            f"study {study.study_name!r} priced its latencies with table {recorded}, this worker's "
            f"table is {digest} (re-measured, or another device): their latencies are not "
            "comparable; use the cache that holds the study's table, or a new study"
        )
