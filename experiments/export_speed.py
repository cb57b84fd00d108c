"""Exports as users run them: ``generate`` through plain transformers on autoprune's checkpoints,
beside the dense model; their files' bytes; the perplexity their bfloat16 files cost.

Made in ``--work`` (reused when present) by autoprune's own commands:

* ``dense``: the source model written as a checkpoint (``save_checkpoint``, which every export goes
  through), and as a GGUF f16 (for ``experiments/llamacpp_exports.py``);
* ``ffn1024``: ``autoprune prune --model smollm2-135m --structured ffn=1024``;
* ``subnet-tN``: ``autoprune export`` of each of ``--trials`` of a ``subnet`` study (front members
  with per-block widths), with ``--format gguf --gguf-type f16``;

each in the source's dtype (bfloat16, the default) and with ``--dtype float32``. Every checkpoint
is loaded with stock ``AutoModelForCausalLM.from_pretrained(DIR)`` (``trust_remote_code`` where it
ships its modelling file), in the dtype its files hold, as a user loads it. In one process, round
after round, each model ``generate``s ``--new-tokens`` tokens (greedy, batch 1) after a
``--prompt``-token prompt (the start of the first test window); a logits processor stamps each
step, so prefill is the time to the first token's logits and decode the mean time of each later
token (medians over ``--repeats`` rounds). The tokens each forward is fed are counted: with the KV
cache, one after the prompt. Perplexity on the first ``--ppl-windows`` windows of the test split,
each checkpoint as loaded, and the bfloat16 files also in float32 arithmetic (their rounding
alone), computed before the timing and kept in ``WORK`` for a rerun. Writes ``results/export_speed.json`` and ``.md``, and ``WORK/windows.npy`` (the
perplexity windows' token ids, for llama.cpp).

    nice -n 10 python experiments/export_speed.py --work WORK --storage sqlite:///STUDY.db \
        --study subnet75s --trials 13 1 --cache-dir runs/cache --threads 2
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from autoprune.cli import main as autoprune
from autoprune.data import evaluation_windows
from autoprune.export import read_metadata, save_checkpoint
from autoprune.export_gguf import export_checkpoint_gguf
from autoprune.measure import perplexity
from autoprune.models import load_model

from _common import (
    DEFAULT_DATA, Column, add_out, add_threads, column, number, out_option, parse, parser, table, write_results,
)

MODEL = "smollm2-135m"
DTYPES = ("bfloat16", "float32")
#: The issue's bars: against the dense model in the same dtype, and bf16 files against float32 ones.
DECODE_BAR, PREFILL_BAR, PPL_BAR = 0.95, 0.85, 0.01


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--work", type=Path, required=True, help="folder for the checkpoints")
    arguments.add_argument("--storage", required=True, help="the subnet study's storage")
    arguments.add_argument("--study", required=True)
    arguments.add_argument("--trials", type=int, nargs="+", required=True,
                           help="front members with per-block widths")
    arguments.add_argument("--cache-dir", default=None, help="calibration cache")
    arguments.add_argument("--data", default=DEFAULT_DATA)
    arguments.add_argument("--prompt", type=int, default=512)
    arguments.add_argument("--new-tokens", type=int, default=64)
    arguments.add_argument("--repeats", type=int, default=5)
    arguments.add_argument("--ppl-windows", type=int, default=64)
    add_threads(arguments, 2)
    add_out(arguments)
    args = parse(arguments)
    folders = make_exports(args)
    models = {key: load(folder) for key, folder in folders.items()}
    windows = evaluation_windows(args.data, load_model(str(folders["dense", "float32"])).tokenizer, 512,
                                 args.ppl_windows)
    np.save(args.work / "windows.npy", windows.numpy())
    scores = perplexities(models, folders, windows, args.work / f"ppl-{args.ppl_windows}.json")
    load_before = Path("/proc/loadavg").read_text().strip()
    timings = time_generate(models, windows[0, : args.prompt].unsqueeze(0), args.new_tokens, args.repeats)
    load_after = Path("/proc/loadavg").read_text().strip()
    rows = [{"variant": variant, "dtype": dtype, **files(folders[variant, dtype], model),
             **timings[variant, dtype], **scores[f"{variant}/{dtype}"]}
            for (variant, dtype), model in models.items()]
    compare(rows)
    plans = {f"subnet-t{n}": read_metadata(folders[f"subnet-t{n}", "bfloat16"])["recipe"]["plan"]
             for n in args.trials}
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "folders": {f"{v}/{d}": str(f) for (v, d), f in folders.items()},
        "subnet_plans": plans, "torch": torch.__version__, "load_before": load_before, "load_after": load_after,
        "rows": rows,
    }
    print(write_results(result, args.out, "export_speed", markdown(result)))


def make_exports(args) -> dict[tuple[str, str], Path]:
    """The checkpoints, made with autoprune's commands where missing (and the GGUFs llama.cpp runs)."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    variants = ["dense", "ffn1024", *(f"subnet-t{n}" for n in args.trials)]
    folders = {(v, d): work / f"{v}-{d}" for v in variants for d in DTYPES}
    for dtype in DTYPES:
        if not folders["dense", dtype].exists():
            loaded = load_model(MODEL)
            save_checkpoint(loaded.model, loaded.tokenizer, folders["dense", dtype], {"recipe": {"model": MODEL}},
                            getattr(torch, dtype))
        flags = ["--dtype", dtype] if dtype == "float32" else []  # the default: the source's
        if not folders["ffn1024", dtype].exists():
            run(["prune", "--model", MODEL, "--structured", "ffn=1024", "--data", args.data, "--eval-windows", "2",
                 "--out", folders["ffn1024", dtype], *cache, *flags])
        gguf = ["--format", "gguf", "--gguf-type", "f16"] if dtype == "bfloat16" else []
        for trial in args.trials:
            if not folders[f"subnet-t{trial}", dtype].exists():
                run(["export", "--storage", args.storage, "--study", args.study, "--trial", trial,
                     "--out", folders[f"subnet-t{trial}", dtype], *cache, *flags, *gguf])
    dense_gguf = folders["dense", "bfloat16"] / "model-f16.gguf"
    if not dense_gguf.exists():
        export_checkpoint_gguf(folders["dense", "bfloat16"], dense_gguf, "f16")
    return folders


