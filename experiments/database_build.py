"""Variant database on SmolLM2: build time and disk per method, budget error of grid allocations,
and a trial's prune seconds with the database against pruning the plan directly.

For each method: a fresh database is built ahead at the given levels (``autoprune database
build``'s code path), timed per level, with its disk size beside a dense float32 copy per level.
Then, on the built database, plans are pruned both ways and timed: a uniform plan at a built
level, and layer-wise allocations drawn from the ``layerwise`` space on the grid (every layer but
one read; the one off-grid layer is pruned on first use and stored, then read like the others),
checking that database and direct weights are identical. The budget error of grid allocations is measured on the same draws.

    python experiments/database_build.py --methods sparsegpt admm \\
        --levels sparsegpt=0.25-0.95,2:4 admm=0.5,0.625,0.75 --threads 2
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from _common import (
    DEFAULT_DATA, Column, add_out, add_threads, apply_threads, number, parser, table, write_results,
)
from autoprune.api import Prepared, prepare
from autoprune.config import CalibrationConfig
from autoprune.plan import LayerSpec, Plan
from autoprune.pruner import Pruner
from autoprune.variants import VariantDatabase, build_database, level_key, parse_levels
from search_spaces import SearchSpace, SpaceContext


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--model", default="smollm2-135m")
    arguments.add_argument("--data", default=DEFAULT_DATA)
    arguments.add_argument("--methods", nargs="+", default=["sparsegpt", "admm"])
    arguments.add_argument("--levels", nargs="+", default=["sparsegpt=0.25-0.95,2:4", "admm=0.5,0.625,0.75"],
                           help="METHOD=LEVEL,LEVEL,... per method")
    arguments.add_argument("--grid", type=int, default=32)
    arguments.add_argument("--draws", type=int, default=3, help="layer-wise allocations timed per method")
    arguments.add_argument("--budget-draws", type=int, default=48, help="random allocations (the main job's 48 trials)")
    arguments.add_argument("--folder", type=Path, default=None, help="database folder (default: a temporary one)")
    add_threads(arguments, 2)
    add_out(arguments)
    args = arguments.parse_args()
    apply_threads(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    levels = dict(item.split("=", 1) for item in args.levels)
    prepared = prepare(args.model, CalibrationConfig(source=args.data), None, True)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="autoprune-db-"))
    ctx = SpaceContext.from_model(prepared.loaded, prepared.stats, "sparsegpt", (0.4, 0.8))
    budget = budget_errors(ctx, args.grid, args.budget_draws)
    rows = []
    try:
        for method in args.methods:
            database = VariantDatabase(prepared.stats, folder)
            pruner = Pruner(prepared.loaded, prepared.stats, database)
            report = build_database(pruner, method, parse_levels(levels[method].split(","), args.grid))
            dense = pruner.dense_linear_params * 4
            for level in report.levels:
                level["dense_fp32_bytes"] = dense * level["layers"] // len(pruner.layer_names)
            plans = trial_plans(ctx, method, args.grid, args.draws, report.levels)
            rows.append({
                "method": method, "levels": report.levels, "build_seconds": report.seconds,
                "disk_bytes": database.disk_bytes(method), "trials": [time_plan(prepared, database, p) for p in plans],
                "single_layers": single_layer_seconds(prepared, method),
            })
            print(rows[-1])
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    result = {"model": args.model, "grid": args.grid, "threads": args.threads, "budget": budget, "methods": rows}
    print(write_results(result, args.out, "database_build", markdown(result)))


def random_params(ctx: SpaceContext, draws: int, seed: int) -> list[dict]:
    """``draws`` parameter sets of the ``layerwise`` space, drawn by Optuna's random sampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    distributions = SearchSpace.named("layerwise").distributions(ctx)
    return [study.ask(distributions).params for _ in range(draws)]


def budget_errors(ctx: SpaceContext, grid: int, draws: int) -> dict:
    """|non-zeros - budget| of random layer-wise allocations without and with the grid, and how
    many layers per plan the grid leaves off it."""
    space = SearchSpace.named("layerwise")
    gridded = replace(ctx, grid=grid)
    errors: dict[str, list[int]] = {"none": [], "grid": []}
    off_grid, variants, chosen = [], set(), []
    for params in random_params(ctx, draws, seed=0):
        budget = round((1 - params["target"]) * ctx.dense_linear_params)
        for key, context in (("none", ctx), ("grid", gridded)):
            errors[key].append(abs(context.nonzeros(space.cast(params, context)) - budget))
        plan = space.cast(params, gridded)
        keys = {name: level_key(spec, ctx.layers[name].cols, grid) for name, spec in plan.layers.items()}
        off_grid.append(sum(not plan.layers[name].is_dense and key is None for name, key in keys.items()))
        variants |= {(name, key) for name, key in keys.items() if key is not None}
        chosen += [plan.layers[name].sparsity for name, key in keys.items() if key is not None]
    weights = sum(ctx.layers[name].rows * ctx.layers[name].cols for name, _ in variants)
    chosen.sort()
    return {key: {"max": max(v), "mean": sum(v) / len(v)} for key, v in errors.items()} | {
        "off_grid_layers_max": max(off_grid), "draws": draws, "dense": ctx.dense_linear_params,
        "distinct_variants": len(variants), "whole_model_equivalents": weights / ctx.dense_linear_params,
        "levels_p2_5_p97_5": [chosen[int(0.025 * len(chosen))], chosen[int(0.975 * len(chosen)) - 1]],
    }


