"""The config tree in-process (Hydra's compose API, no subprocess): every experiment and preset
composes and validates, bad values stop at start-up naming the field, and every preset trains."""

from __future__ import annotations

import json

import pytest

from attnlab.attention import preset_names
from attnlab.config import ConfigError
from attnlab.paths import CONF_DIR
from attnlab.train import run_job, validate
from tests.helpers import train_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
FAST = ["experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=2", "data.max_eval_tokens=512",
        "logger=none", "callbacks=none", "trainer.enable_model_summary=false"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    setup = validate(train_config([f"experiment={experiment}"], tmp_path / "run"))
    assert setup.model.model.n_layers >= 1 and setup.optim.lr > 0


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_validates_with_every_model(preset, tmp_path):
    for model in ("tiny", "exp10"):
        setup = validate(train_config([f"attention={preset}", f"model={model}"], tmp_path / "run"))
        assert len(setup.model.attention) == setup.model.model.n_layers


@pytest.mark.parametrize("override,message", [
    ("model.n_heads=5", "model.n_heads=5: must divide model.d_model; allowed: divisors of model.d_model=64"),
    ("attention=gqa attention.n_kv_heads=3", "attention.n_kv_heads=3: must divide model.n_heads"),
    ("+attention.window=4", "attention.window=4: unknown option for attention"),
    ("data.variant=raw3", "data.variant='raw3'; allowed: 'raw' | 'v1'"),
    ("optim.lr=-1", "optim.lr=-1.0; allowed: a number > 0"),
    ("data.block_size=128", "data.block_size=128: windows longer than the model's context; allowed: at most model.max_seq_len=64"),
    ("matmul_precision=low", "matmul_precision='low'; allowed: highest | high | medium"),
    ("eval.lengths=[128,0]", "eval.lengths=[128, 0]; allowed: a list of distinct integers >= 1"),
])
def test_invalid_config_fails_at_start_with_a_clear_error(override, message, tmp_path):
    cfg = train_config(["experiment=smoke", *override.split()], tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        run_job(cfg)
    assert message in str(error.value)
    # nothing was loaded or trained; the run directory records the failure
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["status"] == "failed" and message in failed["error"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_trains_and_records_its_run(preset, tmp_path):
    run_job(train_config([*FAST, f"attention={preset}"], tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 4
    assert metrics["attention_preset"] == preset
    assert len(metrics["val_curve"]) == 2 and metrics["test_loss"] > 0
    assert metrics["final_val_loss"] == metrics["val_curve"][-1]["loss"]
    assert metrics["train_steps"] == [p["step"] for p in metrics["train_curve"]]
