"""Files written so that nothing a user runs can be lost or half-written, and JSON that any strict
reader accepts.

* :func:`atomic_write`: fill a temporary sibling, then rename it over the target. A crash leaves
  the old file or the new one, never a torn one; ``durable`` also survives a power loss (fsync of
  the file and of the rename). :func:`atomic_write_text` and :func:`atomic_write_dir` (a whole
  folder, first writer wins) are built on the same idea; checkpoints use it with ``durable``.
* :func:`write_json`: strict JSON (RFC 8259), atomically. Python's ``json`` writes ``NaN`` and
  ``Infinity`` by default, which ``jq``, JavaScript and most other readers reject; here every
  non-finite float becomes ``null`` (the record's ``status`` says why a value is missing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], durable: bool = False) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (some filesystems refuse a directory fsync: then it is not)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - filesystem dependent
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_dir(target: str | Path, write: Callable[[Path], None], marker: str) -> None:
    """Fill a temporary sibling folder with ``write(folder)``, then rename it to ``target``.

    Several processes may build the same folder (a cache): the first rename wins and the others'
    copies are dropped, as long as ``target / marker`` (a file ``write`` creates last) exists."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def strict_json_value(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, tuples as lists, tensors and
    numpy scalars as Python numbers, and anything else unknown as its ``str``."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    item = getattr(value, "item", None)  # 0-d tensors, numpy scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return strict_json_value(item())
    tolist = getattr(value, "tolist", None)  # arrays, tensors
    if callable(tolist):
        return strict_json_value(tolist())
    return str(value)


def dumps(payload: Any) -> str:
    """Strict JSON text of ``payload`` (see :func:`strict_json_value`), indented."""
    return json.dumps(strict_json_value(payload), indent=2, allow_nan=False)


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as strict JSON, atomically."""
    atomic_write_text(path, dumps(payload))


def read_json(path: str | Path) -> Any | None:
    """The parsed file, or ``None`` when it is missing or not valid JSON (a job killed mid-run)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
