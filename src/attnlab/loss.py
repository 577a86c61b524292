"""Language-model loss without materialising the ``(N, V)`` logits.

For GPT-2's 50,257-token vocabulary the logits dominate training memory (4,096 tokens x 50,257
floats is 0.8 GB, and as much again for their gradient) and, on CPU, time: every fresh
0.2 GB tensor costs page faults before any arithmetic. :func:`linear_cross_entropy` computes
the LM head and the cross-entropy ``chunk_size`` rows at a time into one reused buffer, with the
softmax done in place. When gradients are needed it computes them in the same pass
(``softmax - onehot`` is known as soon as a chunk's logits are) and keeps only the ``(N, C)``
and ``(V, C)`` gradients; backward merely scales them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in fp32 even when the matmul runs in bf16/fp16 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _chunked_pass(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                  compute_dtype: torch.dtype, want_grad_hidden: bool, want_grad_weight: bool):
    """Summed loss and, if asked, the gradients of that sum w.r.t. ``hidden`` and ``weight``.

    ``hidden`` ``(N, C)``, ``weight`` ``(V, C)``, ``targets`` ``(N,)``. One ``(chunk, V)`` buffer
    holds a chunk's logits, then (in place) its probabilities, then ``d loss / d logits``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = _accumulation_dtype(compute_dtype)
    w = weight.to(compute_dtype)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if want_grad_weight else None
    loss_sum = hidden.new_zeros((), dtype=acc)
    buffer = torch.empty(min(chunk_size, n_rows), vocab, device=hidden.device, dtype=acc)
    rows = torch.arange(buffer.shape[0], device=hidden.device)
    for start in range(0, n_rows, chunk_size):
        h = hidden[start:start + chunk_size].to(compute_dtype)
        t = targets[start:start + chunk_size]
        n = h.shape[0]
        logits = buffer[:n]
        if compute_dtype == acc:
            torch.mm(h, w.t(), out=logits)
        else:
            logits.copy_(h @ w.t())
        valid = t != ignore_index
        safe_t = torch.where(valid, t, 0)
        target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: unnormalised probabilities
        row_sum = probs.sum(dim=1, keepdim=True)
        lse = (row_max + row_sum.log()).squeeze(1)
        loss_sum += torch.where(valid, lse - target_logit, 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # d(loss_sum)/d(logits) = softmax - onehot(target), zero on ignored rows
        grad_logits = probs.div_(row_sum)
        grad_logits[rows[:n], safe_t] -= 1.0
        grad_logits.mul_(valid[:, None].to(acc))
        g = grad_logits if compute_dtype == acc else grad_logits.to(compute_dtype)
        if grad_hidden is not None:
            if grad_hidden.dtype == compute_dtype:
                torch.mm(g, w, out=grad_hidden[start:start + n])
            else:
                grad_hidden[start:start + n] = g @ w
        if grad_weight is not None:
            if compute_dtype == acc:
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += (g.t() @ h).to(acc)
    return loss_sum, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                compute_dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            loss_sum, grad_hidden, grad_weight = _chunked_pass(
                hidden, weight, targets, chunk_size, ignore_index, compute_dtype,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
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


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 256,
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
        logits = hidden @ weight.t()
        logits = logits.to(_accumulation_dtype(logits.dtype))
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum"), n_valid
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, compute_dtype), n_valid
    with torch.autocast(device_type, enabled=False):
        loss_sum, _, _ = _chunked_pass(hidden, weight, targets, chunk_size, ignore_index, compute_dtype, False, False)
    return loss_sum, n_valid