def perplexities(models: dict, folders: dict, windows: torch.Tensor, saved: Path) -> dict[str, dict]:
    """Each checkpoint's perplexity as loaded, and the bfloat16 files' in float32 arithmetic too;
    kept in ``saved`` (in the work folder), so that timing again on a quieter machine reuses them."""
    if saved.exists():
        return json.loads(saved.read_text())
    scores = {}
    for (variant, dtype), model in models.items():
        score = {"ppl": perplexity(model, windows)}
        if dtype == "bfloat16":
            score["ppl_float32_arithmetic"] = perplexity(load(folders[variant, dtype], torch.float32), windows)
        scores[f"{variant}/{dtype}"] = score
        print(variant, dtype, json.dumps(score), flush=True)
    saved.write_text(json.dumps(scores, indent=2))
    return scores


def run(args: list) -> None:
    print("autoprune " + " ".join(map(str, args)), flush=True)
    if autoprune([str(arg) for arg in args]) != 0:
        raise SystemExit(f"autoprune {args[0]} failed")


def load(folder: Path, dtype: str | torch.dtype = "auto") -> PreTrainedModel:
    """The checkpoint as a user loads it: stock transformers, in the dtype its files hold."""
    remote = "auto_map" in json.loads((folder / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=dtype).eval()


class Stamps(LogitsProcessor):
    """The time each generation step's logits arrive (the processor changes nothing)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def generate_once(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Prefill ms (to the first token's logits) and mean decode ms per later token of one
    ``generate`` call as users make it (greedy, batch 1, the model's own generation settings)."""
    stamps = Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([stamps]),
                       pad_token_id=model.generation_config.eos_token_id)
    times = stamps.times
    return 1000 * (times[0] - start), 1000 * (times[-1] - times[0]) / (len(times) - 1)


def fed_tokens(model: PreTrainedModel, prompt: torch.Tensor) -> list[int]:
    """How many tokens each forward of a 4-token ``generate`` is fed."""
    fed: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=model.generation_config.eos_token_id)
    finally:
        hook.remove()
    return fed


