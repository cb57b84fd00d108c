"""Per-block sub-networks' GGUFs in llama.cpp: they load, score the safetensors exports'
perplexity, and decode beside the dense model's GGUF.

Runs in the llama.cpp environment (``make llamacpp-venv``; no torch, no autoprune) on what
``experiments/export_speed.py`` left in ``--work``: ``subnet-tN-bfloat16/model-f16.gguf`` (written
by ``autoprune export --format gguf --gguf-type f16`` of ``subnet`` study trials, architecture
``deci`` with per-layer head and FFN counts) and ``dense-bfloat16/model-f16.gguf``. Perplexity in
llama.cpp on the very token ids transformers scored (``WORK/windows.npy``), set against
``results/export_speed.json`` (the same windows); prefill and decode (greedy, one token at a time)
timed in interleaved rounds, one of each model per round. Writes ``results/llamacpp_exports.json``
and ``.md``.

    .venv-llamacpp/bin/python experiments/llamacpp_exports.py --work WORK --threads 2
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import llama_cpp
import numpy as np

from _writing import Column, add_out, column, out_option, parser, table, write_results  # not _common: no torch
from llamacpp_speed import llamacpp_perplexity, speed

#: The issue's bar: llama.cpp's perplexity within 1% of the safetensors export's.
TOLERANCE = 0.01


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--work", type=Path, required=True)
    arguments.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    arguments.add_argument("--prefill", type=int, default=512)
    arguments.add_argument("--decode", type=int, default=64)
    arguments.add_argument("--repeats", type=int, default=5)
    add_out(arguments)
    args = arguments.parse_args()
    windows = np.load(args.work / "windows.npy")
    transformers_rows = {(r["variant"], r["dtype"]): r
                         for r in json.loads((args.out / "export_speed.json").read_text())["rows"]}
    variants = sorted({variant for variant, _ in transformers_rows}, key=lambda v: v != "dense")
    paths = {v: args.work / f"{v}-bfloat16" / "model-f16.gguf" for v in variants}
    paths = {v: path for v, path in paths.items() if path.exists()}
    models = {variant: llama_cpp.Llama(str(path), n_ctx=args.prefill + args.decode + 8, n_batch=args.prefill,
                                       n_threads=args.threads, logits_all=True, verbose=False)
              for variant, path in paths.items()}
    rows = []
    for variant, llm in models.items():
        ppl = llamacpp_perplexity(llm, windows)
        reference = transformers_rows[variant, "bfloat16"]["ppl"]
        rows.append({
            "variant": variant, "architecture": llm.metadata.get("general.architecture"),
            "gguf_mb": round(paths[variant].stat().st_size / 2**20, 2), "llamacpp_ppl": ppl,
            "ppl_windows": len(windows), "safetensors_ppl": reference,
            "safetensors_float32_ppl": transformers_rows[variant, "float32"]["ppl"],
            "relative_difference": ppl / reference - 1,
        })
        print(json.dumps(rows[-1]), flush=True)
    timings = interleaved(models, windows[0][: args.prefill].tolist(), args.decode, args.repeats)
    for row in rows:
        row.update(timings[row["variant"]])
        row["decode_vs_dense"] = timings["dense"]["decode_tok_s"] / row["decode_tok_s"]
        row["prefill_vs_dense"] = timings["dense"]["prefill_tok_s"] / row["prefill_tok_s"]
    result = {
        "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "cpu": platform.processor(),
        "prefill_tokens": args.prefill, "decode_tokens": args.decode, "repeats": args.repeats, "out": str(args.out),
        "rows": rows,
    }
    print(write_results(result, args.out, "llamacpp_exports", markdown(result)))


def interleaved(models: dict, prompt: list[int], decode: int, repeats: int) -> dict:
    """Median prefill and decode tokens per second of each model, one run of each per round
    (after one warm-up round), so that both see the same load of a shared machine."""
    samples: dict = {variant: [] for variant in models}
    for round_ in range(repeats + 1):
        for variant, llm in models.items():
            timing = speed(llm, prompt, decode, 1)
            if round_:
                samples[variant].append(timing)
    return {variant: {key: statistics.median(s[key] for s in values) for key in ("prefill_tok_s", "decode_tok_s")}
            for variant, values in samples.items()}


COLUMNS = [
    column("variant", "variant", align="---"), column("architecture", "architecture", align="---"),
    column("GGUF MB", "gguf_mb"),
    Column("llama.cpp ppl", lambda r: f"{r['llamacpp_ppl']:.3f} ({r['ppl_windows']} windows)"),
    column("safetensors ppl (bf16)", "safetensors_ppl", ".3f"), column("difference", "relative_difference", "+.2%"),
    column("prefill tok/s", "prefill_tok_s", ".1f"), column("decode tok/s", "decode_tok_s", ".1f"),
    column("decode time x dense", "decode_vs_dense", ".2f"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone."""
    return "\n".join([
        f"# Per-block GGUFs in llama.cpp (llama-cpp-python {result['llama_cpp_python']}, threads: "
        f"{result['threads']})",
        "",
        f"`.venv-llamacpp/bin/python experiments/llamacpp_exports.py --work WORK --threads {result['threads']} "
        f"--repeats {result['repeats']}{out_option(result)}`",
        "",
        f"Prefill: one {result['prefill_tokens']}-token window; decode: {result['decode_tokens']} greedy tokens; "
        f"medians of {result['repeats']} interleaved rounds. Perplexity on the token ids transformers scored "
        "(`experiments/export_speed.py`), against the bfloat16 safetensors export's.",
        "",
        *table(result["rows"], COLUMNS),
    ]) + "\n"


if __name__ == "__main__":
    main()
