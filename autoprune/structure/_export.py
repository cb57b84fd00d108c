"""Saving a cut model as a checkpoint that transformers loads.

A model with equal widths everywhere is a stock LLaMA and is saved as one. A model whose blocks
differ also gets the modelling file its config's ``auto_map`` names, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoprune.export import CheckpointFiles, save_checkpoint
from autoprune.models.remote import REMOTE_MODULE, modeling_subnet_llama


def save_subnet(
    subnet: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    metadata: dict,
    dtype: torch.dtype,
) -> CheckpointFiles:
    """Write ``subnet`` (from :func:`autoprune.structure.build_subnet`) to ``out_dir``, its weights
    in ``dtype`` (see :func:`autoprune.export.save_checkpoint`); nothing is written there unless
    the whole checkpoint is."""
    extra = {}
    if subnet.config.is_heterogeneous:
        extra[f"{REMOTE_MODULE}.py"] = Path(modeling_subnet_llama.__file__)
    return save_checkpoint(subnet, tokenizer, out_dir, metadata, dtype, extra_files=extra)
