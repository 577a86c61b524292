"""Multirun sweeps through ``train.py -m``, the comparison report, parameter matching, Optuna."""

from __future__ import annotations

import json
import math

import pytest

from attnlab.attention import preset_names
from attnlab.report import aggregate, find_jobs, pareto_front, write_report
from tests.conftest import run_train

SWEEP = ["-m", "experiment=smoke", "attention=mha,mqa,gqa_2,broken", "seed=0,1", "trainer.max_steps=4",
         "trainer.val_check_interval=2", "data.max_eval_tokens=512", "callbacks=none", "logger=csv",
         "hydra.searchpath=[file://tests/configs]"]


def test_multirun_report_with_a_failing_job_and_resume(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path)
    report = json.loads((sweep / "comprehensive_results.json").read_text())
    # three mechanisms x two seeds completed, ranked, aggregated over seeds
    assert sorted(report["ranking"]) == ["gqa_2", "mha", "mqa"]
    for label in report["ranking"]:
        group = report["groups"][label]
        assert group["n"] == 2 and group["seeds"] == [0, 1]
        values = group["final_val_loss"]["values"]
        assert group["final_val_loss"]["mean"] == pytest.approx(sum(values) / 2)
        assert group["final_val_loss"]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    # the deliberately broken job is reported as failed with its error; the others are intact
    assert report["groups"]["broken"]["n"] == 0 and report["groups"]["broken"]["n_failed"] == 2
    assert {f["label"] for f in report["failed"]} == {"broken"}
    assert all("attention.n_kv_heads=3" in f["error"] for f in report["failed"])
    table = (sweep / "results.md").read_text()
    assert table.count("| 2 |") >= 3 and "Failed or incomplete jobs (2)" in table
    assert (sweep / "comparison.png").stat().st_size > 10_000
    assert "job failed (the sweep continues)" in proc.stdout + proc.stderr

    # re-running the same sweep with resume_sweep skips the finished jobs
    done = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json") if "broken" not in str(p)}
    proc = run_train([*SWEEP, f"hydra.sweep.dir={sweep}", "+resume_sweep=true"], tmp_path)
    assert (proc.stdout + proc.stderr).count("already completed, skipping") == 6
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())


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


def _fake_run(root, name, preset, seed, loss, kv, tps):
    job = root / name
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({
        "status": "completed", "attention_preset": preset, "seed": seed, "overrides": [f"attention={preset}", f"seed={seed}"],
        "final_val_loss": loss, "final_val_ppl": math.exp(loss), "test_loss": loss + 0.01,
        "train_tokens_per_sec": tps, "kv_cache_bytes_per_token": kv, "params": {"total": 10, "non_embedding": 5},
        "val_curve": [{"step": 10, "loss": loss + 1}, {"step": 20, "loss": loss}], "train_curve": []}))


def test_report_combines_sweeps_and_marks_pareto_front(tmp_path):
    _fake_run(tmp_path / "a", "0", "mha", 0, 3.0, 4096, 1000)
    _fake_run(tmp_path / "a", "1", "mqa", 0, 3.2, 1024, 1500)
    _fake_run(tmp_path / "b", "0", "mha", 1, 3.2, 4096, 1100)
    _fake_run(tmp_path / "b", "1", "identity", 1, 4.0, 0, 3000)
    (tmp_path / "b" / "2" / ".hydra").mkdir(parents=True)  # a job killed before writing anything
    result = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert result["ranking"] == ["mha", "mqa", "identity"]
    assert result["groups"]["mha"]["n"] == 2 and result["groups"]["mha"]["final_val_loss"]["mean"] == pytest.approx(3.1)
    assert [f["status"] for f in result["failed"]] == ["incomplete"]
    assert (tmp_path / "out" / "comparison.png").exists() and (tmp_path / "out" / "results.md").exists()


def test_report_prints_reference_figures_beside_ours(tmp_path):
    """experiment=moas_compare stores the study's losses in the config; the table shows them."""
    for name, preset, loss in (("0", "mha", 2.31), ("1", "moas", 2.30)):
        _fake_run(tmp_path, name, preset, 0, loss, 1, 1)
        (tmp_path / name / "config.json").write_text(json.dumps({"report_reference": {"mha": 2.294, "moas": 2.307}}))
    write_report([tmp_path])
    table = (tmp_path / "results.md").read_text()
    assert "study val loss" in table and "| 2.294 |" in table and "| 2.307 |" in table


def test_pareto_front():
    points = [(4096, 3.0), (1024, 3.2), (0, 4.0), (2048, 3.3)]  # (KV bytes, loss)
    assert sorted(pareto_front(points)) == [0, 1, 2]
    throughput = [(1000, 3.0), (1500, 3.2), (3000, 4.0), (900, 3.1)]
    assert sorted(pareto_front(throughput, maximize_x=True)) == [0, 1, 2]


def test_aggregate_single_seed_has_zero_std(tmp_path):
    _fake_run(tmp_path, "0", "mha", 0, 3.0, 1, 1)
    groups = aggregate(find_jobs([tmp_path]))
    assert groups["mha"]["final_val_loss"] == {"mean": 3.0, "std": 0.0, "values": [3.0]}


@pytest.mark.parametrize("preset", preset_names())
def test_parameter_matching_within_two_percent_on_exp10(preset):
    from attnlab.attention import resolve_layer_attention
    from attnlab.config import ModelConfig
    from attnlab.train import match_parameters

    model = ModelConfig(n_layers=4, d_model=128, n_heads=4, d_ff=512, max_seq_len=1024, match_params="mha")
    matching = match_parameters(model, resolve_layer_attention(preset, model), "mha")
    assert abs(matching["relative_diff"]) <= 0.02, matching
    assert matching["reference_params"] == 1_049_728 - 4 * 0 + 0  # exp10 MHA without embeddings


def test_parameter_matching_through_train(tmp_path):
    run_train(["experiment=smoke", "attention=identity", "model.match_params=mha", "trainer.max_steps=2",
               "trainer.val_check_interval=2", "data.max_eval_tokens=256", "logger=none", "callbacks=none"], tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    matching = metrics["param_matching"]
    assert matching["d_ff"] > 128 and abs(matching["relative_diff"]) <= 0.02
    assert metrics["params"]["non_embedding"] == matching["params"]


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


def test_report_logs_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _fake_run(tmp_path / "s", "0", "mha", 0, 3.0, 1, 1)
    write_report([tmp_path / "s"], tmp_path / "s", wandb={"project": "attnlab", "group": "test-sweep"})
    assert list((tmp_path / "s" / "wandb").glob("offline-run-*"))
