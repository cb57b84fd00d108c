"""A model's config and tokenizer with fresh random weights, for timing benchmarks only.

A trial's speed does not depend on the weights' values, so ``search_speed.py`` can time a search
where the real weights cannot go: a lent GPU machine reaches no hub and takes a 64 MiB working tree,
too small for SmolLM2's 98 MB GGUF. The config and tokenizer (a few MB) travel with ``--skeleton``;
the weights are drawn on arrival. Quality numbers from such a copy mean nothing.

    python experiments/random_weights.py smollm2-135m .gpu/smollm2-skeleton --skeleton   # here
    python experiments/random_weights.py .gpu/smollm2-skeleton /tmp/smollm2-random        # there
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from autoprune.models import resolve_alias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a model alias, a local checkpoint or skeleton folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--skeleton", action="store_true", help="write config and tokenizer only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gguf = resolve_alias(args.source)
    location, extra = (str(gguf.parent), {"gguf_file": gguf.name}) if gguf else (args.source, {})
    config = AutoConfig.from_pretrained(location, **extra)
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    if hasattr(config, "quantization_config"):  # a GGUF origin a plain checkpoint must not claim
        del config.quantization_config
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    if args.skeleton:
        config.save_pretrained(args.out)
        return
    torch.manual_seed(args.seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(args.out)


if __name__ == "__main__":
    main()
