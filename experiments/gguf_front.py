"""The front of a GGUF study in the bytes users ship: file size against held-out perplexity, beside
every llama.cpp preset and uniform type, with tokens/s in llama.cpp.

For each front member of a ``--space gguf`` study, each of its baselines (the dense model at every
uniform type, as ``llama-quantize --pure`` writes it, and llama.cpp's Q4_K_M, Q3_K_M, Q2_K mixes)
and each seed (the same with the importance matrix): the trial is exported as users export it
(``autoprune export --format gguf``, the library's ``export_trial``), the GGUF file's size checked
against the study's recorded ``gguf_bytes``, the file loaded by transformers' GGUF loader and
scored on the first ``--test-windows`` windows of the WikiText-2 **test** split (held out: the
study calibrated and searched on the validation split), and loaded by llama.cpp
(llama-cpp-python) to score the study's own validation windows (set against the study's recorded
perplexity) and time prefill and decode. The must-show comparisons: at the bytes of uniform Q4_0
(every 2-D tensor, as the ``gguf`` package writes it) and of uniform Q3_K (as llama.cpp writes it),
the front member at no more bytes with the lowest held-out perplexity. Writes
``results/gguf_front.json``, ``.md`` and ``.png``.

    AUTOPRUNE_CACHE=/work/main/runs/cache python experiments/gguf_front.py \\
        --storage sqlite:///runs/gguf.db --study gguf40 --work /tmp/gguf-front --threads 1
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from autoprune.data import validation_windows
from autoprune.measure import perplexity
from autoprune.study import export_trial, front_trials, trial_plan
from autoprune.variants import DatabaseSettings

from _common import Column, column, load_study_setup, number, parse, study_parser, table, write_results
from llamacpp_speed import llamacpp_perplexity, speed

#: The issue's bar: at the bytes of each reference, a front member at least this much better.
REQUIRED_REDUCTION = 0.10
REFERENCES = ("uniform-q4_0", "uniform-q3_k")


def main() -> None:
    arguments = study_parser(__doc__, required=True)
    arguments.add_argument("--work", type=Path, required=True, help="folder for the exported GGUF files")
    arguments.add_argument("--test-windows", type=int, default=32, help="held-out windows scored")
    arguments.add_argument("--llama-threads", type=int, default=1)
    arguments.add_argument("--prefill", type=int, default=256)
    arguments.add_argument("--decode", type=int, default=32)
    arguments.add_argument("--repeats", type=int, default=3)
    arguments.add_argument("--speed-only", action="store_true",
                           help="time the files the last run exported again, round-robin (no export, no scoring)")
    args = parse(arguments)
    if args.speed_only:
        retime(args)
        return
    setup = load_study_setup(args.storage, args.study, args.test_windows)
    settings = setup.settings  # the study's own windows, scored again from each file
    study_windows = validation_windows(settings.calibration.source, setup.loaded.tokenizer,
                                       settings.eval_seq_len, settings.eval_windows)
    args.work.mkdir(parents=True, exist_ok=True)
    np.save(args.work / "prompt.npy", setup.windows[0].numpy())  # the prompt --speed-only times
    complete = setup.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in front_trials(setup.study)}
    chosen = [t for t in complete if t.number in front or {"baseline", "seed"} & t.user_attrs.keys()]
    rows = []
    for trial in sorted(chosen, key=lambda t: t.values[0]):
        rows.append(measure(trial, trial.number in front, args, setup, study_windows))
        print(json.dumps(rows[-1]), flush=True)
    result = {"study": args.study, "storage": args.storage, "test_windows": args.test_windows,
              "imatrix": imatrix_pairs(rows),
              "seq_len": setup.settings.eval_seq_len, "llama_cpp_python": llama_cpp.__version__,
              "llama_threads": args.llama_threads, "prefill_tokens": args.prefill, "decode_tokens": args.decode,
              "rows": rows, "comparisons": comparisons(rows)}
    plot(rows, args.out / "gguf_front.png")
    print(write_results(result, args.out, "gguf_front", markdown(result)))


def measure(trial, on_front: bool, args, setup, study_windows: torch.Tensor) -> dict:
    """Export the trial, check its file, score it held out in transformers and on the study's
    windows in llama.cpp, and time it there."""
    out = args.work / f"trial-{trial.number}"
    if out.exists():
        shutil.rmtree(out)
    exported = export_trial(args.storage, args.study, trial.number, out, progress=False, gguf=True,
                            database=DatabaseSettings())
    for checkpoint in out.glob("*.safetensors"):  # the dequantized checkpoint: not needed here
        checkpoint.unlink()
    path = exported.gguf
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    held_out = perplexity(model, setup.windows)
    transformers_ppl = perplexity(model, study_windows)
    del model
    llm = llama_cpp.Llama(str(path), n_ctx=max(setup.settings.eval_seq_len, args.prefill + args.decode + 8),
                          n_batch=512, n_threads=args.llama_threads, logits_all=True, verbose=False)
    llama_ppl = llamacpp_perplexity(llm, study_windows.numpy())
    timing = speed(llm, setup.windows[0][: args.prefill].tolist(), args.decode, args.repeats)
    del llm
    quantization = trial_plan(trial).quantization
    recorded = trial.user_attrs["ppl"]
    return {
        "trial": trial.number,
        "label": trial.user_attrs.get("baseline") or trial.user_attrs.get("seed")
        or (f"refined {trial.user_attrs['refined_from']}" if "refined_from" in trial.user_attrs else "searched"),
        "on_front": on_front,
        "imatrix": quantization.imatrix,
        "gguf_bytes": trial.user_attrs["size"]["gguf_bytes"],
        "file_bytes": path.stat().st_size,
        "gguf_mb": round(path.stat().st_size / 1e6, 3),
        "validation_ppl": round(recorded, 4),
        "transformers_validation_ppl": round(transformers_ppl, 4),
        "llama_cpp_validation_ppl": round(llama_ppl, 4),
        "llama_cpp_difference": round(llama_ppl / recorded - 1, 5),
        "test_ppl": round(held_out, 4),
        **timing,
    }


def retime(args) -> None:
    """Time every file of the last run again, ``--repeats`` rounds over all of them in turn (so a
    busy machine's drift falls on every file alike), medians per file; rewrite the results."""
    path = args.out / "gguf_front.json"
    result = json.loads(path.read_text())
    prompt = np.load(args.work / "prompt.npy").tolist()
    llms = {row["trial"]: llama_cpp.Llama(str(args.work / f"trial-{row['trial']}" / "model.gguf"),
                                          n_ctx=args.prefill + args.decode + 8, n_batch=512,
                                          n_threads=args.llama_threads, verbose=False)
            for row in result["rows"]}
    timings: dict[int, list[dict]] = {trial: [] for trial in llms}
    for _ in range(args.repeats):
        for trial, llm in llms.items():
            speed(llm, prompt[:16], 2, 1)  # pages the file in again (28 files outgrow the page cache)
            timings[trial].append(speed(llm, prompt[: args.prefill], args.decode, 1))
    for row in result["rows"]:
        for key in ("prefill_tok_s", "decode_tok_s"):
            row[key] = round(statistics.median(t[key] for t in timings[row["trial"]]), 1)
    result.update(speed_rounds=args.repeats, prefill_tokens=args.prefill, decode_tokens=args.decode,
                  llama_threads=args.llama_threads)
    plot(result["rows"], args.out / "gguf_front.png")
    print(write_results(result, args.out, "gguf_front", markdown(result)))


def comparisons(rows: list[dict]) -> list[dict]:
    """At each reference's bytes, the front member at no more bytes with the lowest held-out
    perplexity, and how much lower it is."""
    found = []
    for label in REFERENCES:
        reference = next((r for r in rows if r["label"] == label), None)
        if reference is None:
            continue
        members = [r for r in rows if r["on_front"] and r["gguf_bytes"] <= reference["gguf_bytes"]]
        best = min(members, key=lambda r: r["test_ppl"]) if members else None
        reduction = None if best is None else 1 - best["test_ppl"] / reference["test_ppl"]
        found.append({"reference": label, "reference_bytes": reference["gguf_bytes"],
                      "reference_test_ppl": reference["test_ppl"], "member": best and best["trial"],
                      "member_label": best and best["label"], "member_bytes": best and best["gguf_bytes"],
                      "member_test_ppl": best and best["test_ppl"],
                      "reduction": None if reduction is None else round(reduction, 4),
                      "passes": reduction is not None and reduction >= REQUIRED_REDUCTION})
    return found


def imatrix_pairs(rows: list[dict]) -> list[dict]:
    """Each known mix without and with the importance matrix (the same bytes): held-out perplexity."""
    by_label = {row["label"]: row for row in rows}
    pairs = []
    for label, plain in by_label.items():
        weighted = by_label.get(f"{label}+imatrix")
        if weighted is not None:
            pairs.append({"mix": label, "gguf_mb": plain["gguf_mb"], "plain_test_ppl": plain["test_ppl"],
                          "imatrix_test_ppl": weighted["test_ppl"],
                          "change": round(weighted["test_ppl"] / plain["test_ppl"] - 1, 4)})
    return sorted(pairs, key=lambda pair: pair["gguf_mb"])


def plot(rows: list[dict], path: Path, largest_mb: float = 150.0) -> None:
    """Held-out perplexity against GGUF file size up to ``largest_mb`` (f16 and q8_0 lie flat
    beyond): the front joined, llama.cpp's presets and uniform types marked and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    shown = [r for r in rows if r["gguf_mb"] <= largest_mb]
    top = 1.15 * max(r["test_ppl"] for r in shown if r["on_front"])
    figure, axes = plt.subplots(figsize=(9, 5.5))
    front = sorted((r for r in shown if r["on_front"]), key=lambda r: r["gguf_mb"])
    axes.plot([r["gguf_mb"] for r in front], [r["test_ppl"] for r in front], "o-", color="C0",
              label="front of the search (and its refinement)")
    for kind, colour in (("llama.cpp", "C3"), ("uniform", "C2")):
        for imatrix, marker in ((False, "x"), (True, "s")):
            points = [r for r in shown if r["label"].startswith(kind) and r["imatrix"] == imatrix and r["test_ppl"] <= top]
            axes.scatter([r["gguf_mb"] for r in points], [r["test_ppl"] for r in points], color=colour, marker=marker,
                         s=36, label=f"{kind} {'with' if imatrix else 'without'} imatrix")
            for r in points:
                axes.annotate(r["label"].split("-", 1)[1].replace("+imatrix", ""), (r["gguf_mb"], r["test_ppl"]),
                              fontsize=7, xytext=(3, 3), textcoords="offset points", color=colour)
    axes.set(xlabel="GGUF file (MB)", ylabel="WikiText-2 test perplexity (held out)",
             ylim=(None, top), title="SmolLM2-135M: GGUF types searched per tensor vs llama.cpp's own")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


COLUMNS = [
    column("trial", "trial"), Column("label", lambda r: r["label"], "---"),
    Column("front", lambda r: "yes" if r["on_front"] else "", "---"),
    column("GGUF MB", "gguf_mb", ".2f"), Column("file = recorded", lambda r: r["file_bytes"] == r["gguf_bytes"], "---"),
    column("validation ppl (study)", "validation_ppl", ".2f"),
    column("file in transformers", "transformers_validation_ppl", ".2f"),
    column("file in llama.cpp", "llama_cpp_validation_ppl", ".2f"),
    column("difference", "llama_cpp_difference", "+.2%"), column("test ppl", "test_ppl", ".2f"),
    column("prefill tok/s", "prefill_tok_s"), column("decode tok/s", "decode_tok_s"),
]


def markdown(result: dict) -> list[str]:
    """The results' table and comparisons, from the JSON alone."""
    lines = [
        f"# GGUF front of study `{result['study']}`: file size, perplexity, llama.cpp speed",
        "",
        f"`AUTOPRUNE_CACHE=/work/main/runs/cache python experiments/gguf_front.py --storage {result['storage']} "
        f"--study {result['study']} --work WORK --threads 1`",
        "",
        f"Test perplexity: the first {result['test_windows']} windows of {result['seq_len']} tokens of the "
        "WikiText-2 test split, the exported file loaded by transformers' GGUF loader. The study's "
        "validation windows scored again from the file, by transformers and by llama.cpp "
        f"(llama-cpp-python {result['llama_cpp_python']}, {result['llama_threads']} thread; its "
        "difference from the study's figure in the next column), and llama.cpp's prefill of "
        f"{result['prefill_tokens']} tokens / decode of {result['decode_tokens']} greedy tokens (medians).",
        "",
        *table(result["rows"], COLUMNS),
        "",
        "The importance matrix (llama.cpp's imatrix from the cached calibration statistics), same bytes:",
        "",
        *table(result["imatrix"], [Column("mix", lambda r: r["mix"], "---"), column("GGUF MB", "gguf_mb", ".2f"),
                                   column("test ppl without", "plain_test_ppl", ".2f"),
                                   column("with", "imatrix_test_ppl", ".2f"), column("change", "change", "+.1%")]),
        "",
        "| at the bytes of | its test ppl | front member | its MB | its test ppl | lower by | >= 10% |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['reference']} ({c['reference_bytes'] / 1e6:.2f} MB) | {c['reference_test_ppl']:.2f} | "
            f"{c['member']} ({c['member_label']}) | {number(c['member_bytes'] and c['member_bytes'] / 1e6)} | "
            f"{number(c['member_test_ppl'])} | {number(c['reduction'], '.1%')} | {'yes' if c['passes'] else 'no'} |"
        )
    return lines


if __name__ == "__main__":
    main()
