"""The comparison report on hand-made sweeps (metrics.json files as train.py writes them): the
statistics against scipy, the marks in results.md, diverged runs, the new metrics' tables and
figures, the exp10 results/ view read by the exp10 ablation's own snippets, the CLI and the callback."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from attnlab.config import ConfigError
from attnlab.plots import pareto_front
from attnlab.report import VIEW_KIND, ReportOnMultirunEnd, aggregate, find_jobs, folder_name, write_report

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = Path(__file__).parent / "exp10_snippets"


def by_position(base: float, length: int = 16) -> dict:
    """The schema's loss-by-position record for a window of ``length`` tokens: loss falls with context."""
    positions, lo = [], 1
    while lo <= length:
        positions.append([lo, min(2 * lo - 1, length)])
        lo *= 2
    return {"positions": positions, "loss": [base + 1.0 / p[0] for p in positions],
            "acc": [0.1 * i for i in range(len(positions))], "n_tokens": [p[1] - p[0] + 1 for p in positions]}


def fake_run(root: Path, name: str, preset: str, seed: int, loss: float | None, *, status: str = "completed",
             settings: tuple[str, ...] = (), kv: float = 4096, tps: float = 1000.0, new_fields: bool = True,
             acc: float | None = None, config: dict | None = None, **extra) -> Path:
    """One job directory with the metrics.json of a run; ``new_fields=False`` writes what runs wrote
    before accuracy, loss by position, evaluation lengths and the exp10 curve layout existed."""
    job = root / name
    job.mkdir(parents=True)
    train = [{"step": s, "loss": (loss or 3.0) + 2.0 / s + 0.01 * seed} for s in (1, 2, 4)]
    metrics = {
        "status": status, "attention_preset": preset, "seed": seed,
        "overrides": [f"attention={preset}", f"seed={seed}", *settings],
        "final_val_loss": loss, "final_val_ppl": math.exp(loss) if loss is not None else None,
        "best_val_loss": loss, "test_loss": loss + 0.01 if loss is not None else None,
        "test_ppl": math.exp(loss + 0.01) if loss is not None else None,
        "train_tokens_per_sec": tps + seed, "wall_time_s": 10.0 + seed, "peak_rss_mb": 500.0 + seed,
        "kv_cache_bytes_per_token": kv, "params": {"total": 10, "non_embedding": 5},
        "val_curve": [{"step": 2, "loss": (loss or 3.0) + 1}, {"step": 4, "loss": loss}],
        "train_curve": train,
    }
    if new_fields:
        metrics.update({
            "diverged_at_step": None, "train_steps": [p["step"] for p in train],
            "train_loss": [p["loss"] for p in train],
            "final_val_acc": acc, "best_val_acc": acc, "test_acc": acc - 0.01 if acc is not None else None,
            "val_loss_by_position": by_position(loss) if loss is not None else None,
            "eval_lengths": {}})
    metrics.update(extra)
    (job / "metrics.json").write_text(json.dumps(metrics))
    (job / "config.json").write_text(json.dumps(config or {"seed": seed, "attention": {"name": preset}}))
    return job


def seeds_sweep(root: Path, losses: dict[str, list[float]], **kwargs) -> None:
    for i, (preset, values) in enumerate(losses.items()):
        for seed, loss in enumerate(values):
            fake_run(root, f"{i}_{preset}_seed{seed}", preset, seed, loss, **kwargs)


REAL_AND_NOISE = {"mha": [3.00, 3.05, 2.98], "identity": [3.60, 3.62, 3.58], "mqa": [3.02, 2.97, 3.03]}


