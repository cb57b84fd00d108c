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

import time

from autoprune import CalibrationConfig, prepare
from autoprune.data import evaluation_windows
from autoprune.measure import perplexity
from autoprune.structure import BlockWidths, Structure, build_subnet

from _common import DEFAULT_DATA as DATA
from _common import RESULTS, Column, add_threads, column, parse, parser, table, write_results

CUTS = {
    "ffn": ("ffn 1152/1536", BlockWidths(ffn=1152)),
    "heads": ("heads 6/9 (3x2)", BlockWidths(kv_groups=3, heads_per_group=2)),
}
#: (method, correction) in the order measured: a run stopped early has the most telling rows.
SETTINGS = [("activation", False), ("activation", True), ("obs", True), ("weighted", True),
            ("obs", False), ("weighted", False)]


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--eval-windows", type=int, default=16)
    add_threads(arguments, 2)
    arguments.add_argument("--cut", choices=sorted(CUTS), default=None, help="one cut only (default: both)")
    args = parse(arguments)
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
    settings = {"model": "smollm2-135m", "calibration": calibration.model_dump(),
                "eval_windows": eval_windows, "seq_len": 512}
    result = {"settings": settings, "rows": rows}
    write_results(result, RESULTS, f"structured_methods{suffix}", markdown(result))


#: The table's columns: a cut's perplexity by method, with and without the correction.
COLUMNS = [
    column("cut", "cut", align="---"), column("method", "method", align="---"),
    Column("LS correction", lambda r: "yes" if r["correct"] else "no", "---"),
    column("ppl", "ppl", ".2f", "---"), column("cut seconds", "seconds", align="---"),
]


def markdown(result: dict) -> str:
    """The results' table, from the JSON alone. The command's ``--cut`` is the one cut the rows
    hold, if one (a run of both cuts stopped before its first heads row reads as ``--cut ffn``)."""
    cuts = {key for key, (label, _) in CUTS.items() for row in result["rows"] if row["cut"] == label}
    cut = f" --cut {cuts.pop()}" if len(cuts) == 1 else ""
    return (f"Command: `python experiments/structured_methods.py --eval-windows "
            f"{result['settings']['eval_windows']}{cut}`\n\n" + "\n".join(table(result["rows"], COLUMNS)) + "\n")


if __name__ == "__main__":
    main()
