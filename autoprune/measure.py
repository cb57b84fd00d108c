"""Measuring a (pruned) model: perplexity, KL divergence to the dense model, and size.

Sizes are counted from the tensors themselves (tied weights once), so the numbers users compare are
the numbers the checkpoint holds; :func:`expected_linear_nonzeros` predicts the same count from a
plan and the layer shapes alone, which the search uses before pruning anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoprune.methods import prune_count
from autoprune.models import ArchitectureAdapter
from autoprune.plan import Plan

BYTES_FP16 = 2


@dataclass(frozen=True)
class SizeReport:
    """What a user compares: every count covers embeddings and lm_head, tied weights once.

    ``bytes_dense_fp16`` is two bytes per parameter: the weights of a checkpoint written in
    bfloat16 or float16, as exports of a bfloat16 source (or a GGUF) are by default; a written
    checkpoint's report also gives its files' own bytes (``checkpoint_bytes``)."""

    total_params: int
    nonzero_params: int
    linear_params: int
    linear_nonzeros: int
    dense_linear_params: int
    bytes_dense_fp16: int
    bytes_sparse: int

    @property
    def sparsity(self) -> float:
        """Fraction of the dense model's decoder linear weights removed (removed blocks count)."""
        return 1.0 - self.linear_nonzeros / self.dense_linear_params

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "sparsity": round(self.sparsity, 6)}


class SizeMeter:
    """Measures one model's size again and again (a search measures every trial).

    Pruning only ever changes decoder linear weights, so every other parameter (embeddings, norms,
    lm_head) is counted the first time it is seen and remembered by identity; a trial then pays for
    counting its linear weights only. Removed blocks simply drop out of ``model.parameters()``.
    """

    def __init__(self, adapter: ArchitectureAdapter, dense_linear_params: int | None = None) -> None:
        self.adapter = adapter
        self.dense_linear_params = dense_linear_params
        self._other_nonzeros: dict[int, int] = {}

    def __call__(self, model: nn.Module) -> SizeReport:
        """Parameters and non-zeros of ``model``, its bytes stored dense (fp16) and sparse.

        Sparse storage is, per decoder linear layer, the smallest of dense fp16, a bitmask plus
        fp16 values, and (where every group of 4 holds at most 2 non-zeros) the 2:4-compressed
        layout of fp16 values plus 2-bit indices. Everything else is stored dense.
        """
        linear_ids = {id(model.get_submodule(name).weight) for name in self.adapter.present_layer_names(model)}
        seen: set[int] = set()
        total = nonzero = linear = linear_nonzero = sparse_bytes = 0
        for parameter in model.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            count = parameter.numel()
            total += count
            if id(parameter) in linear_ids:
                nonzeros = count_nonzeros(parameter)
                linear += count
                linear_nonzero += nonzeros
                sparse_bytes += sparse_storage_bytes(parameter.data, nonzeros)
            else:
                if id(parameter) not in self._other_nonzeros:
                    self._other_nonzeros[id(parameter)] = count_nonzeros(parameter)
                nonzeros = self._other_nonzeros[id(parameter)]
                sparse_bytes += BYTES_FP16 * count
            nonzero += nonzeros
        return SizeReport(
            total_params=total,
            nonzero_params=nonzero,
            linear_params=linear,
            linear_nonzeros=linear_nonzero,
            dense_linear_params=self.dense_linear_params or linear,
            bytes_dense_fp16=BYTES_FP16 * total,
            bytes_sparse=sparse_bytes,
        )


def measure_size(
    model: nn.Module, adapter: ArchitectureAdapter, dense_linear_params: int | None = None
) -> SizeReport:
    """Size of ``model`` measured once (see :class:`SizeMeter`)."""
    return SizeMeter(adapter, dense_linear_params)(model)


def count_nonzeros(tensor: torch.Tensor) -> int:
    """``torch.count_nonzero`` by another route: on CPU, for float tensors, counting the ``True``
    entries of ``tensor.bool()`` is several times faster (same semantics: -0.0 is zero, NaN is not),
    and a search counts every decoder weight of the model in every trial."""
    return int(tensor.bool().sum())