def test_a_real_difference_and_noise_are_told_apart(tmp_path):
    seeds_sweep(tmp_path, REAL_AND_NOISE)
    report = write_report([tmp_path])
    groups = report.configurations
    assert report.summary["ranking"] == ["mqa", "mha", "identity"]  # mqa ranks first, within noise of mha
    # statistics of every configuration against numpy/scipy on the same numbers
    for preset, values in REAL_AND_NOISE.items():
        s = groups[preset]["statistics"]["final_val_loss"]
        ci = sps.t.interval(0.95, 2, loc=np.mean(values), scale=sps.sem(values))
        assert s["n"] == 3 and s["mean"] == pytest.approx(np.mean(values))
        assert s["std"] == pytest.approx(np.std(values, ddof=1)) and s["ci95"] == pytest.approx(list(ci))
        assert groups[preset]["final_loss"] == pytest.approx(np.mean(values))
        assert groups[preset]["final_perplexity"] == pytest.approx(np.mean(np.exp(values)))
    # same seeds: paired tests; two comparisons: Benjamini-Hochberg, verdicts on the adjusted values
    raw = {p: sps.ttest_rel(REAL_AND_NOISE[p], REAL_AND_NOISE["mha"]).pvalue for p in ("identity", "mqa")}
    adjusted = dict(zip(raw, sps.false_discovery_control(list(raw.values()))))
    for preset in ("identity", "mqa"):
        c = groups[preset]["comparisons"]["final_val_loss"]
        assert c["test"] == "paired t-test" and c["paired_seeds"] == [0, 1, 2]
        assert c["p_value"] == pytest.approx(raw[preset]) and c["p_adjusted"] == pytest.approx(adjusted[preset])
    assert groups["identity"]["comparisons"]["final_val_loss"]["verdict"] == "worse"
    assert groups["mqa"]["comparisons"]["final_val_loss"]["verdict"] == "within noise"
    assert groups["mha"]["comparisons"] == {} and report.summary["p_values_judged"] == {"final_val_loss": "adjusted"}

    table = (tmp_path / "results.md").read_text()
    ranking = table.split("## Ranking")[1].split("\n## ")[0]
    rows = {line.split("|")[2].strip(): line for line in ranking.splitlines() if line.startswith("| ") and "`" in line}
    assert "≈ mha" in rows["`mqa`"] and "≈" not in rows["`identity`"]
    assert f"worse (p={adjusted['identity']:.1e})" in rows["`identity`"] or \
        f"worse (p={adjusted['identity']:.3f})" in rows["`identity`"]
    assert "| reference |" in rows["`mha`"]
    mha = groups["mha"]["statistics"]["final_val_loss"]
    assert f"{mha['mean']:.4f} ± {mha['std']:.4f}" in rows["`mha`"] and f"[{mha['ci95'][0]:.4f}, " in rows["`mha`"]
    assert "Benjamini-Hochberg adjusted p-value" in table and "## Comparisons with `mha`" in table
    assert "## Every metric" in table and "wall time (s)" in table


def test_welch_for_combined_sweeps_through_the_cli(tmp_path, monkeypatch, capsys):
    """Two sweeps on different seeds cannot pair: Welch's t-test; --reference picks the reference."""
    for seed, loss in enumerate([3.00, 3.05, 2.98]):
        fake_run(tmp_path / "a", f"{seed}", "gqa_2", seed, loss)
    for seed, loss in zip((5, 6, 7), [3.20, 3.26, 3.22]):
        fake_run(tmp_path / "b", f"{seed}", "mha", seed, loss)
    out = tmp_path / "combined"
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path / "a"), str(tmp_path / "b"), "--reference", "gqa_2",
                                      "--out", str(out)])
    runpy.run_path(str(ROOT / "scripts" / "report.py"), run_name="__main__")
    printed = capsys.readouterr().out
    summary = json.loads((out / "report.json").read_text())
    groups = json.loads((out / "comprehensive_results.json").read_text())
    assert summary["reference"] == "gqa_2" and summary["ranking"] == ["gqa_2", "mha"]
    c = groups["mha"]["comparisons"]["final_val_loss"]
    expected = sps.ttest_ind([3.20, 3.26, 3.22], [3.00, 3.05, 2.98], equal_var=False)
    assert c["test"] == "Welch's t-test" and c["p_value"] == pytest.approx(expected.pvalue)
    assert c["ci95"] == pytest.approx(list(expected.confidence_interval(0.95))) and c["p_adjusted"] is None
    assert summary["p_values_judged"] == {"final_val_loss": "raw"}
    assert "worse (p=" in printed and "reference" in printed
    assert "its p-value (unadjusted: fewer than two comparisons were tested)" in (out / "results.md").read_text()


def test_n_too_small_is_said_and_no_p_value_is_given(tmp_path):
    seeds_sweep(tmp_path, {"mha": [3.0, 3.1], "mqa": [3.3]})
    report = write_report([tmp_path])
    c = report.configurations["mqa"]["comparisons"]["final_val_loss"]
    assert c["verdict"] == "n too small" and c["p_value"] is None
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| 2 | `mqa`"))
    assert "n too small" in row and "p=" not in row


