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


class RecordTraining:
    """A Lightning callback that records the input ids of every optimizer step's batch (by step
    number) and the optimizer's state when fitting starts (after a checkpoint was restored), and
    saves them to ``path`` when fitting ends: what an exact resume must reproduce."""

    def __new__(cls, path: str):
        import copy

        from lightning.pytorch.callbacks import Callback

        record = {"batches": {}, "optimizer_at_start": None}

        class _RecordTraining(Callback):
            def on_train_start(self, trainer, pl_module):
                record["optimizer_at_start"] = copy.deepcopy(trainer.optimizers[0].state_dict())

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                record["batches"][trainer.global_step + 1] = batch[0].clone()

            def on_train_end(self, trainer, pl_module):
                torch.save(record, path)

        return _RecordTraining()


def train_config(overrides: list[str], output_dir, cache_dir=None):
    """The composed ``train`` config of a single run (Hydra's compose API, in-process), writing to
    ``output_dir``: what ``python train.py <overrides>`` would run, for :func:`attnlab.train.run_job`."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from attnlab.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir or Path(output_dir).parent / "cache")
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a run...
    try:
        with open_dict(cfg):
            del cfg.hydra  # a single run, not a job of a sweep
        OmegaConf.resolve(cfg)
    finally:
        HydraConfig.instance().cfg = None  # ...and no global Hydra state is left behind
    return cfg
