"""Where attnlab finds its configs, in a checkout and in an installed package alike."""

from __future__ import annotations

from pathlib import Path

#: The Hydra config tree shipped with the package. In a checkout ``src/attnlab/conf`` is a
#: symlink to the top-level ``conf/`` that users edit, so there is one tree: editable installs and
#: ``PYTHONPATH=src`` read it through the link, and building a wheel or an sdist copies the files
#: it points to (``package-data`` in pyproject.toml; the sdist holds them as plain files).
#: Mapping ``attnlab.conf`` onto ``conf/`` with setuptools' ``package-dir`` builds the same wheel,
#: but leaves ``src/attnlab`` without its configs: ``PYTHONPATH=src`` would not see them and
#: editable installs only through setuptools' import hook. Moving the tree into the package with
#: a top-level link instead would move every config file that other branches edit.
CONF_DIR = (Path(__file__).resolve().parent / "conf").resolve()
