"""Locations the package needs at run time."""

from __future__ import annotations

import os
from pathlib import Path

#: Repository root (the package is installed in editable mode from ``src/``).
ROOT_DIR = Path(__file__).resolve().parents[2]
#: Hydra config tree; ``ATTNLAB_CONF_DIR`` points elsewhere for non-editable installs.
CONF_DIR = Path(os.environ.get("ATTNLAB_CONF_DIR", ROOT_DIR / "conf"))
