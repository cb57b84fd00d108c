"""Does the per-shape latency table predict end-to-end latency of exported SmolLM2 sub-networks?

Measures (or reads from the cache) the latency table of SmolLM2-135M's family on this CPU, then
cuts five sub-networks of SmolLM2-135M (structured method ``activation``, from the cached
calibration statistics: 128 x 512 tokens of WikiText-2's validation split), exports each (a stock
LLaMA checkpoint for equal widths, a remote-code one for per-block widths), reloads it with
transformers, and times it end to end: prefill (batch 1, 512 tokens, last-position logits) and
decode (ms per new token after a 128-token prompt, 32 new tokens), medians of ``--repeats``. The
dense model is timed too. Writes ``results/latency_check.json`` and ``results/latency_check.md``.

    python experiments/latency_check.py [--threads 1] [--repeats 5] [--table-only | --fresh-table]

The CPU is shared: run it at a higher priority (``nice -n -5``) and read the spread columns.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM

from autoprune import CalibrationConfig, prepare
from autoprune.latency import LatencySettings, latency_table, measure
from autoprune.models import load_model
from autoprune.structure import BlockWidths, Structure, build_subnet, model_dims, resolve_blocks, save_subnet

from _common import DEFAULT_DATA as DATA
from _common import RESULTS, add_threads, column, parse, parser, table, write_results

VARIANTS: dict[str, tuple[Structure, list[int]]] = {
    "ffn 1152 everywhere": (Structure(method="activation", every_block=BlockWidths(ffn=1152)), []),
    "heads 6/9 + ffn 1024": (
        Structure(method="activation", every_block=BlockWidths(kv_groups=3, heads_per_group=2, ffn=1024)), []
    ),
    "4 blocks removed + ffn 1280": (
        Structure(method="activation", every_block=BlockWidths(ffn=1280)), [20, 22, 24, 26]
    ),
    "per-block widths": (
        Structure(method="activation", blocks={
            i: BlockWidths(kv_groups=1 + i % 3, heads_per_group=1 + (i // 3) % 3, ffn=384 + 32 * i)
            for i in range(30)
        }), []
    ),
    "attention dropped in 8 blocks + mixed": (
        Structure(method="activation", every_block=BlockWidths(ffn=896), blocks={
            **{i: BlockWidths(drop_attention=True, ffn=1536) for i in range(14, 30, 2)},
            **{i: BlockWidths(kv_groups=2, heads_per_group=3, ffn=640) for i in range(1, 14, 2)},
        }), [29]
    ),
}


def main() -> None:
    arguments = parser(__doc__)
    add_threads(arguments, 1)
    arguments.add_argument("--repeats", type=int, default=5)
    arguments.add_argument("--table-only", action="store_true", help="measure and cache the table only")
    arguments.add_argument(
        "--fresh-table", action="store_true",
        help="measure the table again in this run (into a temporary cache, FFN widths every 256) "
        "just before the variants, so both see the same load on a shared CPU",
    )
    args = parse(arguments)
    settings = LatencySettings(repeats=args.repeats, threads=args.threads)
    dense = load_model("smollm2-135m")
    if args.fresh_table:
        with tempfile.TemporaryDirectory() as cache:
            shapes = latency_table(dense.model.config, settings, cache_dir=Path(cache), ffn_step=256)
    else:
        shapes = latency_table(dense.model.config, settings)
    print("table", shapes.key, flush=True)
    if args.table_only:
        return
    dims = model_dims(dense.model)
    calibration = CalibrationConfig(source=DATA, n_samples=128, seq_len=512, seed=0)
    loaded, stats, _ = prepare("smollm2-135m", calibration, progress=False)
    rows = [_row("dense", shapes.predict(resolve_blocks(None, [], dims)), measure(loaded.model, settings))]
    print(rows[-1], flush=True)
    for name, (structure, removed) in VARIANTS.items():
        subnet = build_subnet(loaded.model, stats, structure, removed)
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "variant"
            save_subnet(subnet, loaded.tokenizer, out, {"variant": name})
            reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
            measured = measure(reloaded, settings)
        rows.append(_row(name, shapes.predict(resolve_blocks(structure, removed, dims)), measured))
        print(rows[-1], flush=True)
    errors = [abs(r[f"{k}_error"]) for r in rows for k in ("prefill", "decode")]
    summary = {"max_abs_error": max(errors), "median_abs_error": statistics.median(errors)}
    payload = {"settings": vars(args), "table_key": shapes.key, "table": json.loads(shapes.to_json()),
               "rows": rows, "summary": summary}
    write_results(payload, RESULTS, "latency_check_fresh" if args.fresh_table else "latency_check", markdown(payload))


#: The table's columns: predicted against measured prefill and decode latency.
COLUMNS = [
    column("variant", "variant", align="---"),
    column("prefill predicted ms", "prefill_predicted", ".1f", "---"),
    column("prefill measured ms", "prefill_measured", ".1f", "---"),
    column("error", "prefill_error", "+.1%", "---"),
    column("decode predicted ms/token", "decode_predicted", ".2f", "---"),
    column("decode measured", "decode_measured", ".2f", "---"),
    column("error", "decode_error", "+.1%", "---"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone (runs from before ``--fresh-table`` existed lack it
    in their settings: they did not measure a fresh table)."""
    settings, summary = result["settings"], result["summary"]
    return "\n".join([
        f"Command: `nice -n -5 python experiments/latency_check.py --threads {settings['threads']} "
        f"--repeats {settings['repeats']}{' --fresh-table' if settings.get('fresh_table') else ''}`",
        "",
        *table(result["rows"], COLUMNS),
        "",
        f"max |error| {summary['max_abs_error']:.1%}, median |error| {summary['median_abs_error']:.1%}",
    ]) + "\n"


def _row(name: str, predicted, measured) -> dict:
    return {
        "variant": name,
        "prefill_predicted": predicted.prefill_ms,
        "prefill_measured": measured.prefill_ms,
        "prefill_error": predicted.prefill_ms / measured.prefill_ms - 1,
        "decode_predicted": predicted.decode_ms,
        "decode_measured": measured.decode_ms,
        "decode_error": predicted.decode_ms / measured.decode_ms - 1,
    }


if __name__ == "__main__":
    main()
