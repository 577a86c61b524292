"""Evaluation statistics: next-token loss and accuracy over a split, in total and by position,
and evaluation of trained weights at other window lengths (``eval.lengths``).

Position ``p`` (1-based) is the index of the predicted target inside its evaluation window, i.e.
the number of tokens of context the prediction had. Positions are grouped in log2-spaced
buckets ``[1, 1], [2, 3], [4, 7], ..., [2^k, min(2^(k+1) - 1, T)]`` up to the window length
``T``. Sums are exact over the split (and over ranks under DDP): losses in float64, counts as
integers, one torchmetrics state each.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

log = logging.getLogger(__name__)

#: Buckets the metric's states hold: enough for any window length below 2^63.
MAX_BUCKETS = 63


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``; inf past the float range (written as null, like NaN), None without a loss."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 709.0 else math.inf


def position_buckets(window: int) -> list[list[int]]:
    """``[[1, 1], [2, 3], [4, 7], ..., [2^k, min(2^(k+1) - 1, window)]]`` for ``window >= 1``."""
    return [[2**k, min(2 ** (k + 1) - 1, window)] for k in range(window.bit_length())]


def bucket_of_position(window: int, device: torch.device | str | None = None) -> Tensor:
    """``(window,)`` bucket index of the positions ``1..window``: ``floor(log2(p))``, computed
    from integer comparisons (no rounding of a float logarithm)."""
    positions = torch.arange(1, window + 1, device=device)
    boundaries = 2 ** torch.arange(1, window.bit_length(), device=device)  # 2, 4, 8, ... <= window
    return torch.bucketize(positions, boundaries, right=True)


class TokenMetrics(Metric):
    """Summed loss, correct predictions and counted tokens per position bucket.

    ``update(token_loss, token_correct, counted)`` takes ``(B, T)`` tensors of one batch of
    windows; :meth:`compute` returns the totals and the buckets up to the longest window seen."""

    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.zeros(MAX_BUCKETS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_correct", torch.zeros(MAX_BUCKETS, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_tokens", torch.zeros(MAX_BUCKETS, dtype=torch.long), dist_reduce_fx="sum")
        # a rank that saw no batch still knows the window length after the sync
        self.add_state("window", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(self, token_loss: Tensor, token_correct: Tensor, counted: Tensor) -> None:
        """``token_loss`` ``(B, T)`` (0 where not counted), ``token_correct`` and ``counted`` ``(B, T)`` bool."""
        window = token_loss.shape[1]
        bucket = bucket_of_position(window, token_loss.device)
        self.loss_sum.index_add_(0, bucket, token_loss.sum(0, dtype=torch.float64))
        self.n_correct.index_add_(0, bucket, token_correct.sum(0))
        self.n_tokens.index_add_(0, bucket, counted.sum(0))
        self.window = torch.clamp(self.window, min=window)

    def compute(self) -> dict[str, Any]:
        """``{"loss", "acc", "n_tokens", "by_position": {"positions", "loss", "acc", "n_tokens"}}`` as
        Python numbers; ``loss``/``acc`` are None where no token was counted."""
        window = int(self.window)
        k = len(position_buckets(window)) if window > 0 else 0
        loss_sum, n_correct, n_tokens = (state.tolist()[:k] for state in (self.loss_sum, self.n_correct, self.n_tokens))
        total = sum(n_tokens)
        return {
            "loss": sum(loss_sum) / total if total else None,
            "acc": sum(n_correct) / total if total else None,
            "n_tokens": total,
            "by_position": {
                "positions": position_buckets(window) if window > 0 else [],
                "loss": [s / n if n else None for s, n in zip(loss_sum, n_tokens)],
                "acc": [c / n if n else None for c, n in zip(n_correct, n_tokens)],
                "n_tokens": n_tokens,
            },
        }


def evaluate_lengths(trainer: Any, module: Any, datamodule: Any, lengths: list[int], trained_length: int,
                     not_applicable: str | None = None) -> dict[str, dict[str, Any]]:
    """Validation loss, accuracy and loss by position of ``module``'s current weights at each
    window length in ``lengths`` (``eval.lengths``), through ``trainer.validate`` so DDP, precision
    and the loggers work as in training. A length the model cannot run at (see
    :meth:`attnlab.model.GPT.length_extrapolation_issue`), or every length when
    ``not_applicable`` gives a reason, is reported ``{"status": "not_applicable", "reason": ...}``."""
    results: dict[str, dict[str, Any]] = {}
    for length in lengths:
        reason = not_applicable or module.model.length_extrapolation_issue(length, trained_length)
        if reason is not None:
            results[str(length)] = {"status": "not_applicable", "reason": reason}
            log.info("eval.lengths %d: not applicable: %s", length, reason)
            continue
        module.eval_length = length
        try:
            trainer.validate(module, dataloaders=datamodule.eval_dataloader("validation", length), verbose=False)
            result = module.length_results.pop(length)
        finally:
            module.eval_length = None
        loss = result["loss"]
        results[str(length)] = {
            "status": "ok", "val_loss": loss, "val_ppl": perplexity(loss),
            "val_acc": result["acc"], "n_tokens": result["n_tokens"], "loss_by_position": result["by_position"]}
        log.info("eval.lengths %d: validation loss %s, accuracy %s", length, loss, result["acc"])
    return results