def trial_plans(ctx: SpaceContext, method: str, grid: int, draws: int, levels: list[dict]) -> list[tuple[str, Plan]]:
    """A uniform plan at the first built unstructured level, then ``draws`` grid allocations."""
    level = next(float(row["level"]) for row in levels if ":" not in row["level"])
    plans = [(f"uniform {level:g}", Plan(method=method, layers={n: LayerSpec(sparsity=level) for n in ctx.layers}))]
    gridded = replace(ctx, grid=grid, method=method)
    space = SearchSpace.named("layerwise")
    for index, params in enumerate(random_params(ctx, draws, seed=1)):
        plans.append((f"layer-wise draw {index}", space.cast(params, gridded)))
    return plans


def time_plan(prepared: Prepared, database: VariantDatabase, named: tuple[str, Plan]) -> dict:
    """Seconds to the plan's weights directly and from the database (twice: the first read fills
    what the plan lacks), and the largest difference between the two."""
    name, plan = named
    direct = Pruner(prepared.loaded, prepared.stats)
    start = time.perf_counter()
    weights = direct.pruned_weights(plan)
    direct_s = time.perf_counter() - start
    seconds = []
    for _ in range(2):
        assembled = Pruner(prepared.loaded, prepared.stats, database)
        start = time.perf_counter()
        from_db = assembled.pruned_weights(plan)
        seconds.append(time.perf_counter() - start)
    differ = max(float((weights[k] - from_db[k]).abs().max()) for k in weights)
    return {"plan": name, "direct_s": round(direct_s, 3), "first_s": round(seconds[0], 3),
            "database_s": round(seconds[1], 3), "max_abs_difference": differ}


def single_layer_seconds(prepared: Prepared, method: str) -> list[dict]:
    """Seconds to prune the narrowest and the widest layer alone, at 0.6: what the one layer a
    grid allocation leaves off the grid costs the first trial that asks for its count."""
    pruner = Pruner(prepared.loaded, prepared.stats)
    shapes = pruner.layer_shapes()
    rows = []
    for name in (min(shapes, key=lambda n: shapes[n][0] * shapes[n][1]), max(shapes, key=lambda n: shapes[n][0] * shapes[n][1])):
        start = time.perf_counter()
        pruner.prune_layers(method, {name: LayerSpec(sparsity=0.6)})
        rows.append({"layer": name, "shape": list(shapes[name]), "seconds": round(time.perf_counter() - start, 3)})
    return rows


def markdown(result: dict) -> str:
    lines = [f"Grid: steps of 1/{result['grid']}; {result['threads']} torch threads.", ""]
    for row in result["methods"]:
        lines += [f"**{row['method']}**: build {row['build_seconds']:.1f} s, disk {row['disk_bytes'] / 2**20:.1f} MiB", ""]
        lines += table(row["levels"], [
            _col("level", "level", None), _col("layers pruned", "pruned", "d"), _col("seconds", "seconds", ".1f"),
            _col("MiB on disk", "bytes_written", "mib"), _col("MiB dense fp32", "dense_fp32_bytes", "mib")])
        lines += [""] + table(row["trials"], [
            _col("plan", "plan", None), _col("direct prune s", "direct_s", ".2f"),
            _col("database, first s", "first_s", ".2f"), _col("database s", "database_s", ".2f"),
            _col("max |difference|", "max_abs_difference", ".3g")]) + [""]
        singles = row.get("single_layers", [])
        lines += [", ".join(f"{one['layer']} {one['shape'][0]}x{one['shape'][1]} alone: {one['seconds']:.2f} s"
                            for one in singles) + " (pruned directly, at 0.6)", ""] if singles else []
    budget = result["budget"]
    lines += [f"Budget error of layer-wise allocations ({budget['draws']} draws, {budget['dense']} dense weights): "
              f"without grid max {budget['none']['max']} mean {budget['none']['mean']:.1f}; on the grid max "
              f"{budget['grid']['max']} mean {budget['grid']['mean']:.1f}; off-grid layers per plan at most "
              f"{budget['off_grid_layers_max']}.",
              "",
              f"Lazy build: these {budget['draws']} allocations ask for {budget['distinct_variants']} distinct "
              f"(layer, level) variants, {budget['whole_model_equivalents']:.1f} whole-model prunes' worth of "
              f"weights; 95% of their layers lie between sparsity {budget['levels_p2_5_p97_5'][0]:g} and "
              f"{budget['levels_p2_5_p97_5'][1]:g}."]
    return "\n".join(lines) + "\n"


def _col(title: str, key: str, spec: str | None) -> Column:
    if spec == "mib":
        return Column(title, lambda row: number(row[key] / 2**20, ".1f"))
    return Column(title, lambda row: row[key] if spec is None else format(row[key], spec))


if __name__ == "__main__":
    main()
