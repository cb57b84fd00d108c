"""Saving a cut model as a checkpoint that transformers loads.

A model with equal widths everywhere is a stock LLaMA and is saved as one. A model whose blocks
differ also gets the modelling file its config's ``auto_map`` names, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoprune.export import save_checkpoint
from autoprune.structure._build import REMOTE_MODULE
from autoprune.structure.remote import modeling_subnet_llama


def save_subnet(
    subnet: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, metadata: dict
) -> None:
    """Write ``subnet`` (from :func:`autoprune.structure.build_subnet`) to ``out_dir``; nothing is
    written there unless the whole checkpoint is."""
    extra = {}
    if subnet.config.is_heterogeneous:
        extra[f"{REMOTE_MODULE}.py"] = Path(modeling_subnet_llama.__file__)
    save_checkpoint(subnet, tokenizer, out_dir, metadata, extra_files=extra)
