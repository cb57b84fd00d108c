"""``autoprune heal``: train a compressed variant toward the dense model it was cut from.

The variant is an exported folder (``--model``), whose teacher is the model its recipe names unless
``--teacher`` says otherwise; or a study's trial (``--storage/--study/--trial``), healed from the
study's dense model and recorded in the study (``heal:<trial>``, the weights as an artifact) as a
search's ``heal_targets`` would, then exported to ``--out`` if given. Every :class:`autoprune.training.HealConfig` key is a flag (``--tokens``,
``--lr``, ``--ce-weight``, ...); ``--lora R`` trains rank-R adapters instead of every weight. The
healed checkpoint is written to ``--out`` in the variant's own form; a killed heal resumes from its
checkpoints when the same command runs again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from autoprune.cli._common import (
    add_device_flag,
    add_field_flags,
    add_format,
    add_workers_flags,
    given_field_flags,
    join_workers,
    render,
)
from autoprune.config import EvaluationConfig
from autoprune.data import check_source
from autoprune.errors import AutopruneError
from autoprune.export import check_output_dir
from autoprune.study import (
    DEFAULT_STORAGE,
    StudyHealer,
    artifact_store,
    export_trial,
    find_trial,
    load_existing_study,
    study_settings,
)
from autoprune.training import HealConfig, LoraSettings, heal_checkpoint

_NESTED = frozenset({"lora"})


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "heal", help="distil a compressed variant from its dense model (zeros and widths kept)"
    )
    parser.add_argument("--model", default=None, help="the variant: a checkpoint folder autoprune wrote")
    parser.add_argument("--teacher", default=None,
                        help="the dense model it was cut from (default: the model its recipe names)")
    parser.add_argument("--storage", default=None, help="or a study's trial: the study's storage")
    parser.add_argument("--study", default=None, help="the study's name")
    parser.add_argument("--trial", type=int, default=None, help="the trial's number")
    parser.add_argument("--artifact-store", default=None,
                        help="with --trial: folder for the healed weights (default: beside the study's file)")
    parser.add_argument("--data", default=None,
                        help="training text: PATH (its calibration split), wikitext2, or self "
                        "(text the teacher writes); default: wikitext2, or the study's data")
    parser.add_argument("--out", type=Path, default=None, help="output folder (must not exist or be empty)")
    add_field_flags(parser, HealConfig, exclude=_NESTED)
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="train LoRA adapters of this rank (PEFT, merged when saved) instead of every weight")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 16)")
    parser.add_argument("--eval-data", default=None,
                        help="also measure perplexity on this source's test split (default: --data, "
                        "unless it is self)")
    parser.add_argument("--eval-windows", type=int, default=None, help="first N test windows")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where checkpoints go (default: a hidden folder beside --out)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache folder (self-generated text)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker)")
    add_workers_flags(parser)
    add_device_flag(parser)
    add_format(parser)
    parser.set_defaults(run=run)


def heal_config(args: argparse.Namespace) -> HealConfig:
    """The :class:`HealConfig` the flags describe."""
    values = given_field_flags(args, HealConfig, exclude=_NESTED)
    if args.lora is not None or args.lora_alpha is not None:
        lora = {"rank": args.lora} if args.lora is not None else {}
        values["lora"] = LoraSettings(**lora, **({"alpha": args.lora_alpha} if args.lora_alpha else {}))
    return HealConfig.model_validate(values)


def run(args: argparse.Namespace) -> int:
    config = heal_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.trial is not None or args.study is not None:
        if args.workers is not None:
            raise AutopruneError("--workers heals a --model folder; a study's trial heals on the study's device")
        return _heal_trial(args, config)
    if args.model is None:
        raise AutopruneError("heal needs --model DIR, or --storage, --study and --trial")
    if args.out is None:
        raise AutopruneError("heal --model needs --out DIR")
    args.data = args.data or "wikitext2"
    source = args.eval_data or (None if args.data == "self" else args.data)
    evaluation = (
        EvaluationConfig(source=source, max_windows=args.eval_windows) if source is not None else None
    )
    join_workers(args.workers, config.batch_size, args.ray_address)
    report = heal_checkpoint(
        args.model, args.out, config, args.data, teacher=args.teacher, evaluation=evaluation,
        device=args.device, checkpoint_dir=args.checkpoint_dir, cache_dir=args.cache_dir,
        workers=args.workers,
    )
    result = report.as_dict()
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        keys = ("model", "tokens", "seconds", "tokens_per_second", "peak_memory_bytes",
                "validation_ppl_before", "validation_ppl", "ppl", "linear_nonzeros")
        print(render([{key: result[key] for key in keys}], "table"))
    return 0


def _heal_trial(args: argparse.Namespace, config: HealConfig) -> int:
    """Heal a study's trial, record it in the study and export it to ``--out`` if given."""
    if args.model is not None or args.teacher is not None:
        raise AutopruneError("--trial heals a study's trial from the study's model: leave out --model and --teacher")
    if args.study is None or args.trial is None:
        raise AutopruneError("healing a study's trial needs --study and --trial")
    storage = args.storage or DEFAULT_STORAGE
    if args.out is not None:
        check_output_dir(args.out)
    if args.data is not None:
        check_source(args.data)
    study = load_existing_study(storage, args.study)
    find_trial(study, args.trial)  # a trial that does not exist: nothing loads, nothing is written
    store = artifact_store(storage, args.artifact_store)
    settings = study_settings(study)
    spec = settings.worker_spec(cache_dir=str(args.cache_dir) if args.cache_dir else None,
                                device=args.device, threads=args.threads)
    healer = StudyHealer(study, spec, args.data, store, args.cache_dir, progress=True)
    member = healer.heal(args.trial, config)
    print(f"autoprune: {member.line()}", file=sys.stderr)
    row = {"trial": args.trial, **{k: member.record[k] for k in ("ppl_before", "ppl", "kl", "tokens", "seconds",
                                                                   "tokens_per_second", "peak_memory_bytes")}}
    if args.out is not None:
        export_trial(storage, args.study, args.trial, args.out, cache_dir=args.cache_dir, store=store)
        row["out"] = str(args.out)
    print(json.dumps(row, indent=2) if args.format == "json" else render([row], "table"))
    return 0
