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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune._atomic import check_folder, replace_folder, warn_damaged, write_manifest
from autoprune.calibration._stats import (
    STATS_FORMAT_VERSION,
    CalibrationStats,
    LinearStats,
    write_block,
)
from autoprune.data import windows_fingerprint
from autoprune.errors import AutopruneError
from autoprune.models import LoadedModel


class _StopForward(Exception):
    """Raised by the hook that captures block 0's inputs, to skip the rest of the model."""


@dataclass
class CalibrationResult:
    stats: CalibrationStats
    from_cache: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTOPRUNE_CACHE", Path.home() / ".cache" / "autoprune"))


def statistics_folder(
    loaded: LoadedModel, windows: torch.Tensor, cache_dir: Path | None = None, edit_name: str | None = None
) -> Path:
    """Where :func:`calibrate` caches the statistics of ``loaded`` on ``windows`` (of the model the
    edit named ``edit_name`` makes): the same model by content and the same tokens share them."""
    key = f"{loaded.fingerprint()}-{windows_fingerprint(windows)}-v{STATS_FORMAT_VERSION}"
    if edit_name is not None:
        key += f"-{edit_name}"
    return (cache_dir or default_cache_dir()) / "stats" / key


def calibrate(
    loaded: LoadedModel,
    windows: torch.Tensor,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    edit: tuple[str, BlockEdit] | None = None,
    skip: frozenset[int] = frozenset(),
) -> CalibrationResult:
    """Statistics of ``loaded`` on ``windows``, read from the cache when the same model (by content)
    met the same tokens before, computed block by block and cached otherwise.

    ``edit`` (a name for the cache key and a :data:`BlockEdit`) gives instead the statistics of the
    model that edit makes, block after block: each block's layers see the inputs of the blocks
    edited before it (sequential pruning's statistics). The edit changes ``loaded.model``'s weights
    when the statistics are computed, not when they are cached: the caller restores them. Blocks in
    ``skip`` are not run (removed blocks); their statistics are absent.
    """
    folder = statistics_folder(loaded, windows, cache_dir, edit[0] if edit is not None else None)
    key = folder.name
    if folder.exists():
        problem = check_folder(folder)
        if problem is None:
            return CalibrationResult(CalibrationStats(folder), from_cache=True)
        warn_damaged("calibration statistics", folder, problem)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        block_edit = edit[1] if edit is not None else None
        passes = block_passes(loaded, windows, torch.device(device), batch_size, progress, block_edit, skip)
        _collect(loaded, passes, staging, key, windows)
        write_manifest(staging)  # last: it commits the entry
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replace_folder(staging, folder):
        return CalibrationResult(CalibrationStats(folder), from_cache=False)
    # Another process (a second Ray worker, say) cached the same statistics first: use theirs.
    if check_folder(folder) is not None:
        raise AutopruneError(f"calibration statistics {folder} are being rewritten by another process")
    return CalibrationResult(CalibrationStats(folder), from_cache=True)


#: Called with a block's index, the block (on the compute device) and the statistics of its inputs,
#: before its outputs are computed: it may change the block's weights (sequential pruning).
BlockEdit = Callable[[int, nn.Module, dict[str, LinearStats]], None]


def _collect(
    loaded: LoadedModel,
    passes: Iterator[tuple[int, dict[str, LinearStats], float]],
    folder: Path,
    key: str,
    windows: torch.Tensor,
) -> None:
    """Write each block's statistics as ``passes`` yields them, then the index of them all. A
    skipped block keeps influence 0: removed, it leaves its input unchanged."""
    adapter = loaded.adapter
    group_of, block_of_group = {}, {}
    influence = [0.0] * adapter.num_blocks(loaded.model)
    for index, groups, block_influence in passes:
        influence[index] = block_influence
        for group in adapter.input_groups:
            leader = adapter.layer_name(index, group[0])
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
        "n_tokens": windows.numel(),
        "block_influence": influence,
        "group_of": group_of,
        "block_of_group": block_of_group,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


@torch.no_grad()
def block_passes(
    loaded: LoadedModel,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int,
    progress: bool,
    edit: BlockEdit | None = None,
    skip: frozenset[int] = frozenset(),
) -> Iterator[tuple[int, dict[str, LinearStats], float]]:
    """Run ``windows`` through the decoder one block at a time, yielding per block its index, the
    statistics of each input group (keyed by the group's first layer) and its influence
    ``1 - cos(input, output)``.

    With ``edit``, each block is handed over after its statistics are taken and its outputs are
    computed by the edited block, so later blocks see the edited model (SparseGPT's and
    llm-compressor's sequential pipeline); that costs a second pass per block. Blocks in ``skip``
    are not run at all: the residual stream passes them unchanged, as when they are removed.
    """
    model, adapter = loaded.model, loaded.adapter
    blocks = adapter.blocks(model)
    hidden, block_kwargs = _block0_inputs(model, blocks, windows, device, batch_size)
    n_tokens = windows.numel()
    for index in tqdm(range(len(blocks)), desc="calibrating blocks", disable=not progress):
        if index in skip:
            continue
        home = next(blocks[index].parameters()).device
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
        outputs = _run_block(block, hidden, block_kwargs)
        for hook in hooks:
            hook.remove()
        groups = {leader: accumulator.result(leader) for leader, accumulator in accumulators.items()}
        if edit is not None:
            edit(index, block, groups)
            outputs = _run_block(block, hidden, block_kwargs)
        blocks[index].to(home)  # back where it lives: the CPU, or the device of a model kept there
        cosine_sum = sum(
            torch.cosine_similarity(inputs, output, dim=-1).float().sum().item()
            for inputs, output in zip(hidden, outputs)
        )
        hidden = outputs
        yield index, groups, 1.0 - cosine_sum / n_tokens


def _run_block(block: nn.Module, hidden: list[torch.Tensor], block_kwargs: list[dict]) -> list[torch.Tensor]:
    """The block's output for every batch of inputs."""
    outputs = []
    for inputs, kwargs in zip(hidden, block_kwargs):
        output = block(inputs, **kwargs)
        outputs.append(output[0] if isinstance(output, tuple) else output)
    return outputs


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
