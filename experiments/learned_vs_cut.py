"""Learned structure against cut-then-heal at equal tokens: which sub-network to train.

At each ``--targets`` size (fractions of SmolLM2's decoder linear weights removed) and each token
budget of ``--budgets``, three sub-networks each get the same tokens of training on WikiText-2's
calibration split, then are measured on the first ``--test-windows`` windows of the test split and
timed side by side with the dense model (prefill of 512 tokens, decode per token; interleaved
rounds, ``autoprune.latency``):

* ``learned``: ``autoprune prune --structured learned`` (gates trained with the weights on the first
  half of the tokens, the cut model corrected from the statistics and healed on the second); with
  ``--learn-budget latency`` the target counts the prefill the export's latency table prices, and
  every row also shows its priced prefill beside the measured one;
* ``cut``: the best one-shot cut at that size, uniform FFN width with every head kept (the
  strongest one-shot structure measured here, ``subnet_front.py``), healed with all the tokens;
* ``pick``: the training-aware pick of a ``subnet`` study at that size (``--storage/--study``, the
  winner its ``heal_targets`` selection recorded), healed with all the tokens.

    python experiments/learned_vs_cut.py --targets 0.15 0.25 0.35 --budgets 200000 400000 \\
        --methods learned cut --test-windows 64 --threads 2 --cache-dir runs/cache
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from _common import DEFAULT_DATA, Column, add_out, add_threads, column, parser, table, write_results
from autoprune import CalibrationConfig, Pruner
from autoprune.api import prepare
from autoprune.data import evaluation_windows
from autoprune.latency import LatencySettings, export_table, measure_interleaved
from autoprune.measure import measure_size, perplexity
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.structure import model_dims, resolve_blocks
from autoprune.study import load_existing_study, space_context, trial_plan
from autoprune.training import GateSettings, HealConfig, heal, learn_structure
from search_spaces import SearchSpace

METHODS = ("learned", "cut", "pick")


def cut_plan(method: str, target: float, loaded, stats, args) -> Plan | None:
    """The plan ``cut`` or ``pick`` heals at ``target`` (None: the study has no pick there)."""
    if method == "cut":
        ctx = space_context(loaded, stats, "sparsegpt", (0.1, 0.4), None)
        space = SearchSpace.named("subnet")
        return space.cast(space.baselines(ctx, [target])[f"uniform-ffn@{target}"], ctx)
    study = load_existing_study(args.storage, args.study)
    selection = study.user_attrs.get(f"heal_selection:{target:g}")
    return trial_plan(study.trials[selection["winner"]]) if selection else None


def run_one(method: str, target: float, budget: int, args, teacher, latency) -> dict | None:
    config = HealConfig(tokens=budget, lr=args.lr)
    loaded, stats, _ = prepare(args.model, CalibrationConfig(source=args.data), args.cache_dir, progress=False)
    if method == "learned":  # its cut corrected from the statistics, as `prune --structured learned` does
        learned = learn_structure(teacher, args.data, target, config, budget=args.learn_budget, latency=latency,
                                  progress=True, cache_dir=args.cache_dir, stats=stats,
                                  gate_settings=GateSettings(warm_start=args.warm_start, gate_lr=args.gate_lr))
        return {"model": learned.model, "plan": learned.plan, "heal": learned.heal.as_dict()["final"]}
    plan = cut_plan(method, target, loaded, stats, args)
    if plan is None:
        return None
    student = Pruner(loaded, stats).materialize(plan)
    healed, result = heal(copy.deepcopy(student), teacher, args.data, config, progress=True, cache_dir=args.cache_dir)
    return {"model": healed, "plan": plan, "heal": result.as_dict()["final"]}


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--targets", nargs="+", type=float, default=[0.15, 0.25, 0.35])
    arguments.add_argument("--budgets", nargs="+", type=int, default=[200_000, 400_000])
    arguments.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS[:2]))
    arguments.add_argument("--model", default="smollm2-135m")
    arguments.add_argument("--data", default=DEFAULT_DATA)
    arguments.add_argument("--storage", default=None, help="the subnet study whose picks `pick` heals")
    arguments.add_argument("--study", default=None)
    arguments.add_argument("--test-windows", type=int, default=64)
    gates = GateSettings.model_fields
    arguments.add_argument("--warm-start", type=float, default=gates["warm_start"].default,
                           help="learned: the gates' spread from the statistics' importance (0: equal gates)")
    arguments.add_argument("--gate-lr", type=float, default=gates["gate_lr"].default,
                           help="learned: the gates' learning rate at the schedule's peak")
    arguments.add_argument("--learn-budget", choices=["params", "latency"], default="params",
                           help="learned: what the target counts (decoder linear weights, or priced prefill)")
    arguments.add_argument("--lr", type=float, default=HealConfig.model_fields["lr"].default)
    arguments.add_argument("--repeats", type=int, default=4, help="timing rounds")
    arguments.add_argument("--cache-dir", type=Path, default=None)
    add_threads(arguments, default=2)
    add_out(arguments)
    args = arguments.parse_args()
    if "pick" in args.methods and args.storage is None:
        raise SystemExit("--methods pick needs --storage and --study of a subnet study with heal_targets")
    torch.set_num_threads(args.threads)
    teacher = load_model(args.model)
    windows = evaluation_windows(args.data, teacher.tokenizer, 512, args.test_windows)
    dense_linear = measure_size(teacher.model, teacher.adapter).linear_params
    latency = export_table(teacher, args.cache_dir) if args.learn_budget == "latency" else None
    dims = model_dims(teacher.model)
    rows, models = [], [teacher.model]
    for target in args.targets:
        for budget in sorted(args.budgets):
            for method in args.methods:
                done = run_one(method, target, budget, args, teacher, latency)
                if done is None:
                    continue
                model = done["model"].eval()
                size = measure_size(model, teacher.adapter, dense_linear)
                ppl = perplexity(model, windows, progress=False)
                print(f"{method} at {target:.0%} with {budget:,} tokens: {ppl:.2f}", flush=True)
                rows.append({"method": method, "target": target, "tokens": budget, "ppl": ppl,
                             "kept": size.linear_params / dense_linear, "plan": done["plan"].summary(),
                             "validation": done["heal"]})
                if latency is not None:
                    plan = done["plan"]
                    priced = latency.predict(resolve_blocks(plan.structure, plan.removed_blocks, dims)).prefill_ms
                    rows[-1]["priced_x"] = priced / latency.predict(resolve_blocks(None, [], dims)).prefill_ms
                models.append(model)
    timings = measure_interleaved(models, LatencySettings(repeats=args.repeats, threads=args.threads))
    for row, timing in zip(rows, timings[1:], strict=True):
        row["prefill_x"] = timing.prefill_ms / timings[0].prefill_ms
        row["decode_x"] = timing.decode_ms / timings[0].decode_ms
    dense_ppl = perplexity(teacher.model, windows, progress=False)
    lines = [
        f"`python experiments/learned_vs_cut.py {' '.join(sys.argv[1:])}`",
        "",
        f"Perplexity on the first {args.test_windows} windows (512 tokens) of the WikiText-2 test split "
        f"(dense {dense_ppl:.2f}); prefill and decode timed side by side with the dense model "
        f"({timings[0].prefill_ms:.0f} ms, {timings[0].decode_ms:.1f} ms/token; {args.threads} threads).",
        "",
        *table(rows, [
            column("target", "target", ".0%"), column("tokens", "tokens", ","),
            Column("method", lambda r: r["method"], "---"), column("weights kept", "kept", ".1%"),
            column("ppl", "ppl", ".2f"),
            *([column("priced prefill x dense", "priced_x", ".3f")] if latency is not None else []),
            column("prefill x dense", "prefill_x", ".3f"),
            column("decode x dense", "decode_x", ".3f"),
        ]),
    ]
    print(write_results({"dense_ppl": dense_ppl, "dense_timing": timings[0].__dict__, "rows": rows,
                         "args": {k: str(v) for k, v in vars(args).items()}}, args.out, "learned_vs_cut", lines))


if __name__ == "__main__":
    main()
