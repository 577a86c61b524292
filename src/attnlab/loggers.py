"""Logger factories used by ``conf/logger/*.yaml``."""

from __future__ import annotations

import netrc
import os
from typing import Any


def wandb_has_credentials() -> bool:
    """True when W&B can authenticate without a prompt (API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_logger(offline: bool | None = None, **kwargs: Any):
    """A Lightning ``WandbLogger`` that runs offline when no API key is configured.

    Offline runs are written under ``<save_dir>/wandb/offline-run-*`` and can be uploaded later
    with ``wandb sync <that folder>``. ``WANDB_MODE`` in the environment wins over ``offline``.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "dryrun", "disabled"):
        offline = True
    elif mode == "online":
        offline = False
    elif offline is None:
        offline = not wandb_has_credentials()
    if kwargs.get("save_dir"):
        os.makedirs(kwargs["save_dir"], exist_ok=True)
    return WandbLogger(offline=offline, **kwargs)
