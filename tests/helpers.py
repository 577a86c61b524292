"""Test utilities shared across test modules."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            # a sparse tensor holds its stored entries, not its shape's elements
            size = t.numel() if t.layout == torch.strided else t._nnz()
            if size > self.largest:
                self.largest, self.op = size, str(func)
        return out


def largest_intermediate(fn, *args, **kwargs) -> tuple[int, str]:
    """Run ``fn`` and return the element count of the largest tensor any ATen op produced (and
    that op's name): an algorithmic memory bound that does not depend on timing. Sparse tensors
    count their stored entries."""
    with _LargestTensor() as mode:
        fn(*args, **kwargs)
    return mode.largest, mode.op


class StopAtStep:
    """A Lightning callback that ends fitting after ``step`` optimizer steps (an interruption that
    leaves the normal end-of-fit checkpoint behind)."""

    def __new__(cls, step: int):
        from lightning.pytorch.callbacks import Callback

        class _StopAtStep(Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _StopAtStep()
