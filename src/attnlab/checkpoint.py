"""Checkpoints: written atomically, never with non-finite weights, loaded with ``weights_only``.

* :class:`AtomicCheckpointIO` (the trainer's checkpoint plugin) writes through a temporary file
  and a rename, and refuses a checkpoint whose weights are not all finite: whatever asks for the
  write, a diverged model never overwrites ``last.ckpt`` or becomes a "best" checkpoint.
* :class:`FiniteModelCheckpoint` (the default checkpoint callback) does not ask for such writes:
  once training has diverged it saves nothing, so the last finite checkpoints stay in place.
* :func:`checkpoint_problem` tells, cheaply (memory-mapped), what makes a file unusable as
  ``ckpt_path``, so a wrong path stops the run at start-up.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from attnlab.io import atomic_write

log = logging.getLogger(__name__)


class NonFiniteCheckpointError(ValueError):
    """A checkpoint with NaN or infinite weights was about to be written."""


def nonfinite_entries(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` holding a NaN or an infinity (one
    synchronisation for all of them)."""
    names = [name for name, t in state_dict.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not names:
        return []
    device = state_dict[names[0]].device
    finite = torch.stack([torch.isfinite(state_dict[name]).all().to(device) for name in names]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (:func:`attnlab.io.atomic_write`): a crash
    at any moment leaves either the old file or the new one, never a torn one."""
    atomic_write(path, lambda handle: torch.save(obj, handle), durable=True)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with ``weights_only=True``; fall back to a full unpickle (with a warning) only for
    checkpoints holding objects outside the safe set (e.g. written by older code). ``mmap``
    maps the tensors instead of reading them (for inspecting a file)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # pickle.UnpicklingError and friends
        log.warning("checkpoint %s needs a full unpickle (%s); loading it as trusted", path, str(error).splitlines()[0])
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes ``path`` unusable to resume from, in a few words, or None if it is a readable
    checkpoint with a ``state_dict`` of finite weights. Memory-mapped: no tensor is copied."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory sits at the end
        return "not a PyTorch checkpoint (no zip archive: a text file, or a truncated copy?)"
    try:
        checkpoint = load_checkpoint(path, mmap=True)
    except Exception as error:
        return f"unreadable checkpoint ({type(error).__name__}: {str(error).strip().splitlines()[0]})"
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        return f"no state_dict in the checkpoint (found {keys}): not a training checkpoint written by train.py"
    bad = nonfinite_entries(checkpoint["state_dict"])
    if bad:
        return f"non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the run had diverged"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin using :func:`atomic_torch_save` and :func:`load_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        bad = nonfinite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(f"refusing to write {path}: non-finite weights in {', '.join(bad[:3])}"
                                           f"{', ...' if len(bad) > 3 else ''}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return load_checkpoint(path, map_location or "cpu")


class FiniteModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that saves nothing once training has
    diverged (the LightningModule's ``check_divergence()``) or the weights are not finite.

    The last finite ``last.ckpt`` and best checkpoint then stay in place. Plain ModelCheckpoint
    would rank a NaN validation loss as +inf but still save it, and keep it as the best while it
    is the only one; here such a checkpoint is never asked for (and the checkpoint plugin would
    refuse to write it)."""

    @staticmethod
    def _may_save(pl_module: Any, read_record: bool = True) -> bool:
        """``read_record``: read the module's divergence record (a collective under DDP, so not
        on an exception, when the other ranks may be elsewhere). A debug run (``fast_dev_run``)
        saves nothing, as Lightning documents (its ``on_train_end`` would still write last.ckpt)."""
        if getattr(getattr(pl_module, "_trainer", None), "fast_dev_run", False):
            return False
        check = getattr(pl_module, "check_divergence", None)
        if read_record and callable(check):
            check()
        if getattr(pl_module, "diverged_at_step", None) is not None:
            return False
        return not nonfinite_entries(pl_module.state_dict())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        # Reading the weights here every step would synchronise the device every step: check
        # only on the steps this callback may save on (every step with train_time_interval).
        every = self._every_n_train_steps
        due = (every >= 1 and trainer.global_step % every == 0) or self._train_time_interval is not None
        if due and not self._may_save(pl_module):
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._may_save(pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._may_save(pl_module):
            super().on_validation_end(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._may_save(pl_module, read_record=False):
            super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._may_save(pl_module):
            super().on_train_end(trainer, pl_module)
