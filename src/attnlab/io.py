"""Files written so that nothing a user runs can be lost or half-written, and JSON that any strict
reader accepts.

* :func:`atomic_write_text`: write a temporary sibling, then rename it over the target. A crash
  leaves the old file or the new one, never a torn one.
* :func:`write_json`: strict JSON (RFC 8259), atomically. Python's ``json`` writes ``NaN`` and
  ``Infinity`` by default, which ``jq``, JavaScript and most other readers reject; here every
  non-finite float becomes ``null`` (the record's ``status`` says why a value is missing).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
