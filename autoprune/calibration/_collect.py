"""Block-by-block calibration with forward hooks.

Only one block's input and output activations are in memory at a time: the calibration windows run
through the embeddings once, then through block 0, whose outputs become block 1's inputs, and so on.
Each block visits the compute device alone, so a model larger than the device still calibrates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune.calibration._stats import (
    STATS_FORMAT_VERSION,
    CalibrationStats,
    LinearStats,
    write_block,
)
from autoprune.data import windows_fingerprint
from autoprune.models import LoadedModel


class _StopForward(Exception):
    """Raised by the hook that captures block 0's inputs, to skip the rest of the model."""


@dataclass
class CalibrationResult:
    stats: CalibrationStats
    from_cache: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTOPRUNE_CACHE", Path.home() / ".cache" / "autoprune"))


def calibrate(
    loaded: LoadedModel,
    windows: torch.Tensor,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> CalibrationResult:
    """Statistics of ``loaded`` on ``windows``, read from the cache when the same model (by content)
    met the same tokens before, computed block by block and cached otherwise."""
    key = f"{loaded.fingerprint()}-{windows_fingerprint(windows)}-v{STATS_FORMAT_VERSION}"
    folder = (cache_dir or default_cache_dir()) / "stats" / key
    if (folder / "meta.json").is_file():
        return CalibrationResult(CalibrationStats(folder), from_cache=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        _collect(loaded, windows, staging, key, torch.device(device), batch_size, progress)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CalibrationResult(CalibrationStats(folder), from_cache=False)


@torch.no_grad()
def _collect(
    loaded: LoadedModel,
    windows: torch.Tensor,
    folder: Path,
    key: str,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> None:
    model, adapter = loaded.model, loaded.adapter
    blocks = adapter.blocks(model)
    hidden, block_kwargs = _block0_inputs(model, blocks, windows, device, batch_size)
    group_of, block_of_group, influence = {}, {}, []
    n_tokens = windows.numel()
    for index in tqdm(range(len(blocks)), desc="calibrating blocks", disable=not progress):
        block = blocks[index].to(device)
        accumulators = {
            adapter.layer_name(index, group[0]): _InputAccumulator(
                block.get_submodule(group[0]).in_features, device
            )
            for group in adapter.input_groups
        }
        hooks = [
            block.get_submodule(group[0]).register_forward_pre_hook(
                accumulators[adapter.layer_name(index, group[0])].hook
            )
            for group in adapter.input_groups
        ]
        cosine_sum = 0.0
        for batch, kwargs in enumerate(block_kwargs):
            inputs = hidden[batch]
            output = block(inputs, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            cosine_sum += torch.cosine_similarity(inputs, output, dim=-1).float().sum().item()
            hidden[batch] = output
        for hook in hooks:
            hook.remove()
        blocks[index].to("cpu")
        influence.append(1.0 - cosine_sum / n_tokens)
        groups = {}
        for group in adapter.input_groups:
            leader = adapter.layer_name(index, group[0])
            groups[leader] = accumulators[leader].result(leader)
            block_of_group[leader] = index
            for member in group:
                group_of[adapter.layer_name(index, member)] = leader
        write_block(folder, index, groups)
    meta = {
        "key": key,
        "format_version": STATS_FORMAT_VERSION,
        "model": loaded.spec,
        "n_samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "n_tokens": n_tokens,
        "block_influence": influence,
        "group_of": group_of,
        "block_of_group": block_of_group,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


class _InputAccumulator:
    """Sums x^2 per channel and X^T X over every token a linear layer sees: each batch's product
    in float32 (fast), the running sums in float64 (exact over hundreds of thousands of tokens)."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.sq_norm = torch.zeros(width, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def hook(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        self.sq_norm += (x * x).sum(dim=0, dtype=torch.float64)
        self.xtx += (x.T @ x).to(torch.float64)
        self.n_tokens += x.shape[0]

    def result(self, group: str) -> LinearStats:
        return LinearStats(
            group=group,
            sq_norm=self.sq_norm.float().cpu(),
            xtx=self.xtx.float().cpu(),
            n_tokens=self.n_tokens,
        )


def _block0_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the embeddings (and whatever precedes block 0) and capture block 0's arguments.

    Blocks take position embeddings, masks and other keyword arguments that the model computes
    once; capturing them from a real forward keeps this independent of each family's internals.
    """
    hidden: list[torch.Tensor] = []
    block_kwargs: list[dict] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        block_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    outside = _tensors_outside(model, blocks)
    original_device = next(model.parameters()).device
    for tensor in outside:
        tensor.data = tensor.data.to(device)
    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for tensor in outside:
            tensor.data = tensor.data.to(original_device)
    return hidden, block_kwargs


def _tensors_outside(model: nn.Module, blocks: nn.ModuleList) -> list[torch.Tensor]:
    """Parameters and buffers that are not part of any decoder block (embeddings, norms, rotary)."""
    inside = {id(t) for t in [*blocks.parameters(), *blocks.buffers()]}
    return [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside]
