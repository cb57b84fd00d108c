"""Held-out perplexity against healing tokens, for the structured and unstructured variants.

Each variant is cut or pruned from SmolLM2's cached statistics as ``autoprune prune`` does it, then
healed by :class:`autoprune.training.Healer` (KL to the dense model on WikiText-2's calibration
split; zeros kept) and measured on the first ``--test-windows`` windows of the test split at every
budget of ``--budgets``. By default the budgets are points of one heal of the largest budget (its
learning-rate schedule spans that budget, so an earlier point is mid-schedule); ``--separate``
heals each budget on its own schedule instead (costlier, what ``autoprune heal --tokens B`` gives).

Variants: ``ffn-75`` (FFN 1024 of 1536 in every block: 75% of the decoder linear weights),
``subnet-75`` (the front member at 25% fewer weights of the subnet study ``--storage/--study``),
``blocks-75`` (the subnet space's block-removal baseline at 25%), ``admm-70`` and ``sparsegpt-70``
(uniform unstructured 70%).

    python experiments/heal.py --variants ffn-75 blocks-75 admm-70 sparsegpt-70 \\
        --budgets 50000 100000 200000 400000 --test-windows 64 --threads 2 --cache-dir runs/cache
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from _common import (
    DEFAULT_DATA, Column, add_out, add_threads, column, number, parser, table, write_results,
)
from autoprune import CalibrationConfig, Pruner
from autoprune.allocation import uniform_plan
from autoprune.api import prepare
from autoprune.data import evaluation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.structure import StructureRequest, model_dims
from autoprune.study import load_existing_study, member_at, space_context, trial_plan
from autoprune.training import HealConfig, HealData, Healer
from search_spaces import SearchSpace

VARIANTS = ("ffn-75", "subnet-75", "blocks-75", "admm-70", "sparsegpt-70")


def variant_plan(name: str, loaded, stats, args) -> Plan:
    if name == "ffn-75":
        return Plan(structure=StructureRequest(ffn=1024).structure(model_dims(loaded.model)))
    if name == "blocks-75":
        ctx = space_context(loaded, stats, "sparsegpt", (0.1, 0.4), None)
        space = SearchSpace.named("subnet")
        return space.cast(space.baselines(ctx, [0.25])["blocks@0.25"], ctx)
    if name == "subnet-75":
        if args.storage is None:
            raise SystemExit("subnet-75 needs --storage and --study of a subnet study")
        member = member_at(load_existing_study(args.storage, args.study).get_trials(deepcopy=False), 0.25)
        return trial_plan(member)
    method = name.split("-")[0]
    return uniform_plan(loaded, method, 0.7)


def heal_variant(name: str, args, windows: torch.Tensor) -> dict:
    calibration = CalibrationConfig(source=args.data)
    loaded, stats, _ = prepare(args.model, calibration, args.cache_dir, progress=False)
    plan = variant_plan(name, loaded, stats, args)
    pruner = Pruner(loaded, stats)
    dense_linear = pruner.dense_linear_params
    teacher = load_model(args.model)
    rows: list[dict] = []
    budgets = sorted(args.budgets)
    student = pruner.materialize(plan)
    size = measure_size(student, loaded.adapter, dense_linear)
    one_shot = perplexity(student, windows, progress=False)
    rows.append({"tokens": 0, "ppl": one_shot})
    print(f"{name}: one-shot {one_shot:.2f} ({size.linear_nonzeros / dense_linear:.1%} of the weights)", flush=True)
    schedules = [[b] for b in budgets] if args.separate else [budgets]
    speeds = []
    for schedule in schedules:
        model = student if schedule is schedules[-1] else copy.deepcopy(student)
        config = HealConfig(tokens=schedule[-1], lr=args.lr, seq_len=args.seq_len, batch_size=args.batch)
        data = HealData.from_source(args.data, teacher, config.seq_len, config.validation_windows, config.tokens)
        healer = Healer(model, teacher.model, data, config, torch.device("cpu"))
        for budget in schedule:
            steps = budget // config.tokens_per_step - healer.step
            start = time.perf_counter()
            result = healer.run(progress=True, stop_after=steps)
            speeds.append((healer.step * config.tokens_per_step, time.perf_counter() - start, steps))
            ppl = perplexity(healer.finished_model(), windows, progress=False)
            rows.append({"tokens": budget, "ppl": ppl, "validation_ppl": result.measurements[-1].ppl})
            print(f"{name}: {budget:,} tokens -> {ppl:.2f}", flush=True)
            healer.student.train()
    trained = sum(steps for _, _, steps in speeds) * args.batch * args.seq_len
    return {
        "variant": name,
        "plan": plan.summary(),
        "kept": size.linear_nonzeros / dense_linear,
        "linear_nonzeros": size.linear_nonzeros,
        "points": rows,
        "tokens_per_second": trained / sum(seconds for _, seconds, _ in speeds),
    }


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:1]))
    arguments.add_argument("--budgets", nargs="+", type=int, default=[50_000, 100_000, 200_000, 400_000])
    arguments.add_argument("--separate", action="store_true", help="a heal per budget, each on its own schedule")
    arguments.add_argument("--model", default="smollm2-135m")
    arguments.add_argument("--data", default=DEFAULT_DATA)
    arguments.add_argument("--storage", default=None, help="the subnet study (subnet-75)")
    arguments.add_argument("--study", default=None)
    arguments.add_argument("--test-windows", type=int, default=64)
    arguments.add_argument("--lr", type=float, default=HealConfig.model_fields["lr"].default)
    arguments.add_argument("--seq-len", type=int, default=HealConfig.model_fields["seq_len"].default)
    arguments.add_argument("--batch", type=int, default=HealConfig.model_fields["batch_size"].default)
    arguments.add_argument("--cache-dir", type=Path, default=None)
    add_threads(arguments, default=2)
    add_out(arguments)
    args = arguments.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_model(args.model)
    windows = evaluation_windows(args.data, dense.tokenizer, 512, args.test_windows)
    dense_ppl = perplexity(dense.model, windows, progress=False)
    del dense
    results = [heal_variant(name, args, windows) for name in args.variants]
    budgets = sorted(args.budgets)
    columns = [
        Column("variant", lambda r: r["variant"], "---"),
        column("decoder weights kept", "kept", ".1%"),
        *[Column(f"{b // 1000}K" if b else "one-shot",
                 lambda r, b=b: number(next((p["ppl"] for p in r["points"] if p["tokens"] == b), None)))
          for b in [0, *budgets]],
        column("tokens/s", "tokens_per_second", ".0f"),
    ]
    lines = [
        f"`python experiments/heal.py {' '.join(sys.argv[1:])}`",
        "",
        f"Perplexity on the first {args.test_windows} windows (512 tokens) of the WikiText-2 test split; "
        f"dense model {dense_ppl:.2f}. "
        + ("Each budget healed on its own schedule." if args.separate else
           f"Budgets are points of one {budgets[-1]:,}-token heal."),
        "",
        *table(results, columns),
    ]
    print(write_results({"dense_ppl": dense_ppl, "results": results, "args": {k: str(v) for k, v in vars(args).items()}},
                        args.out, "heal", lines))


if __name__ == "__main__":
    main()
