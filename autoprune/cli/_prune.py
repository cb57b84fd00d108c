"""``autoprune prune``: calibrate (cached), prune to a uniform/OWL plan or a recipe, measure, save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from autoprune.api import PlanRequest, prune, prune_learned
from autoprune.cli._common import (
    add_database_flags,
    add_device_flag,
    add_dtype_flag,
    add_format,
    add_workers_flags,
    database_settings,
    join_workers,
    parse_fraction,
    render,
)
from autoprune.config import CalibrationConfig, EvaluationConfig
from autoprune.data import SELF
from autoprune.errors import AutopruneError
from autoprune.methods import PruningMethod
from autoprune.plan import NMPattern, Recipe
from autoprune.structure import StructureRequest
from autoprune.training import HealConfig, LoraSettings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="prune a model and save a Hugging Face checkpoint")
    parser.add_argument("--model", help="hub id, local folder, .gguf file, or alias (smollm2-135m)")
    parser.add_argument("--method", choices=PruningMethod.available(), default="wanda")
    parser.add_argument("--sparsity", type=str, default=None, help="fraction of each layer removed")
    parser.add_argument("--nm", default=None, help="N:M pattern such as 2:4 (instead of --sparsity)")
    parser.add_argument("--owl", action="store_true", help="OWL layer-wise allocation at --sparsity")
    parser.add_argument("--recipe", type=Path, help="a recipe written by `autoprune export`")
    parser.add_argument(
        "--structured", default=None, metavar="SPEC",
        help="cut a smaller model instead: heads=N (GQA-consistent), ffn=N, drop=attention|mlp, "
        "e.g. heads=6,ffn=1152 in every block",
    )
    parser.add_argument("--structured-method", choices=["activation", "weighted", "obs"], default=None,
                        help="how heads / channels are chosen (default: the measured best)")
    learned = parser.add_argument_group("learned structure (--structured learned)")
    learned.add_argument("--target", type=float, default=None,
                         help="fraction of the decoder linear weights (or prefill) to remove")
    learned.add_argument("--tokens", type=int, default=None,
                         help="training tokens in all: gates, then the cut model healed")
    learned.add_argument("--learn-budget", choices=["params", "latency"], default="params",
                         help="what --target counts: decoder linear weights, or the prefill the "
                         "device's latency table prices")
    learned.add_argument("--learn-share", type=float, default=0.5,
                         help="share of --tokens spent training the gates (the rest heals the cut)")
    learned.add_argument("--lr", type=float, default=None, help="peak learning rate of the weights")
    learned.add_argument("--train-seq-len", type=int, default=None, help="tokens per training window (256)")
    learned.add_argument("--batch-size", type=int, default=None, help="training windows per step (8)")
    learned.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker)")
    learned.add_argument("--lora", type=int, default=None, metavar="RANK",
                         help="train LoRA adapters of this rank (PEFT, merged) instead of every weight")
    add_workers_flags(learned)
    parser.add_argument("--no-correction", action="store_true",
                        help="skip the least-squares correction of o_proj / down_proj")
    parser.add_argument(
        "--sequential", action="store_true",
        help="prune block after block from the pruned model's own statistics (as SparseGPT's paper "
        "and llm-compressor do): lower perplexity, a calibration pass per run",
    )
    add_data_flags(parser)
    parser.add_argument("--out", type=Path, help="output folder (must not exist or be empty)")
    add_dtype_flag(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="calibration cache folder")
    add_database_flags(parser)
    add_device_flag(parser)
    add_format(parser)
    parser.set_defaults(run=run)


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="wikitext2", help="PATH (file/folder), wikitext2 or self")
    parser.add_argument("--eval-data", default=None, help="evaluation text (default: --data)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N test windows")
    parser.add_argument("--seed", type=int, default=0)


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig | None:
    """Evaluate on --eval-data, else on --data unless it is generated text (no test split)."""
    source = args.eval_data or (None if args.data == SELF else args.data)
    if source is None:
        return None
    return EvaluationConfig(source=source, seq_len=args.seq_len, max_windows=args.eval_windows)


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise AutopruneError("prune needs --out DIR")
    evaluation = evaluation_config(args)
    database = database_settings(args)
    if args.structured == "learned":
        return _run_learned(args, evaluation)
    learned_only = (args.target, args.tokens, args.lr, args.train_seq_len, args.batch_size, args.workers, args.lora)
    if any(value is not None for value in learned_only):
        raise AutopruneError(
            "--target, --tokens, --lr, --train-seq-len, --batch-size, --lora and --workers go with --structured learned"
        )
    if args.recipe is not None:
        recipe = Recipe.load(args.recipe)
        report = prune(recipe.model, recipe.calibration, recipe.plan, args.out, evaluation,
                       args.cache_dir, sequential=recipe.sequential or args.sequential,
                       device=args.device, database=database, dtype=args.dtype)
    else:
        if args.model is None:
            raise AutopruneError("prune needs --model (or --recipe)")
        report = prune(args.model, calibration_config(args), plan_request(args), args.out,
                       evaluation, args.cache_dir, sequential=args.sequential, device=args.device,
                       database=database, dtype=args.dtype)
    result = report.as_dict()
    print(render([_row(result)], "table") if args.format == "table" else json.dumps(result, indent=2))
    return 0


def calibration_config(args: argparse.Namespace) -> CalibrationConfig:
    return CalibrationConfig(
        source=args.data, n_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed
    )


def plan_request(args: argparse.Namespace) -> PlanRequest | StructureRequest:
    if args.structured is not None:
        if args.sparsity is not None or args.nm or args.owl:
            raise AutopruneError("--structured cannot be combined with --sparsity, --nm or --owl yet")
        return StructureRequest.parse(
            args.structured, args.structured_method, correct=not args.no_correction
        )
    nm = NMPattern.parse(args.nm) if args.nm else None
    if nm is None and args.sparsity is None:
        raise AutopruneError("prune needs --sparsity S or --nm N:M")
    sparsity = parse_fraction(args.sparsity) if args.sparsity is not None else 0.0
    return PlanRequest(method=args.method, sparsity=sparsity, nm=nm, owl=args.owl)


def _row(report: dict) -> dict:
    keys = ("model", "method", "ppl", "sparsity", "total_params", "nonzero_params",
            "linear_nonzeros", "dtype", "checkpoint_bytes", "bytes_sparse", "calibration_cached")
    return {key: report[key] for key in keys}


def _run_learned(args: argparse.Namespace, evaluation: EvaluationConfig | None) -> int:
    """``prune --structured learned``: a sub-network chosen by training (see :func:`prune_learned`)."""
    if args.model is None:
        raise AutopruneError("prune --structured learned needs --model")
    if args.target is None or args.tokens is None:
        raise AutopruneError("--structured learned needs --target T (in (0, 1)) and --tokens N")
    if args.recipe is not None or args.sparsity is not None or args.nm or args.owl or args.sequential:
        raise AutopruneError("--structured learned cannot be combined with --recipe, --sparsity, --nm, --owl or --sequential")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lora = LoraSettings(rank=args.lora) if args.lora is not None else None
    given = {"lr": args.lr, "seq_len": args.train_seq_len, "batch_size": args.batch_size, "lora": lora}
    settings = {"tokens": args.tokens} | {key: value for key, value in given.items() if value is not None}
    config = HealConfig(**settings)
    join_workers(args.workers, config.batch_size, args.ray_address)
    report = prune_learned(
        args.model, args.data, args.target, config, args.out, evaluation,
        args.learn_budget, args.learn_share, args.cache_dir, device=args.device, workers=args.workers,
    )
    result = report.as_dict()
    print(render([_row(result)], "table") if args.format == "table" else json.dumps(result, indent=2))
    return 0
