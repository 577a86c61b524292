"""Checkpoint I/O that never leaves a half-written file and loads with ``weights_only``."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then rename it over ``path``:
    a crash at any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; fall back to a full unpickle (with a warning) only for
    checkpoints holding objects outside the safe set (e.g. written by older code)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle.UnpicklingError and friends
        log.warning("checkpoint %s needs a full unpickle (%s); loading it as trusted", path, str(error).splitlines()[0])
        return torch.load(path, map_location=map_location, weights_only=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin using :func:`atomic_torch_save` and :func:`load_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return load_checkpoint(path, map_location or "cpu")
