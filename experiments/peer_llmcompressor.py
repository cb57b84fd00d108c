"""One llm-compressor baseline run, for ``baselines.py`` (runs in ``.venv-peer``, not autoprune's venv).

Prunes a plain Hugging Face checkpoint with llm-compressor's ``oneshot`` and its
``WandaPruningModifier`` or ``SparseGPTModifier`` on the exact calibration windows autoprune
calibrates on, then measures perplexity on the exact evaluation windows autoprune measures on, the
same way (exp of the mean next-token NLL over non-overlapping windows). Imports nothing from
autoprune, so llm-compressor's version pins never meet autoprune's.

    .venv-peer/bin/python experiments/peer_llmcompressor.py --model DIR --windows WINDOWS.pt \
        [--eval EVAL.pt] --method {wanda,sparsegpt} (--sparsity S | --nm 2:4) --out OUT.json \
        [--threads N] [--pipeline {sequential,basic}]

``WINDOWS.pt`` holds ``{"calibration": LongTensor[n, L], "evaluation": LongTensor[m, L]}``;
``--eval`` names another file holding the evaluation windows (a tensor, or such a dict) instead.
``OUT.json`` gets: version, method, setting, ppl, dense_ppl, linear_nonzeros, linear_total,
prune_seconds (the whole ``oneshot`` call: llm-compressor calibrates inside every run),
per-layer sparsity and the checks that it is the requested one, and fingerprints of the windows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: The decoder linear layers autoprune prunes in LLaMA-family models (SmolLM2): the same targets.
TARGETS = [
    r"re:.*layers\.\d+\.self_attn\.(q|k|v|o)_proj$",
    r"re:.*layers\.\d+\.mlp\.(gate|up|down)_proj$",
]
LAYER_NAME = re.compile(r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="plain Hugging Face checkpoint folder")
    parser.add_argument("--windows", required=True, help=".pt with calibration (+ evaluation) windows")
    parser.add_argument("--eval", default=None, help=".pt with evaluation windows (else --windows')")
    parser.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float)
    target.add_argument("--nm", help="N:M pattern, N kept of every M, e.g. 2:4")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-dense-ppl", action="store_true", help="skip the dense check")
    parser.add_argument(
        "--pipeline", default="sequential", choices=["sequential", "basic"],
        help="sequential (llm-compressor's choice for these modifiers: each block calibrates on "
        "the outputs of the blocks already pruned) or basic (one pass of the dense model, all "
        "layers pruned after it: the statistics autoprune uses); for diagnosis",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        sys.exit(f"sparsity {args.sparsity} is outside [0, 1)")
    nm = None
    if args.nm:
        try:
            nm = tuple(int(part) for part in args.nm.split(":"))
        except ValueError:
            nm = None
        if nm is None or len(nm) != 2 or not 0 < nm[0] < nm[1]:
            sys.exit(f"bad N:M pattern {args.nm!r}")

    windows = torch.load(args.windows)
    calibration = windows["calibration"].to(torch.long)
    evaluation = torch.load(args.eval) if args.eval else windows["evaluation"]
    if isinstance(evaluation, dict):
        evaluation = evaluation["evaluation"]
    evaluation = evaluation.to(torch.long)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    model.config.use_cache = False
    dense_ppl = None if args.no_dense_ppl else perplexity(model, evaluation)

    # llm-compressor's own 2:4 means "prune 2 of every 4" (prune_n:prune_m); for 2:4 (keep 2 of 4)
    # the two agree. For other patterns, N pruned = M - N kept.
    if nm is not None:
        mask_structure = f"{nm[1] - nm[0]}:{nm[1]}"
        sparsity = 1.0 - nm[0] / nm[1]
        setting = args.nm
    else:
        mask_structure = "0:0"
        sparsity = args.sparsity
        setting = f"{round(sparsity * 100)}%"
    modifier_class = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    modifier = modifier_class(sparsity=sparsity, mask_structure=mask_structure, targets=TARGETS)
    # defaults kept as users get them: SparseGPT block_size 128, dampening_frac 0.01

    dataset = Dataset.from_dict(
        {
            "input_ids": calibration.tolist(),
            "attention_mask": torch.ones_like(calibration).tolist(),
        }
    )
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # anything oneshot writes beside itself stays out of the repository
        try:
            start = time.perf_counter()
            model = oneshot(
                model=model,
                tokenizer=tokenizer,
                dataset=dataset,
                recipe=[modifier],
                num_calibration_samples=calibration.shape[0],
                max_seq_length=calibration.shape[1],
                shuffle_calibration_samples=False,
                pipeline=args.pipeline,
            )
            prune_seconds = time.perf_counter() - start
        finally:
            os.chdir(cwd)

    layers = {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and LAYER_NAME.match(name)
    }
    per_layer = {name: 1.0 - int(torch.count_nonzero(w)) / w.numel() for name, w in layers.items()}
    checks = sparsity_checks(layers, sparsity, nm)
    linear_nonzeros = sum(int(torch.count_nonzero(w)) for w in layers.values())
    linear_total = sum(w.numel() for w in layers.values())
    ppl = perplexity(model, evaluation)
    result = {
        "version": llmcompressor.__version__,
        "torch": torch.__version__,
        "method": args.method,
        "modifier": type(modifier).__name__,
        "pipeline": args.pipeline,
        "mask_structure": mask_structure,
        "setting": setting,
        "sparsity_requested": sparsity,
        "ppl": ppl,
        "dense_ppl": dense_ppl,
        "linear_nonzeros": linear_nonzeros,
        "linear_total": linear_total,
        "linear_layers": len(layers),
        "prune_seconds": prune_seconds,
        "threads": torch.get_num_threads(),
        "calibration_windows": list(calibration.shape),
        "calibration_fingerprint": fingerprint(calibration),
        "evaluation_windows": list(evaluation.shape),
        "evaluation_fingerprint": fingerprint(evaluation),
        "checks": checks,
        "layer_sparsity": {name: round(value, 6) for name, value in per_layer.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"llm-compressor {result['version']} {args.method} {setting}: ppl {ppl:.3f} "
        f"(dense {dense_ppl}), sparsity {1 - linear_nonzeros / linear_total:.4f}, "
        f"{prune_seconds:.1f} s, checks {checks}",
        flush=True,
    )


def sparsity_checks(layers: dict[str, torch.Tensor], sparsity: float, nm) -> dict:
    """How far each layer is from the request: N:M groups, or pruned fraction per layer and row."""
    out: dict = {}
    layer_dev = row_dev = 0.0
    for w in layers.values():
        zeros_per_row = (w == 0).sum(dim=1).double()
        layer_dev = max(layer_dev, abs(float(zeros_per_row.sum()) / w.numel() - sparsity))
        row_dev = max(row_dev, float((zeros_per_row - sparsity * w.shape[1]).abs().max()))
    out["max_layer_sparsity_deviation"] = round(layer_dev, 6)
    out["max_row_deviation_weights"] = round(row_dev, 2)
    if nm is not None:
        n, m = nm
        worst = max(int((w.reshape(-1, m) != 0).sum(dim=1).max()) for w in layers.values())
        out["max_nonzeros_per_group"] = worst
        out["nm_ok"] = worst <= n
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over the windows, one window at a time (autoprune's way)."""
    total = 0.0
    for window in windows:
        ids = window.unsqueeze(0)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum").double())
    mean = total / (windows.shape[0] * (windows.shape[1] - 1))
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


def fingerprint(windows: torch.Tensor) -> str:
    """The same content hash as ``autoprune.data.windows_fingerprint``."""
    digest = hashlib.sha256(str(tuple(windows.shape)).encode())
    digest.update(windows.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    main()
