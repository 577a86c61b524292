"""``train.py`` end to end, run the way users run it (subprocesses, Hydra overrides)."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.attention import preset_names
from tests.conftest import SHARED_DATA, has_gpt2_ranks, has_shared_data, run_train

FAST = ["experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=2", "data.max_eval_tokens=512",
        "logger=none", "callbacks=none", "trainer.enable_model_summary=false"]


def read_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("preset", preset_names())
def test_every_attention_config_trains(preset, tmp_path):
    run_train([*FAST, f"attention={preset}"], tmp_path)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["steps"] == 4
    assert metrics["attention_preset"] == preset
    assert len(metrics["val_curve"]) == 2 and metrics["test_loss"] > 0
    assert metrics["final_val_loss"] == metrics["val_curve"][-1]["loss"]


def test_run_directory_contents(tmp_path):
    run_train(["experiment=smoke", "trainer.max_steps=6", "trainer.val_check_interval=3", "data.max_eval_tokens=512",
               "attention=gqa_2"], tmp_path)
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").is_file()
    assert json.loads((run / "config.json").read_text())["attention"] == {"name": "gqa", "n_kv_heads": 2}
    assert {"last.ckpt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert any(p.name.startswith("best-step") for p in (run / "checkpoints").iterdir())
    csv = (run / "csv" / "metrics.csv").read_text()
    assert "val/loss" in csv and "train/loss" in csv and "lr-AdamW" in csv
    m = read_metrics(run)
    for key in ("final_val_loss", "final_val_ppl", "test_loss", "test_ppl", "params", "train_tokens_per_sec",
                "peak_rss_mb", "wall_time_s", "val_curve", "train_curve", "kv_cache_bytes_per_token"):
        assert m[key] is not None, key
    assert set(m["params"]) >= {"total", "attention", "feed_forward", "embeddings"}
    assert abs(m["final_val_ppl"] - torch.tensor(m["final_val_loss"]).exp().item()) < 1e-3
    assert [p["step"] for p in m["val_curve"]] == [3, 6]
    # the test split is evaluated with the best checkpoint
    assert m["test_checkpoint"].startswith("best-step")


def _final_weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt


def test_interrupted_run_resumes_exactly(tmp_path):
    """Stop at step 5, resume from last.ckpt: same final weights as an uninterrupted run (dropout on,
    so the RNG state must be restored too)."""
    common = ["experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=5", "data.max_eval_tokens=256",
              "model.dropout=0.1", "logger=none"]
    run_train([*common, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    run_train([*common, f"hydra.run.dir={tmp_path / 'part'}", "+callbacks.stop._target_=tests.helpers.StopAtStep",
               "+callbacks.stop.step=5"], tmp_path)
    part, part_ckpt = _final_weights(tmp_path / "part")
    assert part_ckpt["global_step"] == 5
    run_train([*common, f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
              tmp_path)
    full, _ = _final_weights(tmp_path / "full")
    resumed, resumed_ckpt = _final_weights(tmp_path / "resumed")
    assert resumed_ckpt["global_step"] == 10
    assert not all(torch.equal(part[k], full[k]) for k in full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # the resumed run reports the whole validation curve
    assert [p["step"] for p in read_metrics(tmp_path / "resumed")["val_curve"]] == [5, 10]


def test_ddp_two_cpu_processes(tmp_path):
    run_train(["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
               "trainer.max_steps=4", "trainer.val_check_interval=2", "data.max_eval_tokens=512", "logger=csv"], tmp_path,
              timeout=300)
    m = read_metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["steps"] == 4 and m["test_loss"] > 0


def test_wandb_offline_writes_a_run(tmp_path):
    run_train([*FAST, "logger=wandb"], tmp_path, env={"WANDB_API_KEY": "", "WANDB_MODE": ""})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].glob("*.wandb"))


def test_tensorboard_logger_writes_events(tmp_path):
    run_train([*FAST, "logger=tensorboard"], tmp_path)
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def test_debug_trainer_runs_one_batch(tmp_path):
    run_train(["experiment=smoke", "trainer=debug", "logger=none"], tmp_path)


@pytest.mark.parametrize("override,message", [
    ("model.n_heads=5", "model.n_heads=5: must divide model.d_model; allowed: divisors of model.d_model=64"),
    ("attention=gqa attention.n_kv_heads=3", "attention.n_kv_heads=3: must divide model.n_heads"),
    ("+attention.window=4", "attention.window=4: unknown option for attention"),
    ("data.variant=raw3", "data.variant='raw3'; allowed: 'raw' | 'v1'"),
    ("optim.lr=-1", "optim.lr=-1.0; allowed: a number > 0"),
    ("data.block_size=128", "data.block_size=128: windows longer than the model's context; allowed: at most model.max_seq_len=64"),
    ("matmul_precision=low", "matmul_precision='low'; allowed: highest | high | medium"),
])
def test_invalid_config_fails_at_start_with_a_clear_error(override, message, tmp_path):
    proc = run_train(["experiment=smoke", *override.split()], tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    # nothing was loaded or trained; the run directory records the failure
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["status"] == "failed" and message in failed["error"]


def test_missing_data_fails_with_what_to_set(tmp_path):
    proc = run_train(["experiment=smoke", "data=wikitext2", "data.tokenizer=char", f"paths.data_dir={tmp_path / 'nothing'}"],
                     tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert "ATTNLAB_DATA_DIR" in proc.stderr and "wikitext-2-raw" in proc.stderr


def test_help_lists_groups_and_cfg_prints_config(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for group in ("attention:", "model:", "data:", "trainer:", "logger:", "callbacks:", "optim:", "experiment:"):
        assert group in out
    assert "gqa_2" in out and "exp10" in out
    cfg = subprocess.run([sys.executable, "train.py", "attention=mqa", "--cfg", "job"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "name: mqa" in cfg and "d_model: 128" in cfg


@pytest.mark.skipif(not (has_shared_data() and has_gpt2_ranks()), reason="real WikiText-2 files not present")
def test_real_wikitext2_offline_with_gpt2(tmp_path):
    run_train(["data.variant=v1", "model=exp10", "trainer.max_steps=2", "trainer.val_check_interval=2",
               "data.max_eval_tokens=4096", "logger=none", "callbacks=none", "optim.warmup_steps=1"],
              tmp_path, env={"ATTNLAB_DATA_DIR": str(SHARED_DATA)})
    m = read_metrics(tmp_path / "run")
    assert m["params"]["embeddings"] == 50257 * 128
    assert 9.0 < m["final_val_loss"] < 11.5  # ~ln(50257) = 10.8 after two steps