def time_generate(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Each model's median prefill and decode over ``repeats`` rounds, one ``generate`` of each in
    turn per round (after one warm-up round), so that all see the same load of a shared machine."""
    samples: dict = {key: [] for key in models}
    fed = {key: fed_tokens(model, prompt) for key, model in models.items()}
    for round_ in range(repeats + 1):
        for key, model in models.items():
            timing = generate_once(model, prompt, new_tokens)
            if round_:
                samples[key].append(timing)
    return {key: {"prefill_ms": statistics.median(p for p, _ in values),
                  "decode_ms": statistics.median(d for _, d in values),
                  "fed_tokens": fed[key]}
            for key, values in samples.items()}


def files(folder: Path, model: PreTrainedModel) -> dict:
    """The weight files' bytes, the parameters they hold (tied ones once), and what autoprune's
    report says it wrote."""
    weights = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = read_metadata(folder).get("report", {})
    return {
        "file_bytes": weights, "params": params, "bytes_per_param": weights / params,
        "report_bytes": read_metadata(folder).get("checkpoint", {}).get("weight_bytes"),
        "linear_kept": (report["linear_params"] / report["dense_linear_params"]) if report else 1.0,
    }


def compare(rows: list[dict]) -> None:
    """Ratios to the dense model in the same dtype, and bfloat16 perplexity to float32's."""
    by = {(r["variant"], r["dtype"]): r for r in rows}
    for row in rows:
        dense = by["dense", row["dtype"]]
        row["prefill_ratio"] = row["prefill_ms"] / dense["prefill_ms"]
        row["decode_ratio"] = row["decode_ms"] / dense["decode_ms"]
        row["ppl_vs_float32"] = row["ppl"] / by[row["variant"], "float32"]["ppl"] - 1
        row["meets_bars"] = row["variant"] == "dense" or (
            row["decode_ratio"] <= DECODE_BAR and row["prefill_ratio"] <= PREFILL_BAR
            and abs(row["ppl_vs_float32"]) <= PPL_BAR and all(n == 1 for n in row["fed_tokens"][1:]))


COLUMNS = [
    column("variant", "variant", align="---"), column("files", "dtype", align="---"),
    column("linear kept", "linear_kept", ".1%"),
    Column("file MB", lambda r: f"{r['file_bytes'] / 2**20:.1f}"),
    column("bytes/weight", "bytes_per_param", ".3f"),
    column("prefill ms", "prefill_ms", ".1f"), column("x dense", "prefill_ratio", ".2f"),
    column("decode ms/token", "decode_ms", ".2f"), column("x dense", "decode_ratio", ".2f"),
    Column("tokens fed per step", lambda r: ", ".join(map(str, r["fed_tokens"]))),
    column("ppl", "ppl", ".3f"), column("vs float32 files", "ppl_vs_float32", "+.2%"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone."""
    s = result["settings"]
    rows = result["rows"]
    extra = [f"- {r['variant']} bfloat16 files in float32 arithmetic: ppl "
             f"{number(r.get('ppl_float32_arithmetic'), '.3f')}" for r in rows if r["dtype"] == "bfloat16"]
    return "\n".join([
        f"# Exports through `generate` in plain transformers (torch {result['torch']}, threads: {s['threads']})",
        "",
        f"`nice -n 10 python experiments/export_speed.py --work WORK --storage STORAGE --study {s['study']} "
        f"--trials {' '.join(map(str, s['trials']))} --cache-dir CACHE --threads {s['threads']} --repeats {s['repeats']} "
        f"--ppl-windows {s['ppl_windows']}{out_option(s)}`",
        "",
        f"Batch 1, a {s['prompt']}-token prompt, {s['new_tokens']} new tokens (greedy); medians of "
        f"{s['repeats']} interleaved rounds; ratios to the dense checkpoint in the same dtype. Perplexity "
        f"on the first {s['ppl_windows']} test windows, each checkpoint as loaded. Load average before "
        f"`{result['load_before']}`, after `{result['load_after']}`.",
        "",
        *table(rows, COLUMNS),
        "",
        *extra,
    ]) + "\n"


if __name__ == "__main__":
    main()
