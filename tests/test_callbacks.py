"""Router statistics and routing analysis: logged keys in short runs, and the analysis itself."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from attnlab.callbacks import RoutingAnalysis, per_layer_matrices
from tests.conftest import run_train

RUN = ["experiment=smoke", "trainer.max_steps=6", "trainer.val_check_interval=6", "data.max_eval_tokens=1024",
       "callbacks.router_stats.every_n_steps=2", "callbacks.routing_analysis.max_tokens=1024"]


def logged_keys(run_dir) -> set[str]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {k for row in rows for k, v in row.items() if v not in ("", None)}


@pytest.mark.slow
def test_moas_statistics_reach_csv_and_wandb_and_routing_analysis_is_written(tmp_path):
    run_train([*RUN, "attention=moas", "logger=many"], tmp_path)
    run = tmp_path / "run"
    keys = logged_keys(run)
    for layer in (0, 1):
        for scheme in ("mha", "gqa", "mqa"):
            assert f"router/layer{layer}/gate_mean/{scheme}" in keys
            assert f"router/layer{layer}/top1_share/{scheme}" in keys
        assert f"router/layer{layer}/gate_entropy" in keys
        assert f"router/layer{layer}/aux/load_balance" in keys
    assert "train/aux/load_balance" in keys
    # W&B (offline): the per-layer heatmap images and the routing analysis table
    media = next((run / "wandb").glob("offline-run-*")) / "files" / "media"
    assert list((media / "images" / "router_heatmap").glob("gate_mean_*.png"))
    assert list((media / "table" / "routing_analysis").glob("*.table.json"))
    analysis = json.loads((run / "routing_analysis.json").read_text())
    assert set(analysis["layers"]) == {"layer0/gates", "layer1/gates"}
    layer = analysis["layers"]["layer0/gates"]
    assert layer["labels"] == ["mha", "gqa", "mqa"]
    assert sum(layer["mean_gate"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (run / "routing_analysis.png").stat().st_size > 5000
    assert "| bucket |" in (run / "routing_analysis.md").read_text()


@pytest.mark.slow
def test_moh_statistics(tmp_path):
    run_train([*RUN, "attention=moh", "logger=csv"], tmp_path)
    keys = logged_keys(tmp_path / "run")
    for j in range(6):
        assert f"router/layer0/head_frequency/{j}" in keys
    for name in ("routing_entropy", "shared_weight", "routed_weight", "aux/load_balance"):
        assert f"router/layer1/{name}" in keys
    analysis = json.loads((tmp_path / "run" / "routing_analysis.json").read_text())
    # exactly top_k = 4 routed heads active per token
    assert sum(analysis["layers"]["layer0/head_active"]["mean_gate"].values()) == pytest.approx(4.0)


@pytest.mark.slow
def test_no_statistics_for_unrouted_mechanisms(tmp_path):
    run_train([*RUN, "attention=gqa", "logger=csv"], tmp_path)
    assert not any(k.startswith("router/") for k in logged_keys(tmp_path / "run"))
    assert not (tmp_path / "run" / "routing_analysis.json").exists()


def test_routing_analysis_relates_gates_to_token_frequency(tmp_path):
    # token 0 is common in training and routed to scheme "b"; tokens 1..9 are rare and prefer "a"
    train = np.array([0] * 1000 + list(range(1, 10)) * 2)
    ids = np.array([0, 1, 2, 3, 0, 4, 5, 0, 6, 7, 0, 8] * 10)
    gates = np.where(ids[:, None] == 0, [0.1, 0.9], [0.8, 0.2])
    analysis = RoutingAnalysis(str(tmp_path), n_buckets=2, top_tokens=2, min_count=5)
    result = analysis.analyse(ids, {"layer0/gates": gates}, train, {"layer0/gates": ["a", "b"]}, lambda t: f"t{t[0]}")
    layer = result["layers"]["layer0/gates"]
    rare, common = layer["by_frequency"]
    assert rare["mean_gate"]["a"] == pytest.approx(0.8) and common["mean_gate"]["b"] == pytest.approx(0.9)
    assert rare["train_freq_range"] == [2, 2] and common["train_freq_range"] == [1000, 1000]
    assert layer["top_tokens"]["b"][0]["token"] == "t0"
    assert all(t["token"] != "t0" for t in layer["top_tokens"]["a"])
    analysis.write(result)
    assert (tmp_path / "routing_analysis.png").exists() and "t0" in (tmp_path / "routing_analysis.md").read_text()


def test_per_layer_matrices_group_scalars_into_heatmaps():
    stats = {"layer0/gate_mean/mha": torch.tensor(0.5), "layer0/gate_mean/mqa": torch.tensor(0.5),
             "layer1/gate_mean/mha": torch.tensor(0.2), "layer1/gate_mean/mqa": torch.tensor(0.8),
             "layer0/gate_entropy": torch.tensor(1.0)}
    matrix, rows, cols = per_layer_matrices(stats)["gate_mean"]
    assert rows == ["layer0", "layer1"] and cols == ["mha", "mqa"]
    np.testing.assert_allclose(matrix, [[0.5, 0.5], [0.2, 0.8]])
