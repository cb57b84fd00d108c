"""How much do per-projection offsets matter, and for which pruning method?

Starts from the ``profile`` space's steepest depth-ramp seed at one target (the allocation the main
job's searches put on their front at 70%) and moves sparsity between projections (``offset_q_proj``
... ``offset_down_proj``, the same in every block; the budget stays exact), then measures each
variant as a search trial does (the main job's worker: its calibration, its validation windows,
``--windows`` of them) pruned by each method. Writes ``results/projection_offsets.{json,md}``.

    python experiments/projection_offsets.py [--target 0.7] [--windows 12] [--methods sparsegpt admm]
        [--cache-dir DIR] [--database-dir DIR]
"""

from __future__ import annotations

import time

import yaml

from _common import HERE, Column, add_out, number, parser, table, write_results

from autoprune.study import SearchConfig, TrialRequest, TrialWorker
from search_spaces import SearchSpace

CONFIG = HERE.parent / "configs/smollm2-default.yaml"
#: Projection offsets of each variant (the rest zero), before the budget's common shift.
VARIANTS: dict[str, dict[str, float]] = {
    "ramp (no offsets)": {},
    "q,k +0.1": {"q_proj": 0.1, "k_proj": 0.1},
    "v -0.1": {"v_proj": -0.1},
    "v -0.2": {"v_proj": -0.2},
    "v -0.3": {"v_proj": -0.3},
    "v -0.2, k -0.1": {"v_proj": -0.2, "k_proj": -0.1},
    "v -0.2, k -0.2": {"v_proj": -0.2, "k_proj": -0.2},
    "o -0.1": {"o_proj": -0.1},
    "down -0.1": {"down_proj": -0.1},
    "MLP +0.05": {"gate_proj": 0.05, "up_proj": 0.05, "down_proj": 0.05},
}
COLUMNS: list[Column] = [
    Column("variant", lambda row: row["variant"], "---"),
    *(
        Column(f"{method} ppl", lambda row, method=method: number(row.get(method)))
        for method in ("sparsegpt", "admm")
    ),
]


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--target", type=float, default=0.7)
    arguments.add_argument("--windows", type=int, default=12, help="validation windows per variant")
    arguments.add_argument("--methods", nargs="+", default=["sparsegpt", "admm"])
    arguments.add_argument("--cache-dir", default=None)
    arguments.add_argument("--database-dir", default=None)
    add_out(arguments)
    args = arguments.parse_args()
    settings = yaml.safe_load(CONFIG.read_text())
    settings.update(
        data=str(HERE.parent / settings["data"]), eval_windows=args.windows, space="profile",
        cache_dir=args.cache_dir, database_dir=args.database_dir,
    )
    config = SearchConfig(**settings)
    worker = TrialWorker(config.worker_spec())
    space = SearchSpace.named("profile")
    ctx = worker.space_context(config.method, config.sparsity_range)
    seed = space.seeds(ctx, [args.target])[f"ramp0.4@{args.target:.2f}"]
    rows = []
    for label, offsets in VARIANTS.items():
        params = {**seed, **{f"offset_{name}": value for name, value in offsets.items()}}
        row: dict = {"variant": label, "offsets": offsets}
        for method in args.methods:
            plan = space.cast(params, ctx).model_copy(update={"method": method})
            start = time.perf_counter()
            result = worker.run(TrialRequest(0, plan))
            row[method] = round(result.ppl, 3)
            row[f"{method}_seconds"] = round(time.perf_counter() - start, 1)
            row["sparsity"] = result.size["sparsity"]
        print(row, flush=True)
        rows.append(row)
    result = {"model": config.model, "target": args.target, "windows": args.windows, "rows": rows}
    lines = [
        f"{config.model} at {args.target:.0%} sparsity, the profile space's ramp0.4 seed with "
        f"projection offsets; perplexity on {args.windows} validation windows of "
        f"{config.seq_len} tokens (the main job's worker).",
        "",
        *table(rows, COLUMNS),
    ]
    print(write_results(result, args.out, "projection_offsets", lines), end="")


if __name__ == "__main__":
    main()
