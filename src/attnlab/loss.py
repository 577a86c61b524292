"""Language-model loss without materialising the ``(N, V)`` logits.

For GPT-2's 50,257-token vocabulary the logits dominate training memory (4,096 tokens x 50,257
floats is 0.8 GB, and as much again for their gradient). :func:`linear_cross_entropy` computes
the LM head and the cross-entropy ``chunk_size`` rows at a time. When gradients are needed it
computes them in the same pass (``softmax - onehot`` is known as soon as the chunk's logits
are), keeps only the ``(N, C)`` and ``(V, C)`` gradients, and frees each chunk's logits at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _at_least_fp32(x: Tensor) -> Tensor:
    """Softmax statistics in fp32 even when the matmul ran in bf16/fp16 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_loss(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (fp32), per-row loss and validity for one chunk ``h`` ``(n, C)``."""
    logits = _at_least_fp32(h @ weight.t())
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0)
    return logits, loss, lse


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                compute_dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk_size, ignore_index, compute_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_size, ignore_index, compute_dtype):
        n_rows = hidden.shape[0]
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        loss_sum = hidden.new_zeros((), dtype=acc_dtype)
        for start in range(0, n_rows, chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            t = targets[start:start + chunk_size]
            logits, loss, lse = _chunk_loss(h, w, t, ignore_index)
            loss_sum += loss.sum()
            # d(loss_sum)/d(logits) = softmax(logits) - onehot(target), zero on ignored rows
            grad_logits = logits.sub_(lse[:, None]).exp_()
            valid = t != ignore_index
            rows = torch.arange(t.shape[0], device=t.device)
            grad_logits[rows, torch.where(valid, t, 0)] -= 1.0
            grad_logits.mul_(valid[:, None])
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).to(acc_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024,
                         ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` and the number of counted rows.

    ``hidden`` ``(N, C)``, ``weight`` ``(V, C)``, ``targets`` ``(N,)`` with ``ignore_index`` for rows
    that do not count. ``chunk_size=0`` uses the plain path (full logits, autograd). Returns
    ``(loss_sum, n_valid)``; the mean loss is ``loss_sum / n_valid``.
    """
    n_valid = (targets != ignore_index).sum()
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if chunk_size <= 0:
        logits = _at_least_fp32(hidden @ weight.t())
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum"), n_valid
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, compute_dtype), n_valid
    loss_sum = hidden.new_zeros((), dtype=torch.promote_types(compute_dtype, torch.float32))
    w = weight.to(compute_dtype)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size].to(compute_dtype)
        _, loss, _ = _chunk_loss(h, w, targets[start:start + chunk_size], ignore_index)
        loss_sum += loss.sum()
    return loss_sum, n_valid
