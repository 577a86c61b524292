"""Preset lookups by name in the user's config directories: ``$ATTNLAB_CONFIG_PATH`` outside a Hydra
run, the run's own search path inside one (the installed package: tests/test_packaging.py)."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from attnlab.attention import load_preset, preset_names
from attnlab.config import ConfigError
from attnlab.model import GPT
from attnlab.paths import CONF_DIR, CONFIG_PATH_ENV, config_dirs
from tests.conftest import ROOT, TINY_MODEL


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    """A user's config directory: a new preset, and one named like a packaged preset."""
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    (tmp_path / "attention").mkdir()
    (tmp_path / "attention" / "my_gqa.yaml").write_text("name: gqa\nn_kv_heads: 2\n")
    (tmp_path / "attention" / "mha.yaml").write_text("name: mqa\n")
    return tmp_path


def test_the_packaged_configs_are_the_checkouts_conf(monkeypatch):
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    # src/attnlab/conf links to conf/: one tree for the checkout and the package
    assert CONF_DIR == (ROOT / "conf").resolve()
    assert config_dirs() == [CONF_DIR]


def test_presets_from_the_config_path_variable(user_conf, monkeypatch):
    with pytest.raises(ConfigError, match=f"my_gqa.*add directories with \\${CONFIG_PATH_ENV}"):
        GPT.from_config(TINY_MODEL, "my_gqa")
    monkeypatch.setenv(CONFIG_PATH_ENV, os.pathsep.join([str(user_conf.parent / "missing"), str(user_conf)]))
    assert "my_gqa" in preset_names()
    model = GPT.from_config(TINY_MODEL, {"name": "moas", "branches": ["mha", "my_gqa"]})
    assert [b.n_kv_heads for b in model.blocks[0].attn.branches] == [4, 2]
    # the packaged directory comes first, as in Hydra: a user's file cannot change a packaged preset
    assert load_preset("mha") == {"name": "mha"}


def test_presets_follow_the_search_path_of_a_hydra_run(user_conf, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(user_conf.parent / "elsewhere"))
    # a project that ships its configs as a package: pkg://user_pkg.conf (Hydra needs the __init__.py)
    package = tmp_path / "site" / "user_pkg"
    (package / "conf" / "attention").mkdir(parents=True)
    for init in (package / "__init__.py", package / "conf" / "__init__.py"):
        init.write_text("")
    (package / "conf" / "attention" / "pkg_mqa.yaml").write_text("name: mqa\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{user_conf},pkg://user_pkg.conf]",
                                          "attention=my_gqa"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        # hydra.conf (pkg), then these in Hydra's order; the variable is not read
        assert config_dirs()[-3:] == [CONF_DIR, user_conf, package / "conf"]
        assert cfg.attention == load_preset("my_gqa") == {"name": "gqa", "n_kv_heads": 2}
        assert load_preset("pkg_mqa") == {"name": "mqa"}
        with pytest.raises(ConfigError, match="add directories with --config-dir or hydra.searchpath"):
            load_preset("nowhere")
    finally:
        HydraConfig.instance().cfg = None
