"""Saving pruned models as plain Hugging Face checkpoints (safetensors, config, tokenizer).

Every checkpoint autoprune writes goes through :func:`save_checkpoint`, which writes it as users
run it: weights in the dtype asked for (the source's, by default: models are pruned in float32 in
memory, but served in the dtype they were published in), and the source's generation settings,
``use_cache`` among them, whatever calibration set in memory (it turns the cache off).

Nothing is written into the destination until the checkpoint is complete: it is saved to a
sibling staging folder and renamed, so an interrupted export never leaves half a model, and a
folder that already holds anything is refused rather than overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoprune.errors import AutopruneError

METADATA_FILE = "autoprune.json"
#: The dtypes a checkpoint can be written in, by the names ``--dtype`` takes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint's weight files hold: their dtype and their bytes on disk."""

    dtype: str
    weight_bytes: int


def checkpoint_dtype(name: str) -> torch.dtype:
    """The dtype called ``name`` in :data:`DTYPES`, or a one-line error."""
    if name not in DTYPES:
        raise AutopruneError(f"unknown dtype {name!r} (expected {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name config.json and ``--dtype`` use."""
    return str(dtype).removeprefix("torch.")


def check_output_dir(out_dir: Path) -> None:
    """Refuse a destination that exists and is not an empty folder."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AutopruneError(f"output folder {out_dir} already exists and is not empty")


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    metadata: dict,
    dtype: torch.dtype,
    extra_files: dict[str, Path] | None = None,
) -> CheckpointFiles:
    """Write ``model`` (its weights in ``dtype``; the model in memory is left as it is) and
    ``tokenizer`` to ``out_dir``, with autoprune's metadata beside them (and what the weight files
    hold, under ``checkpoint``) and ``extra_files`` (name in the checkpoint -> source file: a
    modelling file for remote code). ``config.json`` says ``use_cache`` as the model's generation
    config does: the source's setting (see :func:`autoprune.models.load_model`)."""
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        files = _save_model(model, staging, dtype)
        tokenizer.save_pretrained(staging)
        (staging / METADATA_FILE).write_text(json.dumps(metadata | {"checkpoint": asdict(files)}, indent=2))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        if out_dir.exists():
            out_dir.rmdir()
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def _save_model(model: PreTrainedModel, folder: Path, dtype: torch.dtype) -> CheckpointFiles:
    """``save_pretrained`` with the weights cast to ``dtype`` and the source's ``use_cache``."""
    config = model.config
    in_memory = config.use_cache
    source = model.generation_config.use_cache
    config.use_cache = in_memory if source is None else source
    try:
        model.save_pretrained(folder, state_dict=_cast(model.state_dict(), dtype))
    finally:
        config.use_cache = in_memory
    # save_pretrained names the dtype of the model in memory; the files hold ``dtype``
    written = json.loads((folder / "config.json").read_text())
    written["dtype"] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    weights = list(folder.glob("*.safetensors"))
    for path in weights:
        path.chmod(0o644)  # transformers writes them private; a checkpoint is meant to be shared
    return CheckpointFiles(dtype_name(dtype), sum(path.stat().st_size for path in weights))


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors of ``state`` in ``dtype``; tensors that share memory (tied weights) still
    share it, so they are stored once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if key not in cast:
            cast[key] = tensor.to(dtype)
        out[name] = cast[key]
    return out


def read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