def test_diverged_runs_are_listed_apart_and_never_ranked(tmp_path):
    seeds_sweep(tmp_path / "s", {"mha": [3.00, 3.05, 2.98], "gqa_2": [3.01, 3.04]})
    fake_run(tmp_path / "s", "5_gqa_2_seed2", "gqa_2", 2, None, status="diverged", diverged_at_step=57,
             train_loss=[3.0, None], train_steps=[1, 2])
    for seed in (0, 1):  # every run of a configuration diverged
        fake_run(tmp_path / "s", f"6_sparse_seed{seed}", "sparse", seed, None, status="diverged",
                 diverged_at_step=10 + seed)
    # an older run: "completed" with a non-finite (null) final validation loss
    fake_run(tmp_path / "s", "7_linear_seed0", "linear", 0, None, new_fields=False)
    fake_run(tmp_path / "s", "8_mla_seed0", "mla", 0, None, status="failed", error="RuntimeError: boom")
    (tmp_path / "s" / "9_mla_seed1" / ".hydra").mkdir(parents=True)  # a job killed before writing anything
    report = write_report([tmp_path / "s"])
    groups, summary = report.configurations, report.summary
    assert summary["ranking"] == ["mha", "gqa_2"] and set(groups) == {"mha", "gqa_2"}
    gqa = groups["gqa_2"]
    assert gqa["n"] == 2 and gqa["n_diverged"] == 1 and gqa["seeds"] == [0, 1]
    assert gqa["statistics"]["final_val_loss"]["values"] == [3.01, 3.04]
    assert gqa["curves"]["train_loss"]["n"] == [2, 2, 2]  # the diverged run's curve is not averaged in
    # mha ran seeds 0-2, gqa_2 completed 0-1: not the same seeds, so Welch
    assert gqa["comparisons"]["final_val_loss"]["test"] == "Welch's t-test"
    diverged = {(d["label"], d["seed"]): d["diverged_at_step"] for d in summary["diverged"]}
    assert diverged == {("gqa_2", 2): 57, ("sparse", 0): 10, ("sparse", 1): 11, ("linear", 0): None}
    assert [(f["label"], f["status"]) for f in summary["failed"]] == [("mla", "failed"), ("?", "incomplete")]
    table = (tmp_path / "s" / "results.md").read_text()
    diverged_section = table.split("## Diverged runs (4)")[1].split("##")[0]
    assert "`gqa_2` seed 2 diverged at step 57" in diverged_section and "`sparse` seed 1" in diverged_section
    ranking = table.split("## Ranking")[1].split("##")[0]
    assert "`sparse`" not in ranking and "`linear`" not in ranking and "2 (+1 diverged)" in ranking
    assert "## Failed or incomplete jobs (2)" in table and "RuntimeError: boom" in table


