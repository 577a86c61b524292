"""Language-model loss without materialising the ``(N, V)`` logits.

For GPT-2's 50,257-token vocabulary the logits dominate training memory (4,096 tokens x 50,257
floats is 0.8 GB, and as much again for their gradient) and, on CPU, time: every fresh
0.2 GB tensor costs page faults before any arithmetic. :func:`linear_cross_entropy` computes
the LM head and the cross-entropy ``chunk_size`` rows at a time into one reused buffer, with the
softmax done in place. When gradients are needed it computes them in the same pass
(``softmax - onehot`` is known as soon as a chunk's logits are) and keeps only the ``(N, C)``
and ``(V, C)`` gradients; backward merely scales them.

The same pass counts correct next-token predictions (``argmax == target``) and, for
evaluation, keeps each row's loss and correctness (loss by position). By default it counts
only where no gradient is computed: finding the argmax with the row maximum (``max`` with
indices instead of ``amax``) made the chunked pass 1.14-1.19x slower on CPU (V=50,257, 2,048
rows; noisy, shared machine), and training does not use the count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class LMLoss(NamedTuple):
    """``loss_sum`` (summed cross-entropy over counted rows), ``n_tokens`` (counted rows),
    ``n_correct`` (counted rows whose argmax is the target, or None when not asked for), and with
    ``per_token``: ``token_loss`` ``(N,)`` (0 on ignored rows, no gradient) and ``token_correct``
    ``(N,)`` bool (False on ignored rows)."""

    loss_sum: Tensor
    n_tokens: Tensor
    n_correct: Tensor | None = None
    token_loss: Tensor | None = None
    token_correct: Tensor | None = None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in fp32 even when the matmul runs in bf16/fp16 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _chunked_pass(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                  compute_dtype: torch.dtype, want_grad_hidden: bool, want_grad_weight: bool,
                  count_correct: bool, per_token: bool):
    """Summed loss, the number of correct rows and per-row values as asked, and the gradients of
    the summed loss w.r.t. ``hidden`` and ``weight`` if asked.

    ``hidden`` ``(N, C)``, ``weight`` ``(V, C)``, ``targets`` ``(N,)``. One ``(chunk, V)`` buffer
    holds a chunk's logits, then (in place) its probabilities, then ``d loss / d logits``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = _accumulation_dtype(compute_dtype)
    w = weight.to(compute_dtype)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if want_grad_weight else None
    loss_sum = hidden.new_zeros((), dtype=acc)
    n_correct = torch.zeros((), dtype=torch.long, device=hidden.device) if count_correct else None
    token_loss = hidden.new_empty(n_rows, dtype=acc) if per_token else None
    token_correct = torch.empty(n_rows, dtype=torch.bool, device=hidden.device) if per_token else None
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
        if count_correct or per_token:
            # the maximum and the first index holding it in one pass, before the in-place softmax
            row_max, predicted = logits.max(dim=1, keepdim=True)
            correct = (predicted.squeeze(1) == t) & valid
            if n_correct is not None:
                n_correct += correct.sum()
            if token_correct is not None:
                token_correct[start:start + n] = correct
        else:
            row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: unnormalised probabilities
        row_sum = probs.sum(dim=1, keepdim=True)
        lse = (row_max + row_sum.log()).squeeze(1)
        row_loss = torch.where(valid, lse - target_logit, 0.0)
        loss_sum += row_loss.sum()
        if token_loss is not None:
            token_loss[start:start + n] = row_loss
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
    return loss_sum, n_correct, token_loss, token_correct, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                compute_dtype: torch.dtype, count_correct: bool, per_token: bool):
        with torch.autocast(hidden.device.type, enabled=False):
            loss_sum, n_correct, token_loss, token_correct, grad_hidden, grad_weight = _chunked_pass(
                hidden, weight, targets, chunk_size, ignore_index, compute_dtype,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], count_correct, per_token)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(*(t for t in (n_correct, token_loss, token_correct) if t is not None))
        return loss_sum, n_correct, token_loss, token_correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 256,
                         ignore_index: int = IGNORE_INDEX, *, count_correct: bool | None = None,
                         per_token: bool = False) -> LMLoss:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, the number of counted rows
    and, as asked, the number of correct predictions and per-row values (see :class:`LMLoss`).

    ``hidden`` ``(N, C)``, ``weight`` ``(V, C)``, ``targets`` ``(N,)`` with ``ignore_index`` for rows
    that do not count. ``chunk_size=0`` uses the plain path (full logits, autograd).
    ``count_correct=None`` counts correct predictions when no gradient is computed (evaluation);
    ``per_token`` keeps each row's loss and correctness (evaluation by position) and implies
    counting. Either replaces the row maximum by the maximum with its index, which costs time
    (see the module docstring), so training leaves them off by default.
    """
    n_valid = (targets != ignore_index).sum()
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    count_correct = (not needs_grad if count_correct is None else count_correct) or per_token
    if chunk_size <= 0:
        logits = hidden @ weight.t()
        logits = logits.to(_accumulation_dtype(logits.dtype))
        if not count_correct:
            return LMLoss(F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum"), n_valid)
        row_loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
        correct = (logits.detach().argmax(dim=-1) == targets) & (targets != ignore_index)
        if per_token:
            return LMLoss(row_loss.sum(), n_valid, correct.sum(), row_loss.detach(), correct)
        return LMLoss(row_loss.sum(), n_valid, correct.sum())
    if needs_grad:
        loss_sum, n_correct, token_loss, token_correct = _LinearCrossEntropy.apply(
            hidden, weight, targets, chunk_size, ignore_index, compute_dtype, count_correct, per_token)
        return LMLoss(loss_sum, n_valid, n_correct, token_loss, token_correct)
    with torch.autocast(device_type, enabled=False):
        loss_sum, n_correct, token_loss, token_correct, _, _ = _chunked_pass(
            hidden, weight, targets, chunk_size, ignore_index, compute_dtype, False, False, count_correct, per_token)
    return LMLoss(loss_sum, n_valid, n_correct, token_loss, token_correct)
