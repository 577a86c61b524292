"""Multirun sweeps through ``train.py -m`` (the report at their end; the report itself is tested on
hand-made sweeps in tests/test_report.py), parameter matching, Optuna."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_train

SWEEP = ["-m", "experiment=smoke", "attention=mha,mqa,gqa_2,broken", "seed=0,1", "trainer.max_steps=4",
         "trainer.val_check_interval=2", "data.max_eval_tokens=512", "callbacks=none", "logger=csv",
         "report.reference=mqa", "hydra.searchpath=[file://tests/configs]"]


@pytest.mark.slow
def test_multirun_report_with_a_failing_job_and_resume(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path)
    summary = json.loads((sweep / "report.json").read_text())
    configurations = json.loads((sweep / "comprehensive_results.json").read_text())
    # three mechanisms x two seeds completed, ranked, aggregated over seeds
    assert sorted(summary["ranking"]) == sorted(configurations) == ["gqa_2", "mha", "mqa"]
    for label in summary["ranking"]:
        group = configurations[label]
        assert group["n"] == 2 and group["seeds"] == [0, 1]
        stat = group["statistics"]["final_val_loss"]
        assert stat["mean"] == pytest.approx(sum(stat["values"]) / 2) == pytest.approx(group["final_loss"])
        assert stat["std"] == pytest.approx(abs(stat["values"][0] - stat["values"][1]) / math.sqrt(2))
    # report.reference from the command line reaches the callback; the same seeds pair
    assert summary["reference"] == "mqa"
    assert configurations["mha"]["comparisons"]["final_val_loss"]["test"] == "paired t-test"
    # the deliberately broken job is reported as failed with its error; the others are intact
    assert "broken" not in configurations and {f["label"] for f in summary["failed"]} == {"broken"}
    assert all("attention.n_kv_heads=3" in f["error"] for f in summary["failed"])
    table = (sweep / "results.md").read_text()
    assert "vs `mqa`" in table and "Failed or incomplete jobs (2)" in table
    assert (sweep / "comparison.png").stat().st_size > 10_000
    view = json.loads((sweep / "results" / "mha" / "metrics.json").read_text())
    assert view["n"] == 2 and len(view["train_steps"]) == len(view["train_loss"]) > 0
    assert "job failed (the sweep continues)" in proc.stdout + proc.stderr

    # re-running the same sweep with resume_sweep skips the finished jobs
    done = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json") if "broken" not in str(p)}
    proc = run_train([*SWEEP, f"hydra.sweep.dir={sweep}", "+resume_sweep=true"], tmp_path)
    assert (proc.stdout + proc.stderr).count("already completed, skipping") == 6
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())


@pytest.mark.slow
def test_resume_sweep_continues_a_killed_job_from_its_checkpoint(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=smoke", "attention=mqa", "trainer.max_steps=6", "trainer.val_check_interval=3",
            "data.max_eval_tokens=256", "logger=none", f"hydra.sweep.dir={sweep}"]
    # the first attempt stops after 3 steps, leaving last.ckpt and no completed metrics (as a kill would)
    run_train([*args, "+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=3"], tmp_path)
    job = next(sweep.glob("0_*"))
    (job / "metrics.json").unlink()
    proc = run_train([*args, "+resume_sweep=true"], tmp_path)
    assert "resuming" in proc.stdout + proc.stderr
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 6


@pytest.mark.slow
def test_parameter_matching_through_train(tmp_path):
    run_train(["experiment=smoke", "attention=identity", "model.match_params=mha", "trainer.max_steps=2",
               "trainer.val_check_interval=2", "data.max_eval_tokens=256", "logger=none", "callbacks=none"], tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    matching = metrics["param_matching"]
    assert matching["d_ff"] > 128 and abs(matching["relative_diff"]) <= 0.02
    assert metrics["params"]["non_embedding"] == matching["params"]


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path):
    sweep = tmp_path / "optuna"
    run_train(["hparams_search=lr", "experiment=smoke", "hydra.sweeper.n_trials=2", "trainer.max_steps=3",
               "trainer.val_check_interval=3", "data.max_eval_tokens=256", "logger=none", "callbacks=none",
               f"hydra.sweep.dir={sweep}"], tmp_path)
    optimization = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in optimization and "optim.lr" in optimization
    trials = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)
    lrs = {next(o for o in t["overrides"] if o.startswith("optim.lr=")) for t in trials}
    assert len(lrs) == 2


def test_run_group_names_the_sweep(monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from attnlab.resolvers import run_group

    assert run_group("ablation") == "ablation"  # no Hydra: a single run
    cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": "outputs/ablation/multiruns/2026-01-01_00-00-00"}}})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: cfg.hydra))
    assert run_group("ablation") == "ablation-2026-01-01_00-00-00"
