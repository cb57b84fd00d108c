"""Sub-network fronts of SmolLM2-135M on held-out WikiText-2 test windows, against the structured
baselines and the unstructured front, on three cost axes: decoder linear weights, prefill latency
and decode latency.

Reads a study made by ``autoprune search --space subnet`` (its front members), and measures, from
the study's cached calibration statistics, on the first ``--eval-windows`` windows of the test
split (the search validated on the validation split):

- the dense model;
- the ``subnet`` space's baselines at 15 / 25 / 35% fewer decoder linear weights: uniform width of
  both sub-blocks (Minitron's uniform setting), uniform FFN width (every head kept), FLAP-style
  adaptive widths, block removal (ShortGPT / SLEB);
- the study's front members (those that are not baselines, which are measured as such);
- the unstructured front on the same axes: SparseGPT at uniform sparsities (zeros cost the dense
  model's time);
- the check the issue asks for: the front member with the most decoder linear weights at or below
  75% of the dense model's, against uniform FFN-width pruning to exactly its weight count, and
  the dense model, prefill timed interleaved (round after round, so load on the shared CPU hits
  all three alike).

Latency is measured end to end (``autoprune.latency.measure``: prefill of 512 tokens keeping the
last position's logits, decode ms per token after a 128-token prompt, medians of ``--repeats``)
and predicted from the device's cached per-shape table. Writes ``results/subnet_front.{json,md,png}``.

    python experiments/subnet_front.py --storage sqlite:///runs/subnet40.db --study subnet40 \\
        [--eval-windows 16] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import json
import statistics

import torch

from autoprune.latency import LatencySettings, latency_table, measure, prefill_ms
from autoprune.plan import LayerSpec, Plan
from autoprune.structure import BlockWidths, Structure, model_dims, resolve_blocks
from autoprune.study import front_trials, trial_plan
from search_spaces import SearchSpace, SpaceContext

from _common import column, load_study_setup, measure_one_shot, parse, study_parser, table, write_results

TARGETS = (0.15, 0.25, 0.35)
UNSTRUCTURED = (0.3, 0.5)
#: The issue's bar: the member at or below 75% of the weights, against uniform FFN width there.
CHECK_KEEP = 0.75
REQUIRED_PPL_REDUCTION = 0.25
REQUIRED_PREFILL_RATIO = 0.8


def main() -> None:
    arguments = study_parser(__doc__, required=True)
    arguments.add_argument("--eval-windows", type=int, default=16, help="test windows for perplexity")
    arguments.add_argument("--repeats", type=int, default=3, help="timings per latency median")
    arguments.add_argument("--rounds", type=int, default=7, help="interleaved prefill rounds of the check")
    args = parse(arguments)
    timing = LatencySettings(repeats=args.repeats, threads=args.threads or 1)
    setup = load_study_setup(args.storage, args.study, args.eval_windows)
    model = setup.loaded.model
    dims = model_dims(model)
    table_ = latency_table(model.config, timing)
    ctx = SpaceContext.from_model(setup.loaded, setup.pruner.stats, setup.settings.method,
                                  setup.settings.sparsity_range, outlier_thresholds=())
    dense_params = setup.pruner.dense_linear_params

    partial = args.out / "subnet_front.partial.json"  # rows measured so far: a rerun skips them
    done = {r["label"]: r for r in json.loads(partial.read_text())} if partial.is_file() else {}

    def row(kind: str, label: str, plan: Plan, trial: int | None = None) -> dict:
        if label in done:
            return done[label]
        measured = measure_one_shot(setup.pruner, plan, setup.windows, progress=False)
        with setup.pruner.applied(plan) as variant:
            timed = measure(variant, timing)
        predicted = table_.predict(resolve_blocks(plan.structure, plan.removed_blocks, dims))
        result = {
            "kind": kind, "label": label, "trial": trial, "ppl": measured.ppl,
            "params": measured.size.linear_params, "nonzeros": measured.size.linear_nonzeros,
            "keep": measured.size.linear_params / dense_params,
            "prefill_ms": timed.prefill_ms, "decode_ms": timed.decode_ms,
            "prefill_predicted": predicted.prefill_ms, "decode_predicted": predicted.decode_ms,
        }
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}, flush=True)
        done[label] = result
        partial.write_text(json.dumps(list(done.values())))
        return result

    space = SearchSpace.named("subnet")
    rows = [row("dense", "dense", Plan(method=setup.settings.method))]
    for label, params in space.baselines(ctx, TARGETS).items():
        rows.append(row("baseline", label, space.cast(params, ctx)))
    for trial in front_trials(setup.study):  # the baselines on the front are measured above
        if "baseline" not in trial.user_attrs:
            rows.append(row("front", f"trial {trial.number}", trial_plan(trial), trial.number))
    for sparsity in UNSTRUCTURED:
        layers = {name: LayerSpec(sparsity=sparsity) for name in setup.pruner.layer_names}
        rows.append(row("unstructured", f"sparsegpt {sparsity:.0%}", Plan(method="sparsegpt", layers=layers)))
    check = _check(setup, dims, timing, args.rounds, dense_params)
    payload = {"settings": {**vars(args), "out": str(args.out)}, "table_key": table_.key, "rows": rows,
               "check": check}
    partial.unlink(missing_ok=True)
    write_results(payload, args.out, "subnet_front", markdown(payload))
    _plot(rows, args.out / "subnet_front.png")


def _check(setup, dims, timing: LatencySettings, rounds: int, dense_params: int) -> dict:
    """The front member with the most weights at or below 75%, against uniform FFN width at its
    exact weight count and the dense model: perplexity, and prefill timed in interleaved rounds."""
    eligible = [t for t in front_trials(setup.study)
                if t.user_attrs["size"]["linear_params"] <= CHECK_KEEP * dense_params]
    if not eligible:
        return {"member": None}
    # the most weights; among equals (a three-objective front), the best validation perplexity
    chosen = max(eligible, key=lambda t: (t.user_attrs["size"]["linear_params"], -t.values[-1]))
    measured = row_without_latency(setup, trial_plan(chosen), f"trial {chosen.number}")
    member = {**measured, "trial": chosen.number, "baseline": chosen.user_attrs.get("baseline")}
    attention = dims.hidden * dims.head_dim * 2 * (dims.num_heads + dims.num_kv_heads)
    width = round((member["params"] / dims.num_blocks - attention) / (3 * dims.hidden))
    uniform = Plan(method=setup.settings.method, structure=Structure(every_block=BlockWidths(ffn=width)))
    uniform_row = row_without_latency(setup, uniform, f"uniform ffn {width}")
    plans = {
        "dense": Plan(method=setup.settings.method),
        "member": trial_plan(setup.study.trials[member["trial"]]),
        "uniform_ffn": uniform,
    }
    timings: dict[str, list[float]] = {key: [] for key in plans}
    models = {}
    for key, plan in plans.items():
        with setup.pruner.applied(plan) as variant:
            models[key] = variant if plan.structure is not None else setup.loaded.model
    previous = torch.get_num_threads()
    torch.set_num_threads(timing.threads)
    try:
        single = LatencySettings(seq_len=timing.seq_len, repeats=1, threads=timing.threads)
        for _ in range(rounds):
            for key, variant in models.items():
                timings[key].append(prefill_ms(variant, single))
    finally:
        torch.set_num_threads(previous)
    median = {key: statistics.median(values) for key, values in timings.items()}
    return {
        "member": member["trial"],
        "member_baseline": member["baseline"],
        "member_keep": member["keep"],
        "member_ppl": member["ppl"],
        "uniform_ffn_width": width,
        "uniform_ffn_keep": uniform_row["keep"],
        "uniform_ffn_ppl": uniform_row["ppl"],
        "ppl_reduction": 1 - member["ppl"] / uniform_row["ppl"],
        "prefill_ms": median,
        "member_prefill_ratio": median["member"] / median["dense"],
        "uniform_ffn_prefill_ratio": median["uniform_ffn"] / median["dense"],
        "rounds": rounds,
        "passes": (1 - member["ppl"] / uniform_row["ppl"] >= REQUIRED_PPL_REDUCTION
                   and median["member"] / median["dense"] <= REQUIRED_PREFILL_RATIO),
    }


def row_without_latency(setup, plan: Plan, label: str) -> dict:
    measured = measure_one_shot(setup.pruner, plan, setup.windows, progress=False)
    return {"label": label, "ppl": measured.ppl, "params": measured.size.linear_params,
            "keep": measured.size.linear_params / setup.pruner.dense_linear_params}


COLUMNS = [
    column("variant", "label", align="---"),
    column("kind", "kind", align="---"),
    column("decoder weights kept", "keep", ".1%"),
    column("test ppl", "ppl", ".2f"),
    column("prefill ms", "prefill_ms", ".0f"),
    column("decode ms/token", "decode_ms", ".1f"),
]


def markdown(result: dict) -> str:
    settings, check = result["settings"], result["check"]
    dense = next(r for r in result["rows"] if r["kind"] == "dense")
    rows = [{**r, "label": r["label"]} for r in sorted(result["rows"], key=lambda r: (-r["keep"], r["ppl"]))]
    lines = [
        f"Command: `python experiments/subnet_front.py --storage {settings['storage']} --study "
        f"{settings['study']} --eval-windows {settings['eval_windows']} --threads {settings['threads']} "
        f"--repeats {settings['repeats']}`",
        "",
        f"{settings['eval_windows']} test windows of 512 tokens; dense ppl {dense['ppl']:.2f}. The "
        "per-row timings are medians of a few runs of each model alone, one after the other: on a "
        "shared CPU they are noise (the same model's speed varies severalfold over minutes) and "
        "compare nothing; the check below times its models side by side, and "
        "`latency_check.py` the table's predictions (the JSON keeps this run's predictions, from "
        "the table before format 2).",
        "",
        *table(rows, COLUMNS),
    ]
    if check.get("member") is not None:
        lines += [
            "",
            f"Check: front member trial {check['member']}"
            f"{' (baseline ' + check['member_baseline'] + ')' if check.get('member_baseline') else ''} keeps {check['member_keep']:.1%} of the decoder "
            f"linear weights, ppl {check['member_ppl']:.2f}; uniform FFN width {check['uniform_ffn_width']} "
            f"(keeps {check['uniform_ffn_keep']:.1%}) ppl {check['uniform_ffn_ppl']:.2f}: "
            f"{check['ppl_reduction']:+.1%} lower (bar {REQUIRED_PPL_REDUCTION:.0%}). Prefill, "
            f"{check['rounds']} interleaved rounds: member {check['member_prefill_ratio']:.3f}x dense, "
            f"uniform FFN {check['uniform_ffn_prefill_ratio']:.3f}x dense (bar {REQUIRED_PREFILL_RATIO}x). "
            f"{'PASSES' if check['passes'] else 'DOES NOT PASS'}.",
        ]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    styles = {"front": ("o-", "C0"), "unstructured": ("s--", "C3"), "dense": ("*", "k")}
    families = sorted({r["label"].split("@")[0] for r in rows if r["kind"] == "baseline"})
    for axis, (key, title) in zip(axes, [("params", "decoder linear weights kept"),
                                         ("prefill_ms", "prefill ms (512 tokens)"),
                                         ("decode_ms", "decode ms / token")], strict=True):
        for kind, (style, color) in styles.items():
            points = sorted((r[key], r["ppl"]) for r in rows if r["kind"] == kind)
            if points:
                axis.plot(*zip(*points), style, color=color, label=kind)
        for index, family in enumerate(families):
            points = sorted((r[key], r["ppl"]) for r in rows
                            if r["kind"] == "baseline" and r["label"].startswith(family + "@"))
            axis.plot(*zip(*points), "x:", color=f"C{index + 4}", label=family)
        axis.set(xlabel=title, yscale="log")
    axes[0].set_ylabel("test perplexity")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
