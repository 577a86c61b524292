"""``train.py`` end to end, run the way users run it (subprocesses, Hydra overrides)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import SHARED_DATA, has_gpt2_ranks, has_shared_data, run_train

FAST = ["experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=2", "data.max_eval_tokens=512",
        "logger=none", "callbacks=none", "trainer.enable_model_summary=false"]


def read_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
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
    for key in ("final_val_loss", "final_val_ppl", "final_val_acc", "best_val_acc", "test_loss", "test_ppl", "test_acc",
                "params", "train_tokens_per_sec", "peak_rss_mb", "wall_time_s", "val_curve", "train_curve",
                "kv_cache_bytes_per_token", "val_loss_by_position", "test_loss_by_position"):
        assert m[key] is not None, key
    assert m["status"] == "completed" and m["diverged_at_step"] is None and m["eval_lengths"] == {}
    assert set(m["params"]) >= {"total", "attention", "feed_forward", "embeddings"}
    assert abs(m["final_val_ppl"] - torch.tensor(m["final_val_loss"]).exp().item()) < 1e-3
    assert [p["step"] for p in m["val_curve"]] == [3, 6]
    assert m["final_val_acc"] == m["val_curve"][-1]["acc"] and 0 < m["final_val_acc"] < 1
    assert m["best_val_acc"] == max(p["acc"] for p in m["val_curve"])
    assert m["train_steps"] == [p["step"] for p in m["train_curve"]] and m["train_loss"] == [p["loss"] for p in m["train_curve"]]
    # loss by position: the buckets of the 64-token window add up to the split's loss
    by_position = m["val_loss_by_position"]
    assert by_position["positions"][-1] == [64, 64] and sum(by_position["n_tokens"]) == 511
    total = sum(loss * n for loss, n in zip(by_position["loss"], by_position["n_tokens"]))
    assert abs(total / 511 - m["final_val_loss"]) < 1e-6
    # the test split is evaluated with the best checkpoint
    assert m["test_checkpoint"].startswith("best-step")
    assert "val/acc" in csv and "test/acc" in csv


def _final_weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt


def test_interrupted_run_resumes_exactly(tmp_path):
    """Stop at step 5, resume from last.ckpt (in-process, as train.py runs it): the optimizer state
    and the data position it saved are restored, and the final weights are those of an
    uninterrupted run (dropout on, so the RNG state must be restored too)."""
    from attnlab.train import run_job
    from tests.helpers import train_config

    common = ["experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=5", "data.max_eval_tokens=256",
              "model.dropout=0.1", "logger=none"]
    record = "+callbacks.record._target_=tests.helpers.RecordTraining"
    run_job(train_config([*common, record, f"+callbacks.record.path={tmp_path / 'full.pt'}"], tmp_path / "full"))
    run_job(train_config([*common, "+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=5"],
                         tmp_path / "part"))
    part, part_ckpt = _final_weights(tmp_path / "part")
    assert part_ckpt["global_step"] == 5
    resume = f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"
    run_job(train_config([*common, resume, record, f"+callbacks.record.path={tmp_path / 'resumed.pt'}"],
                         tmp_path / "resumed"))
    full_record, resumed_record = (torch.load(tmp_path / f"{name}.pt", weights_only=False) for name in ("full", "resumed"))
    # the optimizer state it saved
    saved, restored = part_ckpt["optimizer_states"][0]["state"], resumed_record["optimizer_at_start"]["state"]
    assert saved.keys() == restored.keys() and len(saved) > 0
    for index in saved:
        for name, value in saved[index].items():
            assert torch.equal(value, restored[index][name]), (index, name)
    # the data position: steps 6-10 see the batches of the uninterrupted run
    assert sorted(resumed_record["batches"]) == [6, 7, 8, 9, 10]
    for step, batch in resumed_record["batches"].items():
        assert torch.equal(batch, full_record["batches"][step]), step
    full, _ = _final_weights(tmp_path / "full")
    resumed, resumed_ckpt = _final_weights(tmp_path / "resumed")
    assert resumed_ckpt["global_step"] == 10
    assert not all(torch.equal(part[k], full[k]) for k in full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # the resumed run reports the whole validation curve
    assert [p["step"] for p in read_metrics(tmp_path / "resumed")["val_curve"]] == [5, 10]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run_train(["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
               "trainer.max_steps=4", "trainer.val_check_interval=2", "data.max_eval_tokens=512", "logger=csv"], tmp_path,
              timeout=300)
    m = read_metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["steps"] == 4 and m["test_loss"] > 0
    # the ranks' shares are summed: every target of the 512 evaluated tokens counted once
    assert sum(m["val_loss_by_position"]["n_tokens"]) == 511 and m["test_acc"] is not None


@pytest.mark.slow
def test_wandb_offline_writes_a_run(tmp_path):
    run_train([*FAST, "logger=wandb"], tmp_path, env={"WANDB_API_KEY": "", "WANDB_MODE": ""})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_tensorboard_logger_writes_events(tmp_path):
    run_train([*FAST, "logger=tensorboard"], tmp_path)
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def test_debug_trainer_runs_one_batch_of_each_split(tmp_path):
    from attnlab.train import run_job
    from tests.helpers import train_config

    run_job(train_config(["experiment=smoke", "trainer=debug", "logger=none"], tmp_path / "run"))
    m = read_metrics(tmp_path / "run")
    assert m["status"] == "completed" and m["steps"] == 1
    assert m["test_loss"] is not None and m["test_checkpoint"] == "final weights"
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # fast_dev_run writes none


@pytest.mark.slow
def test_unreadable_ckpt_path_fails_at_start(tmp_path):
    notes = tmp_path / "last.ckpt"
    notes.write_text("this is not a checkpoint\n")
    proc = run_train(["experiment=smoke", f"ckpt_path={notes}"], tmp_path, check=False, timeout=120)
    message = f"ckpt_path='{notes}': not a PyTorch checkpoint"
    # bad input: one line on stderr, exit status 2, no traceback
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # before any data was loaded
    assert message in json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    # HYDRA_FULL_ERROR=1 shows where it came from
    proc = run_train(["experiment=smoke", f"ckpt_path={notes}"], tmp_path, check=False, timeout=120,
                     env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and message in proc.stderr


@pytest.mark.slow
def test_divergence_is_a_result_and_the_sweep_goes_on(tmp_path):
    """A NaN loss stops its run within a few steps, keeps the finite checkpoints, tests the best
    one and reports status diverged; the next job of the sweep runs and completes."""
    from attnlab.lit_module import DIVERGENCE_CHECK_EVERY

    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "experiment=smoke", "optim.lr=1000,3e-3", "optim.grad_clip=null", "optim.warmup_steps=0",
                      "trainer.max_steps=24", "trainer.val_check_interval=4", "data.max_eval_tokens=256",
                      "eval.lengths=[128]", "logger=none", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert (proc.stdout + proc.stderr).count("training diverged") == 1
    diverged, ok = (read_metrics(job) for job in sorted(sweep.glob("[0-9]_*")))
    assert ok["status"] == "completed" and ok["steps"] == 24 and ok["eval_lengths"]["128"]["status"] == "ok"

    step = diverged["diverged_at_step"]
    assert diverged["status"] == "diverged" and 4 < step < 24
    assert step <= diverged["steps"] <= step + DIVERGENCE_CHECK_EVERY
    assert diverged["final_val_loss"] is None and diverged["val_loss_by_position"] is None
    assert diverged["val_curve"] and all(p["step"] < step for p in diverged["val_curve"])
    assert diverged["best_val_loss"] == min(p["loss"] for p in diverged["val_curve"])
    # the checkpoints are the finite ones from before the divergence, and the best one was tested
    for path in (next(sweep.glob("0_*")) / "checkpoints").iterdir():
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["global_step"] < step and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert diverged["test_checkpoint"].startswith("best-step") and diverged["test_skipped"] is None
    assert diverged["test_loss"] is not None and diverged["test_loss"] < 10
    assert diverged["eval_lengths"]["128"] == {"status": "not_applicable",
                                               "reason": f"the run diverged at step {step}: the final weights are not finite"}
    # the multirun's report lists the diverged job apart and ranks only the completed one
    report = json.loads((sweep / "report.json").read_text())
    assert report["ranking"] == ["mha optim.lr=0.003"]
    assert [(d["label"], d["diverged_at_step"]) for d in report["diverged"]] == [("mha optim.lr=1000", step)]
    assert "## Diverged runs" in (sweep / "results.md").read_text()


def test_resume_sweep_skips_finished_and_diverged_jobs(tmp_path):
    from omegaconf import OmegaConf

    from attnlab.io import write_json
    from attnlab.train import run_job

    cfg = OmegaConf.create({"resume_sweep": True, "paths": {"output_dir": str(tmp_path)},
                            "optimized_metric": "final_val_loss"})
    # both return without running (a run would need the whole config); a diverged run's objective is NaN
    write_json(tmp_path / "metrics.json", {"status": "completed", "final_val_loss": 2.5})
    assert run_job(cfg) == 2.5
    write_json(tmp_path / "metrics.json", {"status": "diverged", "final_val_loss": None})
    assert math.isnan(run_job(cfg))


@pytest.mark.slow
def test_missing_data_fails_with_what_to_set(tmp_path):
    proc = run_train(["experiment=smoke", "data=wikitext2", "data.tokenizer=char", f"paths.data_dir={tmp_path / 'nothing'}"],
                     tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ATTNLAB_DATA_DIR" in proc.stderr and "wikitext-2-raw" in proc.stderr


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.skipif(not (has_shared_data() and has_gpt2_ranks()), reason="real WikiText-2 files not present")
def test_real_wikitext2_offline_with_gpt2(tmp_path):
    run_train(["data.variant=v1", "model=exp10", "trainer.max_steps=2", "trainer.val_check_interval=2",
               "data.max_eval_tokens=4096", "logger=none", "callbacks=none", "optim.warmup_steps=1"],
              tmp_path, env={"ATTNLAB_DATA_DIR": str(SHARED_DATA)})
    m = read_metrics(tmp_path / "run")
    assert m["params"]["embeddings"] == 50257 * 128
    assert 9.0 < m["final_val_loss"] < 11.5  # ~ln(50257) = 10.8 after two steps
