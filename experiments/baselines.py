"""Baselines on SmolLM2-135M and WikiText-2, side by side with llm-compressor.

Dense, magnitude, Wanda and SparseGPT at 50/60/70% and 2:4, and OWL+Wanda at 70%, through
autoprune; then the same calibration windows and the same evaluation windows go through
llm-compressor's WandaPruningModifier and SparseGPTModifier (run by ``peer_llmcompressor.py`` in its
own virtual environment, ``.venv-peer``, because its version pins differ). Writes
``results/baselines.json`` and ``results/baselines.md``.

    python experiments/baselines.py [--calib-samples 128] [--eval-windows 16] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoprune import CalibrationConfig, PlanRequest, Pruner, prepare
from autoprune.data import evaluation_windows
from autoprune.export import save_checkpoint
from autoprune.measure import measure_size, perplexity
from autoprune.plan import NMPattern

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEER_PYTHON = HERE.parent / ".venv-peer" / "bin" / "python"
SETTINGS = [("50%", 0.5, None), ("60%", 0.6, None), ("70%", 0.7, None), ("2:4", 0.0, "2:4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared/data/wikitext-2"))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    args = parser.parse_args()

    calibration = CalibrationConfig(
        source=args.data, n_samples=args.calib_samples, seq_len=args.seq_len
    )
    start = time.perf_counter()
    loaded, stats, cached = prepare(args.model, calibration)
    calibration_seconds = time.perf_counter() - start
    windows = evaluation_windows(args.data, loaded.tokenizer, args.seq_len, args.eval_windows)
    pruner = Pruner(loaded, stats)
    dense_linear = sum(r * c for r, c in pruner.layer_shapes().values())
    rows = [measure(pruner, "dense", "-", PlanRequest("magnitude", 0.0), windows, dense_linear)]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for label, sparsity, nm in SETTINGS:
            request = PlanRequest(method, sparsity, NMPattern.parse(nm) if nm else None)
            rows.append(measure(pruner, method, label, request, windows, dense_linear))
    rows.append(measure(pruner, "owl+wanda", "70%", PlanRequest("wanda", 0.7, owl=True), windows, dense_linear))
    if not args.no_peer:
        rows += peer_rows(loaded, calibration, windows)
    result = {
        "model": args.model,
        "calibration": calibration.model_dump(),
        "calibration_seconds": round(calibration_seconds, 1),
        "calibration_cached": cached,
        "eval_windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "baselines.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "baselines.md").write_text(markdown(result))
    print(markdown(result))


def measure(pruner: Pruner, method: str, label: str, request: PlanRequest, windows, dense_linear) -> dict:
    plan = request.build(pruner.loaded, pruner.stats)
    start = time.perf_counter()
    weights = pruner.pruned_weights(plan)  # timed on its own: the first call also builds caches
    prune_seconds = time.perf_counter() - start
    del weights
    with pruner.applied(plan) as model:
        ppl = perplexity(model, windows, progress=True)
        size = measure_size(model, pruner.loaded.adapter, dense_linear)
    row = {
        "tool": "autoprune",
        "method": method,
        "setting": label,
        "ppl": round(ppl, 3),
        "sparsity": round(size.sparsity, 4),
        "linear_nonzeros": size.linear_nonzeros,
        "nonzero_params": size.nonzero_params,
        "prune_seconds": round(prune_seconds, 2),
    }
    print(row, flush=True)
    return row


def peer_rows(loaded, calibration: CalibrationConfig, windows: torch.Tensor) -> list[dict]:
    """Run llm-compressor on the same dense weights, calibration windows and evaluation windows."""
    if not PEER_PYTHON.exists():
        sys.exit(f"llm-compressor environment missing: {PEER_PYTHON} (run `make peer-venv`)")
    from autoprune.data import calibration_windows

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        save_checkpoint(loaded.model, loaded.tokenizer, dense_dir, {"purpose": "peer baseline"})
        windows_file = Path(tmp) / "windows.pt"
        torch.save(
            {
                "calibration": calibration_windows(
                    calibration.source, loaded.tokenizer, calibration.n_samples,
                    calibration.seq_len, calibration.seed,
                ),
                "evaluation": windows,
            },
            windows_file,
        )
        for method in ("wanda", "sparsegpt"):
            for label, sparsity, nm in SETTINGS:
                out = Path(tmp) / f"{method}-{label.replace(':', '_').replace('%', '')}.json"
                target = ["--nm", nm] if nm else ["--sparsity", str(sparsity)]
                command = [str(PEER_PYTHON), str(HERE / "peer_llmcompressor.py"), "--model",
                           str(dense_dir), "--windows", str(windows_file), "--method", method,
                           *target, "--out", str(out), "--threads", str(torch.get_num_threads())]
                subprocess.run(command, check=True)
                peer = json.loads(out.read_text())
                row = {
                    "tool": f"llm-compressor {peer['version']}",
                    "method": method,
                    "setting": label,
                    "ppl": round(peer["ppl"], 3),
                    "sparsity": round(1 - peer["linear_nonzeros"] / peer["linear_total"], 4),
                    "linear_nonzeros": peer["linear_nonzeros"],
                    "nonzero_params": None,
                    "prune_seconds": round(peer["prune_seconds"], 2),
                }
                print(row, flush=True)
                rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"SmolLM2-135M, WikiText-2 test perplexity ({result['eval_windows']} windows of "
        f"{result['seq_len']} tokens); calibration {result['calibration']['n_samples']} x "
        f"{result['calibration']['seq_len']} tokens of the validation split.",
        "",
        "| tool | method | setting | ppl | sparsity | linear non-zeros | all non-zeros | prune s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['tool']} | {row['method']} | {row['setting']} | {row['ppl']:.2f} | "
            f"{row['sparsity']:.3f} | {row['linear_nonzeros']:,} | "
            f"{'-' if row['nonzero_params'] is None else format(row['nonzero_params'], ',')} | "
            f"{row['prune_seconds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
