"""Structured methods on SmolLM2-135M: which heads / FFN channels go, with and without correction.

For two uniform cuts, FFN width 1152 of 1536 (75%) in every block and 6 of 9 query heads (3 KV
groups of 2) in every block, each structured method (``activation``: Minitron's activation norm;
``weighted``: activation norm times the consuming column's norm; ``obs``: greedy structured OBS)
is measured with and without the least-squares correction of ``o_proj`` / ``down_proj``:
perplexity on the first 16 windows (512 tokens) of WikiText-2's test split, from the cached
calibration statistics (128 x 512 tokens of the validation split, seed 0). The default structured
method and correction in :mod:`autoprune.structure` are the best row here. Writes
``results/structured_methods.json`` and ``results/structured_methods.md``.

    python experiments/structured_methods.py [--eval-windows 16] [--threads 2] [--cut ffn|heads]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from autoprune import CalibrationConfig, prepare
from autoprune.data import evaluation_windows
from autoprune.measure import perplexity
from autoprune.structure import BlockWidths, Structure, build_subnet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = str(HERE.parent.parent / "shared" / "data" / "wikitext-2")
CUTS = {
    "ffn": ("ffn 1152/1536", BlockWidths(ffn=1152)),
    "heads": ("heads 6/9 (3x2)", BlockWidths(kv_groups=3, heads_per_group=2)),
}
#: (method, correction) in the order measured: a run stopped early has the most telling rows.
SETTINGS = [("activation", False), ("activation", True), ("obs", True), ("weighted", True),
            ("obs", False), ("weighted", False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cut", choices=sorted(CUTS), default=None, help="one cut only (default: both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calibration = CalibrationConfig(source=DATA, n_samples=128, seq_len=512, seed=0)
    loaded, stats, _ = prepare("smollm2-135m", calibration, progress=False)
    windows = evaluation_windows(DATA, loaded.tokenizer, 512, args.eval_windows)
    rows = [{"cut": "dense", "method": "-", "correct": False, "ppl": perplexity(loaded.model, windows), "seconds": 0.0}]
    print(rows[-1], flush=True)
    suffix = f"_{args.cut}" if args.cut else ""
    for cut, widths in (CUTS.values() if args.cut is None else [CUTS[args.cut]]):
        for method, correct in SETTINGS:
            start = time.perf_counter()
            subnet = build_subnet(loaded.model, stats, Structure(method=method, correct=correct, every_block=widths))
            seconds = time.perf_counter() - start
            rows.append({"cut": cut, "method": method, "correct": correct,
                         "ppl": perplexity(subnet, windows), "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
            _write(rows, calibration, args.eval_windows, suffix)  # a stopped run keeps its rows


def _write(rows: list[dict], calibration: CalibrationConfig, eval_windows: int, suffix: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    settings = {"model": "smollm2-135m", "calibration": calibration.model_dump(),
                "eval_windows": eval_windows, "seq_len": 512}
    (RESULTS / f"structured_methods{suffix}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    lines = ["| cut | method | LS correction | ppl | cut seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['cut']} | {r['method']} | {'yes' if r['correct'] else 'no'} | {r['ppl']:.2f} | {r['seconds']} |"
              for r in rows]
    (RESULTS / f"structured_methods{suffix}.md").write_text(
        f"Command: `python experiments/structured_methods.py --eval-windows {eval_windows}"
        f"{' --cut ' + suffix[1:] if suffix else ''}`\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
