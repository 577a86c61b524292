"""Where attnlab finds its configs, in a checkout and in an installed package alike."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: The Hydra config tree shipped with the package. In a checkout ``src/attnlab/conf`` is a
#: symlink to the top-level ``conf/`` that users edit, so there is one tree: editable installs and
#: ``PYTHONPATH=src`` read it through the link, and building a wheel or an sdist copies the files
#: it points to (``package-data`` in pyproject.toml; the sdist holds them as plain files).
#: Mapping ``attnlab.conf`` onto ``conf/`` with setuptools' ``package-dir`` builds the same wheel,
#: but leaves ``src/attnlab`` without its configs: ``PYTHONPATH=src`` would not see them and
#: editable installs only through setuptools' import hook. Moving the tree into the package with
#: a top-level link instead would move every config file that other branches edit.
CONF_DIR = (Path(__file__).resolve().parent / "conf").resolve()

#: More config directories for preset lookups outside a Hydra run (the Python API), separated
#: by ``os.pathsep``; inside a Hydra run the run's own search path is used instead.
CONFIG_PATH_ENV = "ATTNLAB_CONFIG_PATH"


def _hydra_search_path() -> list[Traversable] | None:
    """The running Hydra job's config sources in Hydra's order (None outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    runtime = HydraConfig.get().runtime
    roots: list[Traversable] = []
    for source in runtime.config_sources:
        if source.schema == "file":
            # relative searchpath entries are relative to the launch directory, as in Hydra
            roots.append(Path(runtime.cwd) / source.path)
        elif source.schema == "pkg":
            try:
                roots.append(resources.files(source.path))
            except (ModuleNotFoundError, TypeError, ValueError):  # Hydra skips unavailable sources too
                continue
    return roots


def config_dirs() -> list[Traversable]:
    """The config roots searched for presets by name (``attention/<name>.yaml``); the first match wins.

    * Inside a Hydra run (``attnlab-train``, ``attnlab-bench``, ``train.py``, ...): the run's config
      search path, so a name that ``attention=<name>`` composes is also found as a MoAS branch, a
      ``model.layer_attention`` entry, ``model.match_params`` or a ``bench.attention`` entry. Hydra
      searches the packaged configs first, then ``--config-dir`` and ``hydra.searchpath``.
    * Elsewhere (``GPT.from_config(model, "my_preset")``): the packaged configs, then each directory
      of ``$ATTNLAB_CONFIG_PATH``.
    """
    in_run = _hydra_search_path()
    if in_run is not None:
        return in_run
    extra = [Path(d) for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d]
    return [CONF_DIR, *extra]


def describe_config_dirs(subdir: str) -> str:
    """Where :func:`config_dirs` looks for ``subdir`` and how to add a directory, for error messages."""
    searched = ", ".join(str(root / subdir) for root in config_dirs())
    how = ("--config-dir or hydra.searchpath" if _hydra_search_path() is not None
           else f"${CONFIG_PATH_ENV}, config directories separated by {os.pathsep!r}")
    return f"searched in {searched} (add directories with {how})"
