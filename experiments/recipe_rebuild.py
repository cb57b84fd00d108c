"""An exported trial as users get it: it reloads with the KV cache on, in its source's dtype, and
its recipe rebuilds the very same weights.

``autoprune export`` of ``--trial`` writes the checkpoint and ``recipe.yaml``; stock
``AutoModelForCausalLM.from_pretrained`` reloads it (its config's ``use_cache``, its weights'
dtype, the tokens each forward of a ``generate`` is fed); ``autoprune prune --recipe`` rebuilds it
into another folder, whose every tensor is compared with the export's, bit for bit. Writes
``results/recipe_rebuild.json`` and ``.md``.

    nice -n 10 python experiments/recipe_rebuild.py --storage sqlite:///STUDY.db --study sgpt50 \
        --trial 0 --work WORK --cache-dir runs/cache
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.cli import main as autoprune
from autoprune.data import evaluation_windows
from autoprune.export import read_metadata

from _common import DEFAULT_DATA, parse, study_parser, write_results
from export_speed import fed_tokens


def main() -> None:
    arguments = study_parser(__doc__, required=True)
    arguments.add_argument("--trial", type=int, required=True)
    arguments.add_argument("--work", type=Path, required=True, help="folder for the two checkpoints")
    arguments.add_argument("--cache-dir", default=None)
    arguments.add_argument("--data", default=DEFAULT_DATA)
    args = parse(arguments)
    exported, rebuilt = args.work / f"trial-{args.trial}", args.work / f"trial-{args.trial}-rebuilt"
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    if not exported.exists():
        run(["export", "--storage", args.storage, "--study", args.study, "--trial", args.trial,
             "--out", exported, *cache])
    if not rebuilt.exists():
        run(["prune", "--recipe", exported / "recipe.yaml", "--data", args.data, "--eval-windows", "2",
             "--out", rebuilt, *cache])
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    prompt = evaluation_windows(args.data, AutoTokenizer.from_pretrained(exported), 512, 1)[:, :64]
    want, got = tensors(exported), tensors(rebuilt)
    differing = [name for name in want if name not in got or not torch.equal(want[name], got[name])]
    report = read_metadata(exported)
    result = {
        "study": args.study, "trial": args.trial, "plan": report["report"]["plan"],
        "sparsity": report["report"]["sparsity"],
        "config_use_cache": json.loads((exported / "config.json").read_text())["use_cache"],
        "generation_use_cache": json.loads((exported / "generation_config.json").read_text()).get("use_cache"),
        "loaded_dtype": str(model.dtype), "files_dtype": report["checkpoint"]["dtype"],
        "fed_tokens": fed_tokens(model, prompt),
        "tensors": len(want), "tensors_differing": differing,
        "same_files_keys": sorted(want) == sorted(got),
    }
    print(write_results(result, args.out, "recipe_rebuild", markdown(result)))


def run(args: list) -> None:
    print("autoprune " + " ".join(map(str, args)), flush=True)
    if autoprune([str(arg) for arg in args]) != 0:
        raise SystemExit(f"autoprune {args[0]} failed")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return out


def markdown(result: dict) -> str:
    """What the export says and holds, and what the rebuild changed."""
    same = "every one bit-identical" if not result["tensors_differing"] else (
        f"{len(result['tensors_differing'])} differ: {', '.join(result['tensors_differing'][:5])}")
    return "\n".join([
        f"# Trial {result['trial']} of `{result['study']}` ({result['plan']['method']}, sparsity "
        f"{result['sparsity']:.4f}): exported, reloaded, rebuilt from its recipe",
        "",
        f"`nice -n 10 python experiments/recipe_rebuild.py --storage STORAGE --study {result['study']} "
        f"--trial {result['trial']} --work WORK --cache-dir CACHE`",
        "",
        f"- config.json `use_cache`: {result['config_use_cache']}; generation_config.json `use_cache`: "
        f"{result['generation_use_cache']}",
        f"- files in {result['files_dtype']}; `from_pretrained(DIR)` loads {result['loaded_dtype']}",
        f"- tokens each forward of a 4-token `generate` is fed: {result['fed_tokens']}",
        f"- `prune --recipe DIR/recipe.yaml`: {result['tensors']} tensors, {same}",
    ]) + "\n"


if __name__ == "__main__":
    main()
