"""Heal speed and memory: autoprune's heal loop against the plain distillation loop, same loss.

The plain loop is the one a first probe writes: both models' whole logits in float32, KL on them,
backward, AdamW. autoprune's (:class:`autoprune.training.Healer`) computes the same loss a chunk of
positions at a time with closed-form gradients (never both logits whole), optionally with bf16
matrix products. Each variant runs in its own process (so its memory is its own), twice, in
alternation, for ``--steps`` optimizer steps of ``--batch x --seq-len`` tokens; tokens/s leave the
first step out, peak memory is the resident set sampled during training, over what the process
held before its first step (the two models loaded).

    python experiments/heal_speed.py --model runs/ffn1024 --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from _common import DEFAULT_DATA, Column, add_out, add_threads, column, parser, table, write_results

VARIANTS = ("plain", "chunked-fp32", "chunked-bf16")


class PeakRss:
    """The largest resident set of this process seen by a sampling thread, while inside ``with``."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def run_variant(args) -> dict:
    """One variant's steps in this process."""
    from autoprune.models import load_model
    from autoprune.training import HealConfig, HealData, Healer, next_token_labels, plain_distillation_loss

    torch.set_num_threads(args.threads)
    student, teacher = load_model(args.model), load_model(args.teacher)
    precision = "bf16" if args.variant == "chunked-bf16" else "fp32"
    config = HealConfig(tokens=args.steps * args.batch * args.seq_len, seq_len=args.seq_len,
                        batch_size=args.batch, precision=precision, validation_windows=1)
    data = HealData.from_source(args.data, teacher, args.seq_len, 1, config.tokens)
    healer = Healer(student.model, teacher.model, data, config, torch.device("cpu"))

    def plain_step() -> None:  # the probe's loop: whole logits, float32
        ids = data.batch(healer.step, args.batch, config.seed)
        logits = student.model(ids, use_cache=False).logits
        with torch.no_grad():
            reference = teacher.model(ids, use_cache=False).logits
        loss = plain_distillation_loss(logits.reshape(-1, logits.shape[-1]),
                                       reference.reshape(-1, reference.shape[-1]), next_token_labels(ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(healer.weights, 1.0)
        healer.optimizer.step()
        healer.optimizer.zero_grad(set_to_none=True)
        healer.step += 1

    step = plain_step if args.variant == "plain" else healer.train_step
    before = _rss()
    times = []
    with PeakRss() as peak:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    tokens = args.batch * args.seq_len
    return {
        "variant": args.variant,
        "tokens_per_second": tokens * (len(times) - 1) / sum(times[1:]),
        "step_seconds": times,
        "peak_over_loaded_bytes": peak.peak - before,
        "peak_bytes": peak.peak,
    }


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--model", required=True, help="the student: a checkpoint folder")
    arguments.add_argument("--teacher", default="smollm2-135m")
    arguments.add_argument("--data", default=DEFAULT_DATA)
    arguments.add_argument("--steps", type=int, default=4)
    arguments.add_argument("--batch", type=int, default=8)
    arguments.add_argument("--seq-len", type=int, default=256)
    arguments.add_argument("--rounds", type=int, default=2)
    arguments.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, here
    add_threads(arguments, default=2)
    add_out(arguments)
    args = arguments.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(output.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {variant}: {runs[variant][-1]['tokens_per_second']:.1f} tok/s", flush=True)
    rows = []
    for variant, measured in runs.items():
        rows.append({
            "variant": variant,
            "tokens_per_second": max(r["tokens_per_second"] for r in measured),
            "peak_gib": max(r["peak_over_loaded_bytes"] for r in measured) / 2**30,
        })
    plain = rows[0]
    for row in rows:
        row["speed"] = row["tokens_per_second"] / plain["tokens_per_second"]
        row["memory"] = row["peak_gib"] / plain["peak_gib"]
    lines = [
        f"`python experiments/heal_speed.py {' '.join(sys.argv[1:])}`: {args.steps} steps of "
        f"{args.batch} x {args.seq_len} tokens, {args.threads} threads, best of {args.rounds} rounds.",
        "",
        *table(rows, [
            Column("loop", lambda r: r["variant"], "---"),
            column("tokens/s", "tokens_per_second", ".1f"),
            column("x plain", "speed", ".2f"),
            column("training peak GiB (over the loaded models)", "peak_gib", ".2f"),
            column("x plain", "memory", ".2f"),
        ]),
    ]
    print(write_results({"runs": runs, "rows": rows, "args": vars(args) | {"out": str(args.out)}},
                        args.out, "heal_speed", lines))


if __name__ == "__main__":
    main()
