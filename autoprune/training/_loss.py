"""The distillation loss, computed a chunk of positions at a time.

A language model's logits are its largest activations (positions x vocabulary: 2,048 x 49,152
floats are 400 MB for one batch of a 135M model), and a plain distillation step holds the
student's logits, their log-softmax, their gradient and the teacher's logits all at once.
:func:`distillation_loss` instead takes the two models' final hidden states and output heads and
walks the positions in chunks: each chunk's logits are computed, turned into the loss and its
gradient with respect to the chunk's logits (closed form), and that gradient is projected back
onto the student's hidden states and head weight at once. Only one chunk's logits exist at a
time, and no logits are recomputed in the backward pass, which only scales the stored gradients.

The gradients are exact: for ``KL(p_T || q_T)`` with ``p = softmax(t / T)`` and
``q = softmax(s / T)``, ``d(T^2 KL)/ds = T (q - p)``; for the cross-entropy of a label ``y``,
``dCE/ds = softmax(s) - onehot(y)``. :func:`plain_distillation_loss` is the same loss on whole
logits, for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Positions without a next-token label (the last of each window) in the cross-entropy term.
IGNORE = -100


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss and gradients of the output head over chunks of positions (see the module)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        ce_weight: float,
        chunk: int,
    ) -> torch.Tensor:
        positions = hidden.shape[0]
        labelled = max(1, int((labels != IGNORE).sum()))
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, positions, chunk):
            h = hidden[start : start + chunk]
            logits = (h @ weight.T).float()
            teacher = (teacher_hidden[start : start + chunk] @ teacher_weight.T).float()
            grad = torch.zeros_like(logits)
            if ce_weight < 1:
                student_log = F.log_softmax(logits / temperature, -1)
                teacher_log = F.log_softmax(teacher / temperature, -1)
                teacher_prob = teacher_log.exp()
                kl = (teacher_prob * (teacher_log - student_log)).sum()
                scale = (1 - ce_weight) / positions
                total += scale * temperature**2 * kl
                grad += (scale * temperature) * (student_log.exp() - teacher_prob)
            if ce_weight > 0:
                target = labels[start : start + chunk]
                keep = target != IGNORE
                log_prob = F.log_softmax(logits, -1)
                total -= (ce_weight / labelled) * log_prob[keep].gather(1, target[keep, None]).sum()
                ce_grad = log_prob.exp()
                ce_grad[keep, target[keep]] -= 1
                grad += (ce_weight / labelled) * ce_grad * keep[:, None]
            grad = grad.to(h.dtype)
            if want_hidden:
                grad_hidden[start : start + chunk] = grad @ weight.to(h.dtype)
            if want_weight:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden = grad_hidden * grad_output if grad_hidden is not None else None
        weight = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return hidden, weight, None, None, None, None, None, None


def distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk: int = 1024,
) -> torch.Tensor:
    """The mean per-position loss of the student (final hidden states ``hidden`` ``[N, H]`` and
    head ``weight`` ``[V, H]``) against the teacher's (``teacher_hidden``, ``teacher_weight``,
    never differentiated), with next-token ``labels`` ``[N]`` (``IGNORE`` where none) for the
    cross-entropy share; ``chunk`` positions at a time."""
    return _ChunkedHeadLoss.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), labels, temperature,
        ce_weight, chunk,
    )


def plain_distillation_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """The same loss on whole ``[N, V]`` logits, as a plain training loop computes it."""
    loss = logits.new_zeros((), dtype=torch.float32)
    if ce_weight < 1:
        student_log = F.log_softmax(logits.float() / temperature, -1)
        teacher_log = F.log_softmax(teacher_logits.float() / temperature, -1)
        kl = F.kl_div(student_log, teacher_log, log_target=True, reduction="sum") / logits.shape[0]
        loss = loss + (1 - ce_weight) * temperature**2 * kl
    if ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    return loss


def next_token_labels(windows: torch.Tensor) -> torch.Tensor:
    """``[B * L]`` labels of ``[B, L]`` windows: each position's next token, ``IGNORE`` at the end."""
    labels = torch.full_like(windows, IGNORE)
    labels[:, :-1] = windows[:, 1:]
    return labels.reshape(-1)