def test_accuracy_columns_and_comparisons_when_runs_count_accuracy(tmp_path):
    for seed in range(3):
        fake_run(tmp_path, f"m{seed}", "mha", seed, 3.0 + 0.01 * seed, acc=0.50 + 0.01 * seed)
        fake_run(tmp_path, f"g{seed}", "gqa_2", seed, 3.0 + 0.012 * seed, acc=0.80 + 0.012 * seed)
    report = write_report([tmp_path])
    comparisons = report.configurations["gqa_2"]["comparisons"]
    assert set(comparisons) == {"final_val_loss", "final_val_acc", "test_acc"}
    assert comparisons["final_val_acc"]["verdict"] == "better"
    expected = sps.ttest_rel([0.80, 0.812, 0.824], [0.50, 0.51, 0.52]).pvalue
    assert comparisons["final_val_acc"]["p_value"] == pytest.approx(expected)
    table = (tmp_path / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| rank"))
    assert "| val acc | test acc |" in header
    assert "| `gqa_2` | `mha` | final val acc |" in table


def test_older_runs_without_the_new_fields(tmp_path):
    seeds_sweep(tmp_path, {"mha": [3.0, 3.1], "mqa": [3.2, 3.3]}, new_fields=False)
    report = write_report([tmp_path])
    header = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| rank"))
    assert "acc" not in header
    assert report.summary["figures"] == ["comparison.png"] and not (tmp_path / "loss_by_position.png").exists()
    assert "Evaluation at other lengths" not in (tmp_path / "results.md").read_text()
    curve = report.configurations["mha"]["curves"]["train_loss"]  # from train_curve
    assert curve["steps"] == [1, 2, 4] and curve["mean"][0] == pytest.approx(3.05 + 2.0 + 0.005)
    assert "final_val_acc" not in report.configurations["mha"]["comparisons"]


def test_loss_by_position_is_averaged_over_seeds_and_plotted(tmp_path):
    seeds_sweep(tmp_path, {"mha": [3.0, 3.2, 3.1], "mqa": [3.3, 3.4]})
    report = write_report([tmp_path])
    record = report.configurations["mha"]["val_loss_by_position"]
    expected = by_position(3.0)
    assert record["positions"] == expected["positions"] == [[1, 1], [2, 3], [4, 7], [8, 15], [16, 16]]
    per_seed = np.array([by_position(v)["loss"] for v in (3.0, 3.2, 3.1)])
    assert record["loss"]["mean"] == pytest.approx(list(per_seed.mean(axis=0)))
    assert record["loss"]["std"] == pytest.approx(list(per_seed.std(axis=0, ddof=1)))
    assert record["loss"]["n"] == [3] * 5 and record["n_tokens"] == expected["n_tokens"]
    assert "loss_by_position.png" in report.summary["figures"]
    assert (tmp_path / "loss_by_position.png").stat().st_size > 10_000


def test_eval_lengths_table(tmp_path):
    for seed, loss in enumerate([3.0, 3.2]):
        lengths = {"256": {"status": "ok", "val_loss": loss + 0.5, "val_ppl": math.exp(loss + 0.5), "val_acc": 0.3,
                           "n_tokens": 1000, "loss_by_position": by_position(loss)}}
        fake_run(tmp_path, f"m{seed}", "mha", seed, loss, eval_lengths=lengths)
        fake_run(tmp_path, f"s{seed}", "sliding", seed, loss, eval_lengths={
            "256": {"status": "not_applicable", "reason": "window larger than the evaluated length"}})
    report = write_report([tmp_path])
    ok = report.configurations["mha"]["eval_lengths"]["256"]
    assert ok["status"] == "ok" and ok["val_loss"]["mean"] == pytest.approx(3.6) and ok["val_loss"]["n"] == 2
    assert ok["val_loss"]["std"] == pytest.approx(np.std([3.5, 3.7], ddof=1))
    table = (tmp_path / "results.md").read_text().split("## Evaluation at other lengths")[1]
    assert "| configuration | L=256 |" in table
    assert f"| `mha` | 3.6000 ± {np.std([3.5, 3.7], ddof=1):.4f} (n=2) |" in table
    assert "| `sliding` | n/a: window larger than the evaluated length |" in table


def recall_sweep(root: Path, pairs=(4, 8, 16)) -> None:
    """mha and gqa_2 over data.num_kv_pairs and two seeds; accuracy falls with the number of pairs."""
    for preset, base in (("mha", 0.9), ("gqa_2", 0.8)):
        for k in pairs:
            for seed in (0, 1):
                fake_run(root, f"{preset}_{k}_{seed}", preset, seed, 1.0 + k / 10, acc=base - k / 100 + 0.01 * seed,
                         settings=(f"data.num_kv_pairs={k}", "trainer.max_steps=10"))


def test_metric_against_a_swept_setting(tmp_path):
    recall_sweep(tmp_path)
    report = write_report([tmp_path])
    sweep = report.summary["metric_vs_setting"]
    assert sweep["setting"] == "data.num_kv_pairs" and sweep["metric"] == "test_acc"
    assert sweep["file"] == "metric_vs_data.num_kv_pairs.png" and (tmp_path / sweep["file"]).stat().st_size > 10_000
    gqa = sweep["series"]["gqa_2"]
    assert [p["value"] for p in gqa] == [4.0, 8.0, 16.0]
    values = [0.8 - 16 / 100 - 0.01, 0.8 - 16 / 100 + 0.01 - 0.01]  # test_acc = acc - 0.01
    assert gqa[2]["mean"] == pytest.approx(np.mean(values)) and gqa[2]["n"] == 2
    assert gqa[2]["ci95"] == pytest.approx(list(sps.t.interval(0.95, 1, loc=np.mean(values), scale=sps.sem(values))))
    # each preset is compared with mha at the same number of pairs
    label = "gqa_2 data.num_kv_pairs=8"
    assert report.configurations[label]["comparisons"]["final_val_loss"]["reference"] == "mha data.num_kv_pairs=8"
    assert report.configurations[label]["comparisons"]["test_acc"]["verdict"] in ("worse", "within noise")
    assert "metric_vs_data.num_kv_pairs.png" in (tmp_path / "results.md").read_text()


def test_no_setting_figure_when_two_settings_vary(tmp_path):
    for i, (k, lr) in enumerate(((4, 1e-3), (8, 1e-3), (8, 3e-3))):
        fake_run(tmp_path, f"{i}", "mha", 0, 3.0, settings=(f"data.num_kv_pairs={k}", f"optim.lr={lr}"))
    assert write_report([tmp_path]).summary["metric_vs_setting"] is None


def test_exp10_snippets_read_the_results_view(tmp_path, monkeypatch, capsys):
    """The exp10 ablation's own analysis snippets, exactly as its README has them, on our results/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds_sweep(tmp_path / "sweep", {"mha": [3.00, 3.05], "gqa_2": [3.10, 3.02], "mqa": [3.20, 3.25],
                                     "linear": [2.90, 2.95], "sliding_256": [3.3, 3.4]})
    report = write_report([tmp_path / "sweep"])
    work = tmp_path / "work"
    (work / "experiments" / "exp10_attention_mechanism_ablation").mkdir(parents=True)
    (work / "experiments" / "exp10_attention_mechanism_ablation" / "results").symlink_to(tmp_path / "sweep" / "results")
    monkeypatch.chdir(work)

    runpy.run_path(str(SNIPPETS / "view_results_summary.py"))
    printed = capsys.readouterr().out.splitlines()
    expected = [f"{rank}. {label}: Loss {report.configurations[label]['final_loss']:.4f}, "
                f"PPL {report.configurations[label]['final_perplexity']:.2f}"
                for rank, label in enumerate(report.summary["ranking"], 1)]
    assert printed == expected and printed[0].startswith("1. linear: Loss 2.9250")

    plt.close("all")
    runpy.run_path(str(SNIPPETS / "plot_training_curves.py"))
    lines = {line.get_label(): line for line in plt.gcf().axes[0].get_lines()}
    assert set(lines) == {"mha", "gqa_2", "mqa", "linear"}
    curve = report.configurations["gqa_2"]["curves"]["train_loss"]
    assert list(lines["gqa_2"].get_xdata()) == curve["steps"] == [1, 2, 4]
    per_seed = [[v + 2.0 / s + 0.01 * seed for s in (1, 2, 4)] for seed, v in enumerate([3.10, 3.02])]
    assert list(lines["gqa_2"].get_ydata()) == pytest.approx(list(np.mean(per_seed, axis=0)))
    plt.close("all")


def test_results_view_layout(tmp_path):
    recall_sweep(tmp_path / "sweep", pairs=(4, 8))
    config = {"seed": 0, "attention": {"name": "mha"}, "data": {"num_kv_pairs": 4}}
    fake_run(tmp_path / "sweep", "z_mha_4_first", "mha", 2, 1.4, acc=0.9,
             settings=("data.num_kv_pairs=4", "trainer.max_steps=10"), config=config)
    n_jobs = len(find_jobs([tmp_path / "sweep"]))
    report = write_report([tmp_path / "sweep"])
    view = tmp_path / "sweep" / "results"
    assert json.loads((view / "comprehensive_results.json").read_text()) == \
        json.loads((tmp_path / "sweep" / "comprehensive_results.json").read_text())
    assert (view / "comparison.png").stat().st_size > 10_000
    folders = sorted(p.name for p in view.iterdir() if p.is_dir())
    assert folders == ["gqa_2_data.num_kv_pairs=4", "gqa_2_data.num_kv_pairs=8", "mha_data.num_kv_pairs=4",
                       "mha_data.num_kv_pairs=8"]
    label = "mha data.num_kv_pairs=4"
    metrics = json.loads((view / "mha_data.num_kv_pairs=4" / "metrics.json").read_text())
    group = report.configurations[label]
    assert metrics["final_loss"] == group["final_loss"] and metrics["n"] == 3 and metrics["seeds"] == group["seeds"]
    assert metrics["train_steps"] == [1, 2, 4] and metrics["train_loss"] == group["curves"]["train_loss"]["mean"]
    assert metrics["val_steps"] == [2, 4] and len(metrics["runs"]) == 3
    # config.json: the configuration's first run (jobs in directory order)
    first = json.loads((tmp_path / "sweep" / "mha_4_0" / "config.json").read_text())
    assert json.loads((view / "mha_data.num_kv_pairs=4" / "config.json").read_text()) == first
    # the view is never read back as jobs; a configuration that is gone loses its folder
    write_report([tmp_path / "sweep"])
    assert len(find_jobs([tmp_path / "sweep"])) == n_jobs
    stale = view / "mqa"
    stale.mkdir()
    (stale / "metrics.json").write_text(json.dumps({"kind": VIEW_KIND}))
    (view / "notes").mkdir()
    write_report([tmp_path / "sweep"])
    assert not stale.exists() and (view / "notes").exists()


def test_folder_names_are_filesystem_safe():
    assert folder_name("gqa_2") == "gqa_2"
    assert folder_name("mha data.num_kv_pairs=8") == "mha_data.num_kv_pairs=8"
    assert folder_name("mha model.layer_attention=[mha,mla] optim.lr=0.001") == \
        "mha_model.layer_attention=_mha_mla_optim.lr=0.001"
    assert folder_name("../x/y") == "x_y" and folder_name("?") == "configuration"


def test_reference_from_the_runs_config_and_published_figures(tmp_path):
    """scripts/report.py without --reference uses the runs' report.reference; published losses
    (report.published_val_loss, or report_reference in older runs) are printed beside ours."""
    published = {"mha": 2.294, "moas": 2.307}
    for seed in (0, 1):
        fake_run(tmp_path / "new", f"a{seed}", "mha", seed, 2.31 + seed / 100,
                 config={"report": {"reference": "moas", "published_val_loss": published}})
        fake_run(tmp_path / "new", f"b{seed}", "moas", seed, 2.30 + seed / 100,
                 config={"report": {"reference": "moas", "published_val_loss": published}})
        fake_run(tmp_path / "old", f"a{seed}", "mha", seed, 2.31, config={"report_reference": published})
    report = write_report([tmp_path / "new"])
    assert report.summary["reference"] == "moas"
    assert report.configurations["mha"]["comparisons"]["final_val_loss"]["reference"] == "moas"
    for source in ("new", "old"):
        write_report([tmp_path / source])
        table = (tmp_path / source / "results.md").read_text()
        assert "study val loss" in table and "| 2.294 |" in table
    assert "| 2.307 |" in (tmp_path / "new" / "results.md").read_text()


def test_missing_reference_is_said(tmp_path):
    seeds_sweep(tmp_path, {"gqa_2": [3.0, 3.1], "mqa": [3.2, 3.3]})
    report = write_report([tmp_path])
    assert all(g["comparisons"] == {} for g in report.configurations.values())
    assert "Reference `mha` is not among these configurations" in (tmp_path / "results.md").read_text()


def test_callback_validates_the_report_block_and_uses_its_reference(tmp_path):
    from omegaconf import OmegaConf

    seeds_sweep(tmp_path, {"mha": [3.0, 3.1], "gqa_2": [3.2, 3.3]})
    callback = ReportOnMultirunEnd()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "report": {"reference": "gqa_2"}})
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert json.loads((tmp_path / "report.json").read_text())["reference"] == "gqa_2"
    for bad, field in (({"reference": 3}, "report.reference"), ({"referense": "mha"}, "report.referense"),
                       ({"published_val_loss": {"mha": "low"}}, "report.published_val_loss")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            callback.on_multirun_start(OmegaConf.create({"report": bad}))


def test_report_logs_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    seeds_sweep(tmp_path / "s", {"mha": [3.0, 3.1], "mqa": [3.2, 3.3]})
    write_report([tmp_path / "s"], tmp_path / "s", wandb={"project": "attnlab", "group": "test-sweep"})
    assert list((tmp_path / "s" / "wandb").glob("offline-run-*"))


def test_single_seed_has_no_spread(tmp_path):
    fake_run(tmp_path, "0", "mha", 0, 3.0)
    stat = aggregate(find_jobs([tmp_path]))["mha"]["statistics"]["final_val_loss"]
    assert stat == {"mean": 3.0, "std": None, "n": 1, "ci95": None, "values": [3.0], "seeds": [0]}


def test_pareto_front():
    points = [(4096, 3.0), (1024, 3.2), (0, 4.0), (2048, 3.3)]  # (KV bytes, loss)
    assert sorted(pareto_front(points)) == [0, 1, 2]
    throughput = [(1000, 3.0), (1500, 3.2), (3000, 4.0), (900, 3.1)]
    assert sorted(pareto_front(throughput, maximize_x=True)) == [0, 1, 2]
