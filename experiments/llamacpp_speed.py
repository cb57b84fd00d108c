"""SmolLM2 GGUF exports in llama.cpp: perplexity, prefill and decode speed, file size.

Runs in the llama.cpp environment (``make llamacpp-venv``: numpy and llama-cpp-python only; no
torch, no autoprune). For each GGUF that ``experiments/gguf_roundtrip.py`` left in ``--work``:

* perplexity in llama.cpp on the very token ids transformers scored (``WORK/windows.npy``), set
  against the transformers figures in ``results/gguf_roundtrip.json`` (same windows);
* whether llama.cpp's own tokenizer gives transformers' ids for the start of that text;
* prefill: one ``--prefill``-token window evaluated at once, tokens per second (median of
  ``--repeats``); decode: ``--decode`` tokens generated one at a time (greedy), tokens per second;
* the file size.

Unstructured sparsity (SparseGPT 50%) is stored and multiplied as dense numbers in llama.cpp, so
it should cost the same time and bytes as the dense model; removed blocks and q8_0 should not.
Writes ``results/llamacpp_speed.json`` and ``.md``.

    .venv-llamacpp/bin/python experiments/llamacpp_speed.py --work /work/h6-work --threads 2
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np

from _writing import Column, add_out, column, parser, table, write_results  # not _common: no torch here

VARIANTS = {"dense": "dense", "sparsegpt-50": "sparsegpt-50", "sparsegpt-50-minus-2-blocks": "sparsegpt-50-cut"}


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--work", type=Path, required=True)
    arguments.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    arguments.add_argument("--ppl-windows", type=int, default=4, help="windows scored in llama.cpp")
    arguments.add_argument("--prefill", type=int, default=512)
    arguments.add_argument("--decode", type=int, default=64)
    arguments.add_argument("--repeats", type=int, default=3)
    arguments.add_argument("--gguf-types", nargs="+", choices=("f16", "q8_0"), default=["f16", "q8_0"],
                           help="which of each variant's GGUF files to run")
    add_out(arguments)
    args = arguments.parse_args()
    windows = np.load(args.work / "windows.npy")
    transformers_rows = json.loads((args.out / "gguf_roundtrip.json").read_text())["rows"]
    rows = []
    for variant, folder in VARIANTS.items():
        for gguf_type in args.gguf_types:
            path = args.work / folder / f"model-{gguf_type}.gguf"
            if not path.exists():
                continue
            llm = llama_cpp.Llama(str(path), n_ctx=args.prefill + args.decode + 8, n_batch=args.prefill,
                                  n_threads=args.threads, logits_all=True, verbose=False)
            reference = next(r for r in transformers_rows
                             if r["variant"] == variant and r["gguf_type"] == gguf_type)
            ppl_windows = windows[: args.ppl_windows]
            ppl = llamacpp_perplexity(llm, ppl_windows)
            row = {
                "variant": variant, "gguf_type": gguf_type, "gguf_mb": round(path.stat().st_size / 2**20, 2),
                "llamacpp_ppl": round(ppl, 4),
                "ppl_windows": len(ppl_windows),
                "tokenizer_same_ids": same_tokenization(llm, path, windows),
                **speed(llm, windows[0][: args.prefill].tolist(), args.decode, args.repeats),
            }
            row["transformers_gguf_ppl"] = reference[f"gguf_ppl_first_{len(ppl_windows)}"]
            row["transformers_safetensors_ppl"] = reference[f"safetensors_ppl_first_{len(ppl_windows)}"]
            row["relative_difference"] = round(ppl / row["transformers_gguf_ppl"] - 1, 6)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm
    result = {
        "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "cpu": platform.processor(),
        "prefill_tokens": args.prefill, "decode_tokens": args.decode, "repeats": args.repeats,
        "gguf_types": args.gguf_types, "rows": rows,
    }
    write_results(result, args.out, "llamacpp_speed", markdown(result))


def llamacpp_perplexity(llm: llama_cpp.Llama, windows: np.ndarray) -> float:
    """exp of the mean next-token NLL over the windows, each evaluated from an empty context."""
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return math.exp(total / count)


def same_tokenization(llm: llama_cpp.Llama, path: Path, windows: np.ndarray) -> bool:
    """Do llama.cpp's tokenizer and transformers' agree on the first window's text?"""
    text = llm.detokenize(windows[0].tolist()).decode("utf-8", errors="strict")
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return ids == windows[0].tolist()


def speed(llm: llama_cpp.Llama, prompt: list[int], decode: int, repeats: int) -> dict:
    """Median prefill and decode tokens per second over ``repeats`` runs."""
    prefill, generate = [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(decode):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        generate.append(decode / (time.perf_counter() - start))
    return {"prefill_tok_s": round(statistics.median(prefill), 1),
            "decode_tok_s": round(statistics.median(generate), 1)}


#: The table's columns: llama.cpp's perplexity against transformers' on the same GGUF, and speed.
COLUMNS = [
    column("variant", "variant", align="---"), column("type", "gguf_type", align="---"),
    column("GGUF MB", "gguf_mb", align="---"),
    Column("llama.cpp ppl", lambda r: f"{r['llamacpp_ppl']} ({r['ppl_windows']} windows)", "---"),
    column("transformers ppl", "transformers_gguf_ppl", align="---"),
    column("difference", "relative_difference", "+.3%", "---"),
    column("same ids", "tokenizer_same_ids", align="---"), column("prefill tok/s", "prefill_tok_s", align="---"),
    column("decode tok/s", "decode_tok_s", align="---"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone."""
    return "\n".join([
        f"# llama.cpp (llama-cpp-python {result['llama_cpp_python']}), {result['threads']} threads",
        "",
        "`.venv-llamacpp/bin/python experiments/llamacpp_speed.py --work WORK --threads "
        f"{result['threads']} --gguf-types {' '.join(result.get('gguf_types', ['f16', 'q8_0']))}`",
        "",
        f"Prefill: one {result['prefill_tokens']}-token window; decode: {result['decode_tokens']} "
        f"greedy tokens; medians of {result['repeats']}.",
        "",
        "Perplexity on the same windows (token ids) in llama.cpp and in transformers (GGUF reloaded).",
        "",
        *table(result["rows"], COLUMNS),
    ]) + "\n"


if __name__ == "__main__":
    main()
