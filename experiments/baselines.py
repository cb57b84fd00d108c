"""Baselines on SmolLM2-135M and WikiText-2, side by side with llm-compressor.

Dense, magnitude, Wanda and SparseGPT at 50/60/70% and 2:4, OWL+Wanda at 70%, SparseGPT
``--sequential`` at 50/60/70%, and Wanda and SparseGPT at 50/70% calibrated data-free (``--data
self``: text sampled from the dense model, same number and length of samples) through autoprune; then the same dense weights (saved once as a plain safetensors checkpoint), the same
calibration windows and the same evaluation windows go through llm-compressor's
WandaPruningModifier and SparseGPTModifier (run by ``peer_llmcompressor.py`` in its own virtual
environment, ``.venv-peer`` from ``make peer-venv``, because its version pins differ). The peer
echoes content hashes of the windows it used and the dense perplexity it measured; the run stops if
either differs from autoprune's. Writes ``baselines.json`` and ``baselines.md`` under ``--out``
(default ``results/``), where the merging modes below also read the earlier rows.

    python experiments/baselines.py [--calib-samples 128] [--eval-windows 16] [--no-peer]
        [--peer-only | --peer-from-results] [--peer-threads N] [--peer-dir DIR [--peer-skip-missing]]

``--peer-only`` keeps the autoprune rows of the existing ``results/baselines.json`` (after checking
they were measured on the same calibration and evaluation settings) and runs only llm-compressor.
``--peer-from-results`` is the converse: it measures every autoprune row again and keeps the
llm-compressor rows of the existing ``results/baselines.json`` (same checks), which cost CPU-hours.
``--add-method admm`` measures one method's one-shot rows (50/60/70%, 2:4) and keeps every other row
of ``results/baselines.json`` (same checks). ``--peer-dir`` keeps each peer run's JSON there and
reuses one already present for the same windows, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    HERE,
    Column,
    Measured,
    add_model_data,
    add_out,
    column,
    measure_one_shot,
    measure_sequential,
    number,
    table,
    write_results,
)
from _common import parser as parser_for

from autoprune import CalibrationConfig, PlanRequest, Pruner, prepare
from autoprune.data import SELF, calibration_windows, evaluation_windows, windows_fingerprint
from autoprune.export import save_checkpoint
from autoprune.methods import PruningMethod
from autoprune.models import load_model
from autoprune.plan import NMPattern

PEER_PYTHON = HERE.parent / ".venv-peer" / "bin" / "python"
SETTINGS = [("50%", 0.5, None), ("60%", 0.6, None), ("70%", 0.7, None), ("2:4", 0.0, "2:4")]
PEER_METHODS = ("wanda", "sparsegpt")
#: ``autoprune prune --sequential`` rows (llm-compressor's pipeline): SparseGPT, where it matters.
SEQUENTIAL_SETTINGS = [("50%", 0.5), ("60%", 0.6), ("70%", 0.7)]
SEQUENTIAL_TOOL = "autoprune --sequential"
#: Data-free calibration rows (``--data self``).
SELF_SETTINGS = [("50%", 0.5), ("70%", 0.7)]
SELF_TOOL = "autoprune --data self"
#: The table of every row, and of llm-compressor's rows against autoprune's.
ROW_COLUMNS = [
    column("tool", "tool", align="---"), column("method", "method", align="---"),
    column("setting", "setting", align="---"), column("ppl", "ppl", ".2f"),
    column("sparsity", "sparsity", ".3f"), column("linear non-zeros", "linear_nonzeros", ","),
    Column("all non-zeros", lambda row: number(row["nonzero_params"], ",")),
    column("prune s", "prune_seconds"),
]
COMPARISON_COLUMNS = [
    column("method", "method", align="---"), column("setting", "setting", align="---"),
    column("autoprune", "autoprune", ".2f"),
    Column("autoprune --sequential", lambda item: number(item["autoprune_sequential"])),
    column("llm-compressor", "peer", ".2f"), column("ratio", "ratio", ".3f"),
    column("best ratio", "best_ratio", ".3f"),
]
#: The peer's dense perplexity must reproduce autoprune's this closely (same weights, same windows).
DENSE_TOLERANCE = 1e-3


def main() -> None:
    parser = parser_for(__doc__)
    add_model_data(parser)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    peer_mode = parser.add_mutually_exclusive_group()
    peer_mode.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    peer_mode.add_argument(
        "--peer-only", action="store_true",
        help="run llm-compressor only; keep the autoprune rows of results/baselines.json",
    )
    peer_mode.add_argument(
        "--peer-from-results", action="store_true",
        help="run autoprune only; keep the llm-compressor rows of results/baselines.json",
    )
    peer_mode.add_argument(
        "--add-method", choices=PruningMethod.available(), default=None,
        help="measure only this method's autoprune rows; keep every other row of results/baselines.json",
    )
    parser.add_argument("--peer-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peer-dir", type=Path, default=None, help="keep/reuse peer run JSONs")
    parser.add_argument(
        "--peer-skip-missing", action="store_true",
        help="with --peer-dir: only use the peer runs already there, run no new one",
    )
    add_out(parser)
    args = parser.parse_args()

    calibration = CalibrationConfig(
        source=args.data, n_samples=args.calib_samples, seq_len=args.seq_len
    )
    if args.add_method:
        add_method(args, calibration)
        return
    if args.peer_only:
        previous = json.loads((args.out / "baselines.json").read_text())
        loaded = load_model(args.model)
        calib = calibration_windows(
            calibration.source, loaded.tokenizer, calibration.n_samples, calibration.seq_len,
            calibration.seed,
        )
        windows = evaluation_windows(args.data, loaded.tokenizer, args.seq_len, args.eval_windows)
        check_same_setting(previous, args.model, calibration, calib, windows)
        rows = [row for row in previous["rows"] if row["tool"].startswith("autoprune")]
        result = {key: value for key, value in previous.items() if key not in ("rows", "peer")}
        result["autoprune_rows_from"] = "a previous run (--peer-only), same windows"
    else:
        start = time.perf_counter()
        loaded, stats, cached = prepare(args.model, calibration)
        calibration_seconds = time.perf_counter() - start
        calib = calibration_windows(
            calibration.source, loaded.tokenizer, calibration.n_samples, calibration.seq_len,
            calibration.seed,
        )
        windows = evaluation_windows(args.data, loaded.tokenizer, args.seq_len, args.eval_windows)
        pruner = Pruner(loaded, stats)
        rows = [measure(pruner, "dense", "-", PlanRequest("magnitude", 0.0), windows)]
        for method in ("magnitude", "wanda", "sparsegpt"):
            for label, sparsity, nm in SETTINGS:
                request = PlanRequest(method, sparsity, NMPattern.parse(nm) if nm else None)
                rows.append(measure(pruner, method, label, request, windows))
        rows.append(
            measure(pruner, "owl+wanda", "70%", PlanRequest("wanda", 0.7, owl=True), windows)
        )
        for label, sparsity in SEQUENTIAL_SETTINGS:
            rows.append(sequential_row(
                args.model, pruner, label, PlanRequest("sparsegpt", sparsity), calib, windows
            ))
        start = time.perf_counter()
        _, self_stats, self_cached = prepare(args.model, calibration.model_copy(update={"source": SELF}))
        self_calibration_seconds = time.perf_counter() - start
        self_pruner = Pruner(loaded, self_stats)
        for method in ("wanda", "sparsegpt"):
            for label, sparsity in SELF_SETTINGS:
                request = PlanRequest(method, sparsity)
                rows.append(measure(self_pruner, method, label, request, windows, SELF_TOOL))
        result = {
            "model": args.model,
            "calibration": calibration.model_dump(),
            "calibration_seconds": round(calibration_seconds, 1),
            "calibration_cached": cached,
            "self_calibration_seconds": round(self_calibration_seconds, 1),
            "self_calibration_cached": self_cached,
            "eval_windows": int(windows.shape[0]),
            "seq_len": args.seq_len,
            "torch_threads": torch.get_num_threads(),
        }
    result["calibration_fingerprint"] = windows_fingerprint(calib)
    result["evaluation_fingerprint"] = windows_fingerprint(windows)
    if args.peer_from_results:
        previous = json.loads((args.out / "baselines.json").read_text())
        check_same_setting(previous, args.model, calibration, calib, windows)
        rows += [row for row in previous["rows"] if row["tool"].startswith("llm-compressor")]
        result["peer"] = previous["peer"]
        result["peer_rows_from"] = "a previous run (--peer-from-results), same windows"
    elif not args.no_peer:
        dense_ppl = next(row["ppl"] for row in rows if row["method"] == "dense")
        peer_rows, peer_info = run_peer(
            loaded, calib, windows, dense_ppl, args.peer_threads, args.peer_dir,
            args.peer_skip_missing,
        )
        rows += peer_rows
        result["peer"] = peer_info
    result["rows"] = rows
    if not args.no_peer:
        result["comparison"] = compare(rows)
    print(write_results(result, args.out, "baselines", markdown(result)), end="")


def add_method(args: argparse.Namespace, calibration: CalibrationConfig) -> None:
    """``--add-method``: the method's one-shot rows at every setting, measured on the windows of
    ``results/baselines.json`` (checked by fingerprint) and put in place of any earlier ones; the
    other rows and the comparison stay as they were measured."""
    previous = json.loads((args.out / "baselines.json").read_text())
    loaded, stats, _ = prepare(args.model, calibration)
    calib = calibration_windows(
        calibration.source, loaded.tokenizer, calibration.n_samples, calibration.seq_len, calibration.seed,
    )
    windows = evaluation_windows(args.data, loaded.tokenizer, args.seq_len, args.eval_windows)
    check_same_setting(previous, args.model, calibration, calib, windows)
    pruner = Pruner(loaded, stats)
    rows = [row for row in previous["rows"] if (row["tool"], row["method"]) != ("autoprune", args.add_method)]
    for label, sparsity, nm in SETTINGS:
        request = PlanRequest(args.add_method, sparsity, NMPattern.parse(nm) if nm else None)
        rows.append(measure(pruner, args.add_method, label, request, windows))
    added = sorted({*previous.get("added_methods", []), args.add_method})
    result = {**previous, "rows": rows, "added_methods": added}
    print(write_results(result, args.out, "baselines", markdown(result)), end="")


def check_same_setting(previous: dict, model: str, calibration, calib, windows) -> None:
    """Refuse to merge with autoprune rows measured on other windows."""
    problems = []
    if previous.get("model") != model:
        problems.append(f"model {previous.get('model')} != {model}")
    if previous.get("calibration") != calibration.model_dump():
        problems.append(f"calibration {previous.get('calibration')} != {calibration.model_dump()}")
    if previous.get("eval_windows") != windows.shape[0] or previous.get("seq_len") != windows.shape[1]:
        problems.append("evaluation windows differ in number or length")
    for key, tensor in (("calibration_fingerprint", calib), ("evaluation_fingerprint", windows)):
        if key in previous and previous[key] != windows_fingerprint(tensor):
            problems.append(f"{key} differs")
    if problems:
        sys.exit("cannot merge with results/baselines.json: " + "; ".join(problems))


def measure(
    pruner: Pruner, method: str, label: str, request: PlanRequest, windows: torch.Tensor,
    tool: str = "autoprune",
) -> dict:
    """One one-shot autoprune row (the first call of a method also builds its caches)."""
    measured = measure_one_shot(pruner, request.build(pruner.loaded, pruner.stats), windows)
    return autoprune_row(tool, method, label, measured)


def autoprune_row(tool: str, method: str, label: str, measured: Measured) -> dict:
    """One autoprune line of the table, printed as it is measured."""
    row = {
        "tool": tool,
        "method": method,
        "setting": label,
        "ppl": round(measured.ppl, 3),
        "sparsity": round(measured.size.sparsity, 4),
        "linear_nonzeros": measured.size.linear_nonzeros,
        "nonzero_params": measured.size.nonzero_params,
        "prune_seconds": round(measured.prune_seconds, 2),
    }
    print(row, flush=True)
    return row


def sequential_row(
    model: str, pruner: Pruner, label: str, request: PlanRequest, calib: torch.Tensor,
    windows: torch.Tensor,
) -> dict:
    """An ``autoprune prune --sequential`` row; its prune seconds include the calibration pass."""
    plan = request.build(pruner.loaded, pruner.stats)
    measured = measure_sequential(model, calib, plan, windows, pruner.dense_linear_params)
    return autoprune_row(SEQUENTIAL_TOOL, request.method, label, measured)


def run_peer(
    loaded, calib: torch.Tensor, windows: torch.Tensor, dense_ppl: float, threads: int,
    peer_dir: Path | None, skip_missing: bool = False,
) -> tuple[list[dict], dict]:
    """llm-compressor on the same dense weights, calibration windows and evaluation windows."""
    if not PEER_PYTHON.exists():
        sys.exit(f"llm-compressor environment missing: {PEER_PYTHON} (run `make peer-venv`)")
    fingerprints = {
        "calibration_fingerprint": windows_fingerprint(calib),
        "evaluation_fingerprint": windows_fingerprint(windows),
    }
    rows, runs, missing = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        save_checkpoint(loaded.model, loaded.tokenizer, dense_dir, {"purpose": "peer baseline"},
                        torch.float32)  # the very weights autoprune prunes
        windows_file = Path(tmp) / "windows.pt"
        torch.save({"calibration": calib, "evaluation": windows}, windows_file)
        out_dir = peer_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        # 50% and 70% first (the settings the comparison is judged on), then 2:4 and 60%; the
        # rows are put back in table order below.
        order = [SETTINGS[i] for i in (0, 2, 3, 1)]
        for label, sparsity, nm in order:
            for method in PEER_METHODS:
                out = out_dir / f"{method}-{label.replace(':', '_').replace('%', '')}.json"
                peer = json.loads(out.read_text()) if peer_dir and out.is_file() else None
                if peer is None and skip_missing:
                    missing.append(f"{method} {label}")
                    continue
                if peer is None or any(peer.get(k) != v for k, v in fingerprints.items()):
                    target = ["--nm", nm] if nm else ["--sparsity", str(sparsity)]
                    check_dense = [] if not runs else ["--no-dense-ppl"]  # once is enough
                    command = [str(PEER_PYTHON), str(HERE / "peer_llmcompressor.py"), "--model",
                               str(dense_dir), "--windows", str(windows_file), "--method", method,
                               *target, "--out", str(out), "--threads", str(threads), *check_dense]
                    print(f"llm-compressor {method} {label} ...", flush=True)
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    peer = json.loads(out.read_text())
                else:
                    print(f"llm-compressor {method} {label}: reusing {out}", flush=True)
                check_peer(peer, fingerprints, dense_ppl, method, label)
                runs.append(peer)
                row = {
                    "tool": f"llm-compressor {peer['version']}",
                    "method": method,
                    "setting": label,
                    "ppl": round(peer["ppl"], 3),
                    "sparsity": round(1 - peer["linear_nonzeros"] / peer["linear_total"], 4),
                    "linear_nonzeros": peer["linear_nonzeros"],
                    "nonzero_params": None,
                    "prune_seconds": round(peer["prune_seconds"], 2),
                }
                print(row, flush=True)
                rows.append(row)
    position = {(method, label): i for i, (method, (label, _, _)) in enumerate(
        (m, setting) for m in PEER_METHODS for setting in SETTINGS)}
    rows.sort(key=lambda row: position[(row["method"], row["setting"])])
    dense_checks = [run["dense_ppl"] for run in runs if run.get("dense_ppl") is not None]
    info = {
        "version": runs[0]["version"],
        "torch": runs[0]["torch"],
        "threads": "/".join(str(t) for t in sorted({run["threads"] for run in runs})),
        "dense_ppl": round(dense_checks[0], 3) if dense_checks else None,
        **fingerprints,
        "checks": {f"{run['method']} {run['setting']}": run["checks"] for run in runs},
        "not_run": missing,
    }
    return rows, info


def check_peer(peer: dict, fingerprints: dict, dense_ppl: float, method: str, label: str) -> None:
    """Stop unless the peer saw exactly our windows and, on the dense model, our perplexity."""
    for key, value in fingerprints.items():
        if peer.get(key) != value:
            sys.exit(f"llm-compressor {method} {label}: {key} {peer.get(key)} != {value}")
    if peer.get("dense_ppl") is not None and abs(peer["dense_ppl"] / dense_ppl - 1) > DENSE_TOLERANCE:
        sys.exit(
            f"llm-compressor's dense perplexity {peer['dense_ppl']:.3f} != autoprune's "
            f"{dense_ppl:.3f}: not the same model or windows"
        )


def markdown(result: dict) -> str:
    cal = result["calibration"]
    lines = [
        f"SmolLM2-135M, WikiText-2 test perplexity ({result['eval_windows']} windows of "
        f"{result['seq_len']} tokens, fingerprint `{result.get('evaluation_fingerprint', '?')}`); "
        f"calibration {cal['n_samples']} x {cal['seq_len']} tokens of the validation split "
        f"(seed {cal['seed']}, fingerprint `{result.get('calibration_fingerprint', '?')}`).",
        "",
    ]
    if "self_calibration_seconds" in result:
        lines += [
            f"`{SELF_TOOL}` rows: calibrated data-free, on {cal['n_samples']} x {cal['seq_len']} "
            f"tokens sampled from the dense model (seed {cal['seed']}) instead of the validation "
            f"split; sampling the text and calibrating took {result['self_calibration_seconds']} s"
            + (" (read from the cache)" if result["self_calibration_cached"] else "") + ".",
            "",
        ]
    peer = result.get("peer")
    if peer:
        lines += [
            f"llm-compressor {peer['version']} (torch {peer['torch']}, CPU, {peer['threads']} "
            "thread(s)) pruned the same dense weights (saved from the model autoprune loaded, "
            f"dense perplexity {peer['dense_ppl']} in its own run), calibrated on the identical "
            "calibration windows and was measured on the identical evaluation windows: both "
            "fingerprints are content hashes of the token ids, checked equal in every peer run, "
            "and perplexity is computed the same way (exp of the mean next-token NLL). Targets: "
            "q/k/v/o/gate/up/down_proj of all decoder blocks; `oneshot` with its sequential "
            "pipeline and default modifier settings (SparseGPT block_size 128, dampening_frac "
            "0.01).",
            "",
            "Prune seconds: autoprune's one-shot rows exclude its calibration, which runs once "
            "per model and data and is cached"
            + (f" ({result['calibration_seconds']} s when computed)" if not result.get("calibration_cached") else "")
            + "; `autoprune --sequential` rows (pruned block after block from the pruned "
            "model's own statistics, llm-compressor's pipeline) and llm-compressor's include the "
            "calibration pass they make in every run. The peer counts only decoder linear "
            "non-zeros.",
            "",
        ]
        if result.get("added_methods"):
            lines += [f"autoprune {', '.join(result['added_methods'])} rows: measured by a later run "
                      "(`--add-method`) on the same windows (fingerprints checked).", ""]
        if peer.get("not_run"):
            lines += [f"llm-compressor not run yet: {', '.join(peer['not_run'])}.", ""]
        for side in ("autoprune", "peer"):
            if result.get(f"{side}_rows_from"):
                lines += [f"{side.replace('peer', 'llm-compressor')} rows: {result[f'{side}_rows_from']}.", ""]
    lines += table(result["rows"], ROW_COLUMNS)
    comparison = compare(result["rows"])
    if comparison:
        lines += ["", "autoprune vs llm-compressor, same windows (ratio of perplexities):", ""]
        lines += table(comparison, COMPARISON_COLUMNS)
    return "\n".join(lines) + "\n"


def compare(rows: list[dict]) -> list[dict]:
    """Each llm-compressor row against autoprune's one-shot row and, where measured, its
    ``--sequential`` row (the same pipeline as the peer's) at the same method and setting."""
    ours = {(r["tool"], r["method"], r["setting"]): r["ppl"] for r in rows if r["tool"].startswith("autoprune")}
    out = []
    for row in rows:
        key = (row["method"], row["setting"])
        if row["tool"].startswith("llm-compressor") and ("autoprune", *key) in ours:
            one_shot, sequential = ours[("autoprune", *key)], ours.get((SEQUENTIAL_TOOL, *key))
            best = min(one_shot, sequential or one_shot)
            out.append({"method": key[0], "setting": key[1], "autoprune": one_shot,
                        "autoprune_sequential": sequential, "peer": row["ppl"],
                        "ratio": one_shot / row["ppl"], "best_ratio": best / row["ppl"]})
    return out

if __name__ == "__main__":
    main()
