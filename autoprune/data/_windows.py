"""Token windows for calibration, search-time validation and evaluation."""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from autoprune.data._sources import read_text
from autoprune.errors import AutopruneError

#: Calibration samples are drawn from the first part of the calibration split; the rest is held
#: out for search-time validation windows, so a search never scores on its calibration tokens.
CALIBRATION_SHARE = 0.8


def tokenize(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added mid-corpus)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.long)


def evaluation_windows(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int = 512,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of the evaluation split, from its start: ``[n, seq_len]``."""
    return _consecutive(tokenize(read_text(source, "evaluation"), tokenizer), seq_len, max_windows)


def validation_windows(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int = 512,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Windows from the held-out tail of the calibration split, for scoring during a search."""
    ids = tokenize(read_text(source, "calibration"), tokenizer)
    return _consecutive(ids[int(len(ids) * CALIBRATION_SHARE) :], seq_len, max_windows)


def calibration_ids(source: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The tokens of the calibration split that calibration and training draw from: its first
    part, never the held-out tail that :func:`validation_windows` scores on."""
    ids = tokenize(read_text(source, "calibration"), tokenizer)
    return ids[: int(len(ids) * CALIBRATION_SHARE)]


def calibration_windows(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` windows at random offsets of the calibration split of ``source`` (for data-free
    calibration, ``"self"``, see :func:`self_generated_windows`)."""
    if n_samples < 1 or seq_len < 2:
        raise AutopruneError("calibration needs at least 1 sample of at least 2 tokens")
    usable = calibration_ids(source, tokenizer)
    if len(usable) <= seq_len:
        raise AutopruneError(
            f"calibration text of {source} has {len(usable)} usable tokens, fewer than {seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(usable) - seq_len, (n_samples,), generator=generator)
    return torch.stack([usable[start : start + seq_len] for start in starts.tolist()])


@torch.no_grad()
def self_generated_windows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int,
    seq_len: int,
    seed: int,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Text sampled from the dense model itself, starting from BOS, with a fixed seed."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    batches = []
    firsts = range(0, n_samples, batch_size)
    for first in tqdm(firsts, desc="generating calibration text", unit="batch", disable=not progress):
        size = min(batch_size, n_samples - first)
        prompt = torch.full((size, 1), start, dtype=torch.long, device=device)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_length=seq_len,
            min_length=seq_len,
            pad_token_id=start,
            use_cache=True,
        )
        batches.append(out[:, :seq_len].cpu())
    return torch.cat(batches)


def windows_fingerprint(windows: torch.Tensor) -> str:
    """A content hash of token windows: caches key on the tokens, not on file names."""
    digest = hashlib.sha256(str(tuple(windows.shape)).encode())
    digest.update(windows.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _consecutive(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise AutopruneError(f"text has {len(ids)} tokens, not one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len)
