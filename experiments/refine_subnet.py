"""Refinement of a sub-network of SmolLM2-135M: width level switches at equal size (DarwinLM-style).

Starts from a uniform sub-network (every block keeps ``--ffn`` FFN channels and ``--heads`` query
heads, GQA-consistent), runs ``autoprune refine``'s evolution on its widths (one block's FFN width,
in steps of 1/12, or head count goes down a level and another's up, within one FFN level of the
start's decoder linear weights; candidates ranked by KL to the dense model on validation windows
outside the evaluation ones), then measures the start and the refined plan side by side: decoder
linear weights, KL and perplexity on ``--eval-windows`` validation windows (those a study with
that many windows measures), and perplexity on the first ``--test-windows`` windows of the test
split, which refinement never saw. Calibration: the cached statistics (128 x 512 tokens of the
validation split, seed 0). Writes ``results/refine_subnet.{json,md}``.

    nice -n 10 python experiments/refine_subnet.py [--generations 12] [--offspring 6] [--threads 1]
"""

from __future__ import annotations

import time

from autoprune import CalibrationConfig
from autoprune.data import evaluation_windows
from autoprune.measure import perplexity
from autoprune.plan import Plan
from autoprune.structure import (
    BlockWidths,
    Structure,
    decoder_linear_params,
    heads_to_groups,
    model_dims,
    resolve_blocks,
)
from autoprune.study import TrialRequest, TrialWorker, WorkerSpec
from autoprune.study.refine import LevelSwitchEvolution, RefineConfig

from _common import DEFAULT_DATA as DATA
from _common import RESULTS, add_threads, column, number, parse, parser, table, write_results

MODEL = "smollm2-135m"


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--ffn", type=int, default=1152, help="FFN channels every block starts with")
    arguments.add_argument("--heads", type=int, default=6, help="query heads every block starts with")
    arguments.add_argument("--generations", type=int, default=12)
    arguments.add_argument("--offspring", type=int, default=6)
    arguments.add_argument("--pool-windows", type=int, default=32, help="validation windows candidates are ranked on")
    arguments.add_argument("--eval-windows", type=int, default=8)
    arguments.add_argument("--test-windows", type=int, default=16)
    arguments.add_argument("--seed", type=int, default=0)
    add_threads(arguments, 1)
    args = parse(arguments)
    worker = TrialWorker(WorkerSpec(model=MODEL, calibration=CalibrationConfig(source=DATA), objective="kl",
                                    eval_windows=args.eval_windows, threads=args.threads))
    dims = model_dims(worker.loaded.model)
    groups, per_group = heads_to_groups(args.heads, dims)
    start = Plan(method="sparsegpt", structure=Structure(
        every_block=BlockWidths(ffn=args.ffn, kv_groups=groups, heads_per_group=per_group)))
    config = RefineConfig(study="refine-subnet", trial=0, generations=args.generations,
                          offspring=args.offspring, pool_windows=args.pool_windows, seed=args.seed)
    began = time.perf_counter()
    evolution = LevelSwitchEvolution(worker, start, config)
    state = evolution.run(progress=True)
    seconds = time.perf_counter() - began
    refined = evolution.plan_of(state.counts)
    test = evaluation_windows(DATA, worker.loaded.tokenizer, 512, args.test_windows)
    rows = []
    for label, plan in (("uniform (start)", start), ("refined", refined)):
        measured = worker.run(TrialRequest(0, plan))
        shapes = resolve_blocks(plan.structure, plan.removed_blocks, dims)
        rows.append({
            "plan": label, "params": decoder_linear_params(shapes, dims), "kl": measured.kl,
            "ppl": measured.ppl, "test_ppl": perplexity(worker.pruner.subnet(plan), test),
            "ffn": [s.ffn for s in shapes], "heads": [s.heads for s in shapes],
        })
        print(rows[-1], flush=True)
    result = {
        "settings": {"model": MODEL, "ffn": args.ffn, "heads": args.heads, "generations": args.generations,
                     "offspring": args.offspring, "pool_windows": args.pool_windows,
                     "eval_windows": args.eval_windows,
                     "test_windows": args.test_windows, "seed": args.seed},
        "accepted": state.accepted, "fitness": state.history, "seconds": round(seconds, 1), "rows": rows,
        "refined_plan": refined.model_dump(mode="json"),
    }
    print(write_results(result, RESULTS, "refine_subnet", markdown(result)))


COLUMNS = [
    column("plan", "plan", align="---"), column("decoder linear weights", "params"),
    column("validation KL", "kl", ".4f"), column("validation ppl", "ppl", ".2f"),
    column("test ppl", "test_ppl", ".2f"),
]


def markdown(result: dict) -> str:
    """The side-by-side table, from the JSON alone."""
    s = result["settings"]
    command = (f"nice -n 10 python experiments/refine_subnet.py --ffn {s['ffn']} --heads {s['heads']} "
               f"--generations {s['generations']} --offspring {s['offspring']} --pool-windows "
               f"{s['pool_windows']} --eval-windows "
               f"{s['eval_windows']} --test-windows {s['test_windows']} --seed {s['seed']}")
    refined = result["rows"][-1]
    return (
        f"Command: `{command}`\n\n" + "\n".join(table(result["rows"], COLUMNS)) + "\n\n"
        f"{result['accepted']} of {s['generations']} generations improved the parent, "
        f"{number(result['seconds'], '.0f')} s. Refined FFN widths per block: {refined['ffn']}; "
        f"query heads: {refined['heads']}.\n"
    )


if __name__ == "__main__":
    main()
