"""How much does the same forward's time vary on this shared CPU, and is it waiting for a core?

Times ``--samples`` prefills (batch 1, 512 tokens, last-position logits, 1 thread) of one
random-weight probe model of SmolLM2's family (8 dense blocks) back to back, and for each the wall
time, the thread's CPU time (``time.thread_time``) and the time it spent runnable but waiting for
a core (``/proc/thread-self/schedstat``). Wall time that CPU time follows, with a wait near 0,
is a slower CPU (other tenants on the memory system or the host), not a busy run queue: a higher
priority or CPU-time clocks do not remove it; timing side by side does (``latency_check.py``).
Writes ``results/cpu_jitter.{json,md}``.

    nice -n -5 python experiments/cpu_jitter.py [--samples 12]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from autoprune.latency import LatencySettings, probe_model
from autoprune.models import load_model
from autoprune.structure import BlockShape

from _common import RESULTS, column, parser, table, write_results


def _schedstat() -> tuple[float, float]:
    """Milliseconds this thread has run and waited runnable."""
    run, wait, _ = Path("/proc/thread-self/schedstat").read_text().split()
    return int(run) / 1e6, int(wait) / 1e6


@torch.inference_mode()
def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--samples", type=int, default=12)
    args = arguments.parse_args()
    torch.set_num_threads(1)
    config = load_model("smollm2-135m").model.config
    model = probe_model(config, [BlockShape(3, 3, config.intermediate_size)] * 8)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, LatencySettings().seq_len), generator=generator)
    model(ids, use_cache=False, logits_to_keep=1)
    rows = []
    for index in range(args.samples):
        wall, cpu, (_, wait) = time.perf_counter(), time.thread_time(), _schedstat()
        model(ids, use_cache=False, logits_to_keep=1)
        _, wait_after = _schedstat()
        rows.append({"sample": index, "wall_ms": (time.perf_counter() - wall) * 1000,
                     "thread_ms": (time.thread_time() - cpu) * 1000, "waiting_ms": wait_after - wait})
    payload = {"settings": vars(args), "load": Path("/proc/loadavg").read_text().strip(), "rows": rows}
    print(write_results(payload, RESULTS, "cpu_jitter", markdown(payload)))


COLUMNS = [column("sample", "sample", "d"), column("wall ms", "wall_ms", ".0f"),
           column("thread CPU ms", "thread_ms", ".0f"), column("waiting for a core ms", "waiting_ms", ".0f")]


def markdown(result: dict) -> str:
    """The samples' table, from the JSON alone."""
    walls = [row["wall_ms"] for row in result["rows"]]
    return "\n".join([
        f"Command: `nice -n -5 python experiments/cpu_jitter.py --samples {result['settings']['samples']}` "
        f"(load average `{result['load']}`)", "", *table(result["rows"], COLUMNS), "",
        f"wall time from {min(walls):.0f} to {max(walls):.0f} ms ({max(walls) / min(walls) - 1:+.0%})",
    ]) + "\n"


if __name__ == "__main__":
    main()
