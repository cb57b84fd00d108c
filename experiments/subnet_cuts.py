"""Sub-network cuts from the variant database on SmolLM2: what a process that finds them stored
saves against one that chooses and corrects them itself.

Plans: the ``subnet`` space's baselines (uniform width, uniform FFN width, FLAP-style, block
removal) at the given targets, then random draws of the space. Three pruners build every plan's
model in turn, as a search's worker does (each keeps its in-memory cut cache across plans): one
without a database, one on an empty database (choosing, correcting and storing each cut once), and
a fresh one on the now filled database, as a Ray worker, a resumed search, ``refine`` or ``export``
opens it. Per pruner: total and per-plan seconds, cuts computed / read, and that every model's
logits on one validation window equal the first pruner's.

    python experiments/subnet_cuts.py --targets 0.15 0.25 0.35 --draws 8 --threads 2
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import optuna
import torch

from _common import DEFAULT_DATA, Column, add_out, add_threads, apply_threads, parser, table, write_results
from autoprune.api import prepare
from autoprune.config import CalibrationConfig
from autoprune.data import validation_windows
from autoprune.plan import Plan
from autoprune.pruner import Pruner
from autoprune.variants import VariantDatabase
from search_spaces import SearchSpace, SpaceContext


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--model", default="smollm2-135m")
    arguments.add_argument("--data", default=DEFAULT_DATA)
    arguments.add_argument("--cache-dir", type=Path, default=None, help="calibration cache")
    arguments.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.25, 0.35])
    arguments.add_argument("--draws", type=int, default=8, help="random plans of the subnet space")
    add_threads(arguments, 2)
    add_out(arguments)
    args = arguments.parse_args()
    apply_threads(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = prepare(args.model, CalibrationConfig(source=args.data), args.cache_dir, True)
    window = validation_windows(args.data, prepared.loaded.tokenizer, 512, 1)
    plans = subnet_plans(SpaceContext.from_model(prepared.loaded, prepared.stats, "sparsegpt", (0.1, 0.4)),
                         args.targets, args.draws)
    folder = Path(tempfile.mkdtemp(prefix="autoprune-cuts-"))
    try:
        runs, reference = [], None
        for label, database in (("no database", None), ("empty database", VariantDatabase(prepared.stats, folder)),
                                ("filled database, new process", VariantDatabase(prepared.stats, folder))):
            run, logits = build_all(Pruner(prepared.loaded, prepared.stats, database), plans, window)
            reference = reference if reference is not None else logits
            run |= {"pruner": label, "max_abs_logit_difference": max(
                float((a - b).abs().max()) for a, b in zip(logits, reference, strict=True))}
            if database is not None:
                run |= {"cuts_read": database.counters.read, "cuts_written": database.counters.written,
                        "disk_bytes": database.disk_bytes("cuts")}
            runs.append(run)
            print({key: value for key, value in run.items() if key != "plans"})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"model": args.model, "threads": args.threads, "targets": args.targets, "draws": args.draws,
              "runs": runs}
    print(write_results(result, args.out, "subnet_cuts", markdown(result)))


def subnet_plans(ctx: SpaceContext, targets: list[float], draws: int) -> list[tuple[str, Plan]]:
    """The space's baselines at ``targets``, then ``draws`` random plans."""
    space = SearchSpace.named("subnet")
    named = [(label, space.cast(params, ctx)) for label, params in space.baselines(ctx, targets).items()]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    distributions = space.distributions(ctx)
    named += [(f"draw {i}", space.cast(study.ask(distributions).params, ctx)) for i in range(draws)]
    return named


def build_all(pruner: Pruner, plans: list[tuple[str, Plan]], window: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    """Seconds to build each plan's model with ``pruner``, and the models' logits on ``window``."""
    seconds, logits = [], []
    for _, plan in plans:
        start = time.perf_counter()
        model = pruner.subnet(plan)
        seconds.append(time.perf_counter() - start)
        with torch.no_grad():
            logits.append(model(window[:1]).logits[0, -1])
    return {"seconds": round(sum(seconds), 2), "plans": [
        {"plan": label, "seconds": round(s, 3)} for (label, _), s in zip(plans, seconds, strict=True)]}, logits


def markdown(result: dict) -> str:
    lines = [f"{len(result['runs'][0]['plans'])} plans (baselines at {', '.join(map(str, result['targets']))}, "
             f"{result['draws']} random draws); {result['threads']} torch threads.", ""]
    lines += table(result["runs"], [
        Column("pruner", lambda row: row["pruner"], "---"),
        Column("build s, all plans", lambda row: f"{row['seconds']:.2f}"),
        Column("first plan s", lambda row: f"{row['plans'][0]['seconds']:.2f}"),
        Column("cuts computed and stored", lambda row: row.get("cuts_written", "-")),
        Column("cuts read", lambda row: row.get("cuts_read", "-")),
        Column("MiB on disk", lambda row: f"{row['disk_bytes'] / 2**20:.1f}" if "disk_bytes" in row else "-"),
        Column("max logit difference", lambda row: f"{row['max_abs_logit_difference']:.3g}"),
    ])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
