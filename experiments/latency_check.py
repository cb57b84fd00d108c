"""Does the latency table predict end-to-end latency of exported SmolLM2 sub-networks?

Cuts five sub-networks of SmolLM2-135M (structured method ``activation``, from the cached
calibration statistics: 128 x 512 tokens of WikiText-2's validation split), exports each (a stock
LLaMA checkpoint for equal widths, a remote-code one for per-block widths) and reloads it with
transformers. Then measures the latency table of SmolLM2's family on this CPU (its random-weight
probes) and times the dense model and the five reloaded variants end to end **in the same
interleaved rounds** as the probes, so that on a shared CPU the table and the variants see the
same load: prefill (batch 1, 512 tokens, last-position logits) and decode (ms per new token after
a 128-token prompt, 32 new tokens), each the lower quartile of its samples from ``--repeats``
rounds (``autoprune.latency.estimate``). The table is written to the
cache that ``autoprune`` reads (``~/.cache/autoprune/latency``), so one run measures it for the
device. Writes ``results/latency_check.{json,md}``.

With ``--cached`` it reads the cached table instead and times only the variants (interleaved among
themselves): the table measured at another time, under another load. Writes
``results/latency_check_cached.{json,md}``.

    nice -n -5 python experiments/latency_check.py [--threads 1] [--repeats 8] [--probes 12] [--cached] [--out DIR]

Reports the load average (``/proc/loadavg``) before and after: the CPU is shared.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from autoprune import CalibrationConfig, prepare
from autoprune._atomic import write_text_atomic
from autoprune.latency import (
    LatencySettings, LatencyTable, build_table, latency_table, measure_interleaved, table_path,
)
from autoprune.structure import BlockWidths, Structure, build_subnet, model_dims, resolve_blocks, save_subnet

from _common import DEFAULT_DATA as DATA
from _common import add_out, add_threads, column, out_option, parse, parser, table, write_results

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
    add_out(arguments)
    arguments.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    arguments.add_argument("--probes", type=int, default=12, help="random probes of the table")
    arguments.add_argument("--cached", action="store_true", help="use the cached table, time the variants only")
    args = parse(arguments)
    load_before = _loadavg()
    settings = LatencySettings(repeats=args.repeats, threads=args.threads)
    calibration = CalibrationConfig(source=DATA, n_samples=128, seq_len=512, seed=0)
    loaded, stats, _ = prepare("smollm2-135m", calibration, progress=False)
    dims = model_dims(loaded.model)
    names, shapes, models = ["dense"], [resolve_blocks(None, [], dims)], [loaded.model]
    with tempfile.TemporaryDirectory() as folder:
        for name, (structure, removed) in VARIANTS.items():
            out = Path(folder) / name.replace(" ", "_").replace("/", "-")
            save_subnet(build_subnet(loaded.model, stats, structure, removed), loaded.tokenizer, out,
                        {"variant": name}, torch.float32)  # timed in float32, as the dense model
            models.append(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval())
            names.append(name)
            shapes.append(resolve_blocks(structure, removed, dims))
    print("variants built", flush=True)
    if args.cached:
        latency = latency_table(loaded.model.config, settings)
        measured = measure_interleaved(models, settings)
    else:
        latency, measured = build_table(loaded.model.config, settings, models, probes=args.probes)
        path = table_path(loaded.model.config, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, latency.to_json())
    rows = [_row(n, latency.predict(s), m) for n, s, m in zip(names, shapes, measured)]
    errors = [abs(r[f"{k}_error"]) for r in rows for k in ("prefill", "decode")]
    summary = {"max_abs_error": max(errors), "median_abs_error": statistics.median(errors)}
    payload = {
        "settings": {**vars(args), "out": str(args.out)}, "load_before": load_before, "load_after": _loadavg(),
        "table_key": latency.key, "table": json.loads(latency.to_json()),
        "coefficients": {k: vars(v) for k, v in latency.coefficients().items()},
        "probe_fit": _probe_fit(latency), "rows": rows, "summary": summary,
    }
    name = "latency_check_cached" if args.cached else "latency_check"
    text = write_results(payload, args.out, name, markdown(payload))
    print(text)


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _probe_fit(latency: LatencyTable) -> dict:
    """The fitted model's largest relative error on its own probes (prefill, decode)."""
    worst = {"prefill": 0.0, "decode": 0.0}
    for probe in latency.probes:
        predicted = latency.predict(probe.shapes)
        worst["prefill"] = max(worst["prefill"], abs(predicted.prefill_ms / probe.timing.prefill_ms - 1))
        worst["decode"] = max(worst["decode"], abs(predicted.decode_ms / probe.timing.decode_ms - 1))
    return worst


#: The table's columns: predicted against measured prefill and decode latency.
COLUMNS = [
    column("variant", "variant", align="---"),
    column("prefill predicted ms", "prefill_predicted", ".1f"),
    column("prefill measured ms", "prefill_measured", ".1f"),
    column("error", "prefill_error", "+.1%"),
    column("decode predicted ms/token", "decode_predicted", ".2f"),
    column("decode measured", "decode_measured", ".2f"),
    column("error", "decode_error", "+.1%"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone."""
    settings, summary, fit = result["settings"], result["summary"], result["probe_fit"]
    where = ("the cached table; the variants timed interleaved among themselves" if settings["cached"]
             else f"the table measured on {len(result['table']['probes'])} probes in the same interleaved "
             "rounds as the variants")
    coefficients = ", ".join(
        f"{name} {c['prefill_ms']:.3g} / {c['decode_ms']:.3g}" for name, c in result["coefficients"].items()
    )
    return "\n".join([
        f"Command: `nice -n -5 python experiments/latency_check.py --threads {settings['threads']} "
        f"--repeats {settings['repeats']} --probes {settings['probes']}{' --cached' if settings['cached'] else ''}"
        f"{out_option(settings)}`"
        f" ({where}; load average before `{result['load_before']}`, after `{result['load_after']}`)",
        "",
        *table(result["rows"], COLUMNS),
        "",
        f"max |error| {summary['max_abs_error']:.1%}, median |error| {summary['median_abs_error']:.1%}; "
        f"the fit's largest error on its own probes: prefill {fit['prefill']:.1%}, decode {fit['decode']:.1%}",
        "",
        f"Costs in ms, prefill / decode per token: {coefficients}",
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
