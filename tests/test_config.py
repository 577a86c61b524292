"""The top-level ``imports`` list: modules imported before the config is validated."""

from __future__ import annotations

import sys

import pytest

from attnlab.config import ConfigError, import_modules


def test_imports_load_modules_and_name_the_one_that_fails(monkeypatch):
    monkeypatch.delitem(sys.modules, "tests.helpers", raising=False)
    import_modules(["tests.helpers"])
    assert "tests.helpers" in sys.modules
    with pytest.raises(ConfigError, match=r"imports\[1\]='my_project.missing': import failed: No module named 'my_project'"):
        import_modules(["tests.helpers", "my_project.missing"])
    with pytest.raises(ConfigError, match="imports='tests.helpers'.*a list of module names"):
        import_modules("tests.helpers")
    import_modules(None)