def sparse_storage_bytes(weight: torch.Tensor, nonzeros: int) -> int:
    """Bytes of ``weight`` (holding ``nonzeros`` non-zeros) in its most compact stored format."""
    count = weight.numel()
    options = [BYTES_FP16 * count, math.ceil(count / 8) + BYTES_FP16 * nonzeros]
    if 2 * nonzeros <= count and is_two_of_four(weight):
        options.append(BYTES_FP16 * count // 2 + math.ceil(count / 2 * 2 / 8))
    return min(options)


def is_two_of_four(weight: torch.Tensor, probe_groups: int = 1024) -> bool:
    """Whether every group of 4 consecutive input weights holds at most 2 non-zeros.

    An unstructured mask breaks the pattern within its first groups almost surely, so those are
    tested first and the whole tensor is scanned only when it may be 2:4 (same answer, and a
    search measures every trial)."""
    if weight.shape[-1] % 4:
        return False
    groups = weight.reshape(-1, 4)
    return all(bool((part.bool().sum(dim=1) <= 2).all()) for part in (groups[:probe_groups], groups))


def expected_linear_nonzeros(
    plan: Plan, layer_shapes: dict[str, tuple[int, int]], block_of: dict[str, int]
) -> int:
    """Decoder linear non-zeros that ``plan`` leaves, from shapes alone (dense weights assumed to
    hold no exact zeros)."""
    removed = set(plan.removed_blocks)
    total = 0
    for name, (rows, cols) in layer_shapes.items():
        if block_of[name] in removed:
            continue
        spec = plan.layers.get(name)
        if spec is None or spec.is_dense:
            total += rows * cols
        elif spec.nm is not None:
            total += rows * cols // spec.nm.m * spec.nm.n
        else:
            total += rows * (cols - prune_count(spec.sparsity, cols))
    return total


@dataclass(frozen=True)
class WindowLoss:
    """One evaluation window's sums: next-token NLL over its ``L - 1`` predictions and, when a
    dense reference is given, KL(dense || model) over its ``L`` positions."""

    nll: float
    kl: float | None = None


@torch.no_grad()
def window_losses(
    model: nn.Module,
    windows: torch.Tensor,
    reference: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "evaluating",
    batch_size: int = 1,
) -> Iterator[WindowLoss]:
    """Per window, its NLL and (with ``reference``, see :func:`reference_logprobs`) its KL sums,
    from one forward pass per ``batch_size`` windows.

    Yielded window by window, so a caller can stop early (multi-fidelity, wasting at most the rest
    of a batch); NLL and KL share the forward, so a KL objective costs what perplexity does. On a
    CPU one window per pass holds one window's logits and loses nothing; on a GPU a small model's
    window costs far more than its arithmetic, its passes being bound by kernel launches, which a
    batch shares.
    """
    device = next(model.parameters()).device
    starts = range(0, len(windows), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        predicted = logits[:, :-1].reshape(-1, logits.shape[-1])
        nll = F.cross_entropy(predicted, ids[:, 1:].reshape(-1), reduction="none")
        nll = nll.view(len(ids), -1).sum(1)
        if reference is None:
            yield from (WindowLoss(value) for value in nll.double().tolist())
            continue
        ref = reference[start : start + batch_size].to(device).float()
        kl = (ref.exp() * (ref - F.log_softmax(logits, -1))).sum(dim=(1, 2))
        pairs = zip(nll.double().tolist(), kl.double().tolist(), strict=True)
        yield from (WindowLoss(n, k) for n, k in pairs)


def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> float:
    """exp of the mean token NLL over all windows (the literature's WikiText-2 perplexity);
    ``inf`` when the model has collapsed to non-finite losses."""
    total = sum(loss.nll for loss in window_losses(model, windows, progress=progress))
    return ppl_from_nll(total, windows.shape[0] * (windows.shape[1] - 1))


def ppl_from_nll(total_nll: float, n_tokens: int) -> float:
    mean = total_nll / n_tokens
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The dense model's next-token log-probabilities on ``windows``, kept in fp16 for KL."""
    device = next(model.parameters()).device
    out = [
        F.log_softmax(model(w.unsqueeze(0).to(device), use_cache=False).logits[0].float(), -1)
        .half()
        .cpu()
        for w in windows
    ]
    return torch.stack(out)


def kl_to_reference(model: nn.Module, windows: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-token KL(dense || pruned): a smoother objective than perplexity for search."""
    total = sum(loss.kl for loss in window_losses(model, windows, reference))
    return total / windows.numel()
