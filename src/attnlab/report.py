"""Comparison reports over sweep (or run) directories.

``attnlab-report <sweep dir> [<sweep dir> ...] [--reference mha]`` (``scripts/report.py`` in a checkout) - and automatically
at the end of a Hydra multirun - reads every job's ``metrics.json`` (and ``config.json`` /
``.hydra``), groups jobs that differ only in their seed into configurations, and writes:

* ``comprehensive_results.json``: one entry per configuration, keyed by its name, with
  ``final_loss`` / ``final_perplexity`` (validation, mean over seeds; the layout of the exp10
  ablation's own analysis snippets) beside the statistics of every metric (mean, std, n, 95% CI),
  the comparisons with the reference, the mean curves and the runs;
* ``report.json``: what is not per configuration: sources, reference, ranking, the diverged,
  failed and incomplete jobs, the figures;
* ``results.md``: the ranked table with the differences that are within noise marked, the
  comparisons, every metric's statistics, the evaluation at other lengths, diverged and failed jobs;
* ``comparison.png``, ``loss_by_position.png`` and, for a sweep over one numeric setting,
  ``metric_vs_<setting>.png`` (see :mod:`attnlab.plots`);
* ``results/``: the exp10 layout: ``comprehensive_results.json``, ``comparison.png`` and per
  configuration ``<configuration>/metrics.json`` (mean curves over seeds) and ``config.json``.

Statistics are scipy's (:mod:`attnlab.stats`). A diverged run is listed apart and is never part of
a configuration's statistics; a failed or killed job is listed with its error. Neither hides the
other runs' results.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab import stats
from attnlab.config import require
from attnlab.errors import MissingInputError
from attnlab.io import atomic_write_text, read_json, write_json

log = logging.getLogger(__name__)

#: Overrides that do not change what a job measures (bookkeeping) or that define repeats (seed).
_NOT_A_SETTING = ("seed", "experiment", "resume_sweep", "logger", "callbacks", "paths.", "hydra.", "tags",
                  "trainer.enable_progress_bar", "+resume_sweep", "hparams_search", "report.")


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    digits: int
    higher_is_better: bool = False


#: Every metric aggregated over seeds, in the order the report lists them.
METRICS = (
    Metric("final_val_loss", "final val loss", 4),
    Metric("final_val_ppl", "final val ppl", 2),
    Metric("best_val_loss", "best val loss", 4),
    Metric("best_val_ppl", "best val ppl", 2),
    Metric("test_loss", "test loss", 4),
    Metric("test_ppl", "test ppl", 2),
    Metric("final_val_acc", "final val acc", 4, True),
    Metric("best_val_acc", "best val acc", 4, True),
    Metric("test_acc", "test acc", 4, True),
    Metric("train_tokens_per_sec", "train tokens/s", 0, True),
    Metric("wall_time_s", "wall time (s)", 1),
    Metric("peak_rss_mb", "peak RSS (MB)", 0),
    Metric("peak_gpu_memory_mb", "peak GPU memory (MB)", 0),
)
METRIC = {m.key: m for m in METRICS}
#: Configurations are ranked by it and compared with the reference on it.
PRIMARY = "final_val_loss"
#: Compared with the reference as well, where both sides' data count accuracy.
ACCURACY = ("final_val_acc", "test_acc")
DEFAULT_REFERENCE = "mha"
#: ``metrics.json`` of the results/ view carries this, so a later report never takes it for a job.
VIEW_KIND = "attnlab report: one configuration, mean over seeds"


@dataclass
class Job:
    path: Path
    status: str  # completed | diverged | failed | interrupted | incomplete
    preset: str | None
    settings: list[str]
    seed: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    label: str = ""
    #: the settings that tell this job's configuration apart from the others' (part of the label)
    distinct: list[str] = field(default_factory=list)
    diverged_at_step: int | None = None


@dataclass
class Report:
    """What :func:`write_report` wrote: ``summary`` is ``report.json``, ``configurations`` is
    ``comprehensive_results.json``."""

    summary: dict[str, Any]
    configurations: dict[str, Any]
    out_dir: Path


# ----------------------------------------------------------------------------------- jobs


def _overrides(job_dir: Path, metrics: dict[str, Any]) -> list[str]:
    if metrics.get("overrides") is not None:
        return list(metrics["overrides"])
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(path)]
    return []


def job_settings(overrides: list[str]) -> list[str]:
    """The overrides that change what a job measures (not its seed, attention or bookkeeping)."""
    settings = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "attention" or any(key == p or (p.endswith(".") and key.startswith(p)) for p in _NOT_A_SETTING):
            continue
        settings.append(override.lstrip("+"))
    return sorted(settings)


def label_jobs(jobs: list[Job]) -> None:
    """Label = attention preset + the settings that differ between jobs (shared ones say nothing)."""
    common = set.intersection(*(set(j.settings) for j in jobs)) if jobs else set()
    for job in jobs:
        job.distinct = [s for s in job.settings if s not in common]
        job.label = " ".join([job.preset or "?"] + job.distinct)


def _tail(path: Path, lines: int = 8) -> str | None:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return None


def _status(metrics: dict[str, Any]) -> str:
    status = metrics.get("status", "incomplete")
    if status == "completed":
        # runs from before divergence was detected finished with a non-finite (null) validation loss
        curve = metrics.get("val_curve") or []
        if curve and not _finite(curve[-1].get("loss")):
            return "diverged"
    return status


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_jobs(roots: list[Path]) -> list[Job]:
    """Every job directory under ``roots``: those with a ``metrics.json`` or a ``.hydra`` folder
    (not the report's own ``results/`` view)."""
    dirs: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise MissingInputError(f"no such sweep directory: {root}")
        for marker in ("metrics.json", ".hydra"):
            dirs.update(p.parent for p in root.rglob(marker))
    jobs = []
    for job_dir in sorted(dirs):
        # the sweep directory itself has a multirun.yaml and no job of its own
        if (job_dir / "multirun.yaml").exists() and not (job_dir / "metrics.json").exists():
            continue
        metrics = read_json(job_dir / "metrics.json") or {}
        if metrics.get("kind") == VIEW_KIND:
            continue
        config = read_json(job_dir / "config.json") or {}
        if not config and (job_dir / ".hydra" / "config.yaml").is_file():
            from omegaconf import OmegaConf

            try:
                config = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "config.yaml"), resolve=False)
            except Exception:  # a half-written config of a killed job
                config = {}
        preset = metrics.get("attention_preset") or _preset_from(job_dir, config)
        seed = metrics.get("seed", config.get("seed"))
        status = _status(metrics)
        error = metrics.get("error")
        if status == "incomplete":
            logs = sorted(job_dir.glob("*.log"))
            error = "no metrics.json: the job was killed or is still running" + (
                f"; last log lines:\n{_tail(logs[0])}" if logs else "")
        jobs.append(Job(job_dir, status, preset, job_settings(_overrides(job_dir, metrics)), seed, metrics, config,
                        error, diverged_at_step=metrics.get("diverged_at_step")))
    label_jobs(jobs)
    return jobs


def _preset_from(job_dir: Path, config: dict[str, Any]) -> str | None:
    hydra_cfg = job_dir / ".hydra" / "hydra.yaml"
    if hydra_cfg.is_file():
        from omegaconf import OmegaConf

        try:
            return str(OmegaConf.load(hydra_cfg).hydra.runtime.choices.attention)
        except Exception:
            pass
    attention = config.get("attention")
    return attention.get("name") if isinstance(attention, dict) else None


def _value(job: Job, key: str) -> float | None:
    value = job.metrics.get(key)
    if value is None and key == "best_val_ppl" and _finite(job.metrics.get("best_val_loss")):
        value = math.exp(job.metrics["best_val_loss"])  # runs write the best loss, not its perplexity
    return float(value) if _finite(value) else None


# ----------------------------------------------------------------------------------- aggregation


def _mean_curve(curves: list[list[tuple[int, Any]]]) -> dict[str, list]:
    """Columns ``steps``, ``mean``, ``std`` (None below two runs) and ``n`` over the runs' points."""
    by_step: dict[int, list[Any]] = defaultdict(list)
    for curve in curves:
        for step, value in curve:
            by_step[int(step)].append(value)
    out: dict[str, list] = {"steps": [], "mean": [], "std": [], "n": []}
    for step, values in sorted(by_step.items()):
        summary = stats.summarize(values)
        if summary["n"]:
            out["steps"].append(step)
            for key in ("mean", "std", "n"):
                out[key].append(summary[key])
    return out


def _train_points(metrics: dict[str, Any]) -> list[tuple[int, Any]]:
    if metrics.get("train_steps") is not None:
        return list(zip(metrics["train_steps"], metrics.get("train_loss") or []))
    return [(p["step"], p.get("loss")) for p in metrics.get("train_curve") or []]


def _curves(done: list[Job]) -> dict[str, Any]:
    curves = {"train_loss": _mean_curve([_train_points(j.metrics) for j in done]),
              "val_loss": _mean_curve([[(p["step"], p.get("loss")) for p in j.metrics.get("val_curve") or []]
                                       for j in done])}
    val_acc = _mean_curve([[(p["step"], p.get("acc")) for p in j.metrics.get("val_curve") or []] for j in done])
    if val_acc["steps"]:
        curves["val_acc"] = val_acc
    return curves


def _by_position(records: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Loss and accuracy per position bucket: mean, std and n over the runs that have the bucket."""
    buckets: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: {"loss": [], "acc": [], "n_tokens": []})
    for record in records:
        if not record:
            continue
        n_buckets = len(record["positions"])
        for i, (lo, hi) in enumerate(record["positions"]):
            for key in ("loss", "acc", "n_tokens"):
                values = record.get(key) or [None] * n_buckets
                buckets[(int(lo), int(hi))][key].append(values[i])
    if not buckets:
        return None
    order = sorted(buckets)
    out: dict[str, Any] = {"positions": [list(b) for b in order]}
    for key in ("loss", "acc"):
        summaries = [stats.summarize(buckets[b][key]) for b in order]
        out[key] = {k: [s[k] for s in summaries] for k in ("mean", "std", "n")}
    out["n_tokens"] = [max((t for t in buckets[b]["n_tokens"] if t is not None), default=None) for b in order]
    return out


def _length_order(length: str) -> tuple[int, str]:
    """Evaluated lengths (JSON keys) in numeric order."""
    return (int(length), "") if length.isdigit() else (-1, length)


def _eval_lengths(done: list[Job]) -> dict[str, Any]:
    """Per evaluated length: the validation loss/ppl/acc statistics over the runs where it applied,
    or why it did not."""
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in done:
        for length, record in (job.metrics.get("eval_lengths") or {}).items():
            records[str(length)].append(record or {})
    out: dict[str, Any] = {}
    for length in sorted(records, key=_length_order):
        ok = [r for r in records[length] if r.get("status") == "ok"]
        reasons = sorted({r.get("reason") or "no reason given" for r in records[length] if r.get("status") != "ok"})
        if not ok:
            out[length] = {"status": "not_applicable", "reason": "; ".join(reasons)}
            continue
        out[length] = {"status": "ok", **{key: stats.summarize([r.get(key) for r in ok])
                                          for key in ("val_loss", "val_ppl", "val_acc")},
                       "loss_by_position": _by_position([r.get("loss_by_position") for r in ok])}
        if reasons:
            out[length]["not_applicable"] = {"n": len(records[length]) - len(ok), "reason": "; ".join(reasons)}
    return out


def _published(jobs: list[Job]) -> dict[str, float] | None:
    """Published per-preset validation losses stored in the config (``report.published_val_loss``;
    older runs: ``report_reference``), printed beside ours."""
    for job in jobs:
        block = job.config.get("report") if isinstance(job.config.get("report"), dict) else {}
        figures = block.get("published_val_loss") or job.config.get("report_reference")
        if isinstance(figures, dict):
            return figures
    return None


def aggregate(jobs: list[Job]) -> dict[str, Any]:
    """Configurations (jobs grouped by label) with at least one completed run: the statistics of
    every metric over the completed seeds; diverged and failed runs are counted, never averaged."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.label].append(job)
    published = _published(jobs)
    out: dict[str, Any] = {}
    for label, members in groups.items():
        done = [j for j in members if j.status == "completed"]
        if not done:
            continue
        statistics = {}
        for metric in METRICS:
            summary = stats.summarize([_value(j, metric.key) for j in done])
            if summary["n"]:
                summary["seeds"] = [j.seed for j in done if _value(j, metric.key) is not None]
                statistics[metric.key] = summary
        first = done[0]
        entry: dict[str, Any] = {
            "final_loss": statistics.get("final_val_loss", {}).get("mean"),
            "final_perplexity": statistics.get("final_val_ppl", {}).get("mean"),
            "attention_preset": first.preset,
            "settings": first.distinct,
            "n": len(done),
            "n_diverged": sum(j.status == "diverged" for j in members),
            "n_failed": sum(j.status not in ("completed", "diverged") for j in members),
            "seeds": [j.seed for j in done],
            "statistics": statistics,
            "comparisons": {},
            "params": first.metrics.get("params"),
            "kv_cache_bytes_per_token": first.metrics.get("kv_cache_bytes_per_token"),
            "attention": first.metrics.get("attention"),
            "curves": _curves(done),
            "val_loss_by_position": _by_position([j.metrics.get("val_loss_by_position") for j in done]),
            "test_loss_by_position": _by_position([j.metrics.get("test_loss_by_position") for j in done]),
            "eval_lengths": _eval_lengths(done),
            "runs": [{"seed": j.seed, "status": j.status, "path": str(j.path)} for j in members],
        }
        if published is not None and first.preset in published:
            entry["published_val_loss"] = published[first.preset]
        out[label] = entry
    return out


def ranked(groups: dict[str, Any]) -> list[str]:
    """Configurations with a final validation loss, best (lowest mean) first."""
    return sorted((label for label, g in groups.items() if g["final_loss"] is not None),
                  key=lambda label: (groups[label]["final_loss"], label))


def reference_of(label: str, groups: dict[str, Any], reference: str) -> str | None:
    """The configuration ``label`` is compared with: ``reference`` itself when it names a
    configuration, else the configuration of preset ``reference`` with the same settings (a sweep
    over ``data.num_kv_pairs`` compares each preset with mha at the same number of pairs)."""
    if reference in groups:
        return reference
    settings = groups[label]["settings"]
    return next((other for other, g in groups.items()
                 if g["attention_preset"] == reference and g["settings"] == settings), None)


def compare_with_reference(groups: dict[str, Any], jobs: list[Job], reference: str) -> dict[str, str]:
    """Fill each configuration's ``comparisons`` (primary metric, and accuracy where both sides
    have it) against its reference; Benjamini-Hochberg over each metric's comparisons. Returns,
    per metric, which p-value the verdicts use (``adjusted`` | ``raw``)."""
    done: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        if job.status == "completed":
            done[job.label].append(job)
    families: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for label, group in groups.items():
        ref_label = reference_of(label, groups, reference)
        group["reference"] = ref_label
        if ref_label is None or ref_label == label:
            continue
        for key in (PRIMARY, *ACCURACY):
            if key not in group["statistics"] or key not in groups[ref_label]["statistics"]:
                continue
            comparison = stats.compare([(j.seed, _value(j, key)) for j in done[ref_label]],
                                       [(j.seed, _value(j, key)) for j in done[label]],
                                       higher_is_better=METRIC[key].higher_is_better)
            comparison["reference"] = ref_label
            group["comparisons"][key] = comparison
            families[key].append(comparison)
    return {key: stats.adjust(family) for key, family in families.items()}


def _settings_of(job: Job) -> dict[str, str]:
    return dict(s.split("=", 1) for s in job.settings if "=" in s)


def swept_setting(jobs: list[Job]) -> str | None:
    """The one numeric setting (besides attention and seed) a sweep varies, else None."""
    done = [j for j in jobs if j.status == "completed"]
    if not done:
        return None
    values = [_settings_of(j) for j in done]
    keys = set().union(*values)
    varying = [k for k in keys if any(k not in v for v in values) or len({v[k] for v in values}) > 1]
    if len(varying) != 1 or any(varying[0] not in v for v in values):
        return None
    try:
        [float(v[varying[0]]) for v in values]
    except ValueError:
        return None
    return varying[0]


def metric_vs_setting(jobs: list[Job], setting: str) -> dict[str, Any]:
    """The primary metric (test accuracy where runs have it, else final validation loss) per
    attention preset and value of ``setting``, over seeds."""
    done = [j for j in jobs if j.status == "completed"]
    key = "test_acc" if any(_value(j, "test_acc") is not None for j in done) else PRIMARY
    points: dict[str, dict[float, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for job in done:
        value = float(_settings_of(job)[setting])
        points[job.preset or "?"][value].append(_value(job, key))
    series = {preset: [{"value": x, **stats.summarize(ys)} for x, ys in sorted(by_value.items())]
              for preset, by_value in sorted(points.items())}
    return {"setting": setting, "metric": key, "series": series}


# ----------------------------------------------------------------------------------- results.md


def _fmt_stat(summary: dict[str, Any] | None, digits: int) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    if summary.get("std") is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _fmt_ci(summary: dict[str, Any] | None, digits: int) -> str:
    if not summary or summary.get("ci95") is None:
        return "-"
    low, high = summary["ci95"]
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def mark(label: str, group: dict[str, Any], key: str, reference: str) -> str:
    """The table's verdict on one metric against the reference: ``reference``, ``≈ <reference>``
    (within noise), ``better``/``worse`` with the p-value it was judged on, ``n too small``."""
    if group.get("reference") is None:
        return "-"
    comparison = group["comparisons"].get(key)
    if comparison is None:
        return "reference" if group["reference"] == label else "-"
    verdict = comparison["verdict"]
    if verdict in ("within noise", "identical"):
        return f"≈ {reference}" + (" (identical)" if verdict == "identical" else "")
    if verdict == "n too small":
        return verdict
    p = comparison["p_adjusted"] if comparison["p_adjusted"] is not None else comparison["p_value"]
    return f"{verdict} (p={_fmt_p(p)})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(groups: dict[str, Any], summary: dict[str, Any]) -> str:
    reference = summary["reference"]
    order = summary["ranking"] + [label for label in groups if label not in summary["ranking"]]
    has = {key: any(key in groups[label]["statistics"] for label in order) for key in METRIC}
    compared = any(g.get("reference") is not None for g in groups.values())
    n_runs = sum(g["n"] for g in groups.values())
    lines = ["# Results", "", "Sources: " + ", ".join(f"`{s}`" for s in summary["sources"]), "",
             f"{len(groups)} configurations, {n_runs} completed runs, {len(summary['diverged'])} diverged, "
             f"{len(summary['failed'])} failed or incomplete. Reference: `{reference}` (`report.reference`, "
             "`--reference`).", ""]

    # the ranked table
    lines += ["## Ranking", "",
              "Ranked by final validation loss: mean ± std over seeds, its 95% confidence interval "
              "(t distribution) and n = completed seeds (diverged runs are not part of any statistic).", ""]
    header = ["rank", "configuration", "n", "val loss", "95% CI"]
    if compared:
        header.append(f"vs `{reference}`")
    published = any(g.get("published_val_loss") is not None for g in groups.values())
    if published:
        header.append("study val loss")
    header += ["val ppl", "test loss", "test ppl"]
    header += [METRIC[k].name.replace("final ", "") for k in ("final_val_acc", "test_acc") if has[k]]
    header += ["params (non-emb.)", "tokens/s", "KV bytes/token"]
    rows = []
    for label in order:
        g = groups[label]
        s = g["statistics"]
        rank = summary["ranking"].index(label) + 1 if label in summary["ranking"] else "-"
        extra = [f"+{g[k]} {name}" for k, name in (("n_diverged", "diverged"), ("n_failed", "failed")) if g[k]]
        row = [str(rank), f"`{label}`", str(g["n"]) + (f" ({', '.join(extra)})" if extra else ""),
               _fmt_stat(s.get(PRIMARY), 4), _fmt_ci(s.get(PRIMARY), 4)]
        if compared:
            row.append(mark(label, g, PRIMARY, reference))
        if published:
            ref = g.get("published_val_loss")
            row.append(f"{ref:.3f}" if ref is not None else "-")
        row += [_fmt_stat(s.get("final_val_ppl"), 2), _fmt_stat(s.get("test_loss"), 4), _fmt_stat(s.get("test_ppl"), 2)]
        row += [_fmt_stat(s.get(k), 4) for k in ("final_val_acc", "test_acc") if has[k]]
        non_emb = (g.get("params") or {}).get("non_embedding")
        kv = g.get("kv_cache_bytes_per_token")
        row += [f"{non_emb:,}" if non_emb is not None else "-", _fmt_stat(s.get("train_tokens_per_sec"), 0),
                f"{kv:,.0f}" if kv is not None else "-"]
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", *_legend(summary, compared)]

    comparisons = [(label, key, groups[label]["comparisons"][key]) for label in order
                   for key in (PRIMARY, *ACCURACY) if key in groups[label]["comparisons"]]
    if comparisons:
        lines += ["", f"## Comparisons with `{reference}`", "",
                  "Difference = configuration − reference (mean over seeds) with its 95% confidence interval.", ""]
        rows = []
        for label, key, c in comparisons:
            digits = METRIC[key].digits
            if c["difference"] is None:
                difference = "-"
            else:
                difference = _signed(c["difference"], digits)
                if c["ci95"] is not None:
                    difference += f" [{_signed(c['ci95'][0], digits)}, {_signed(c['ci95'][1], digits)}]"
            test = c["test"] or "-"
            if c["paired_seeds"]:
                test += " (seeds " + ", ".join(str(s) for s in c["paired_seeds"]) + ")"
            rows.append([f"`{label}`", f"`{c['reference']}`", METRIC[key].name, f"{c['n'][0]} / {c['n'][1]}",
                         difference, test, _fmt_p(c["p_value"]), _fmt_p(c["p_adjusted"]), c["verdict"]])
        lines += _table(["configuration", "reference", "metric", "n (this / ref.)", "difference [95% CI]", "test",
                         "p", "p (BH)", "verdict"], rows)

    # every metric's statistics
    lines += ["", "## Every metric", "",
              "Mean ± std over the completed seeds, 95% CI of the mean (t distribution), n.", ""]
    rows = []
    for label in order:
        for metric in METRICS:
            stat = groups[label]["statistics"].get(metric.key)
            if stat is not None:
                rows.append([f"`{label}`", metric.name, _fmt_stat(stat, metric.digits), _fmt_ci(stat, metric.digits),
                             str(stat["n"])])
    lines += _table(["configuration", "metric", "mean ± std", "95% CI", "n"], rows)

    lines += _eval_length_lines(groups, order)

    if summary["diverged"]:
        lines += ["", f"## Diverged runs ({len(summary['diverged'])})", "",
                  "Training loss became non-finite. These runs are not ranked and not part of any "
                  "configuration's statistics.", ""]
        for d in summary["diverged"]:
            at = f"at step {d['diverged_at_step']}" if d["diverged_at_step"] is not None else \
                "(non-finite validation loss; the step was not recorded)"
            lines.append(f"- `{d['label']}` seed {d['seed']} diverged {at} in `{d['path']}`")
    if summary["failed"]:
        lines += ["", f"## Failed or incomplete jobs ({len(summary['failed'])})", ""]
        for f in summary["failed"]:
            error = (f["error"] or "unknown error").strip().replace("\n", "\n    ")
            lines.append(f"- `{f['label']}` seed {f['seed']} ({f['status']}) in `{f['path']}`:\n    {error}")

    lines += ["", "## Figures", "", "- `comparison.png`: mean training and validation curves with a ±1 std band "
              "over seeds; final validation loss against KV-cache bytes and against throughput, error bars = "
              "95% CI over seeds, Pareto fronts dashed."]
    if "loss_by_position.png" in summary["figures"]:
        lines.append("- `loss_by_position.png`: validation loss by position in the window (tokens of context), "
                     "log2 buckets, ±1 std band over seeds.")
    sweep = summary.get("metric_vs_setting")
    if sweep:
        lines.append(f"- `{sweep['file']}`: {METRIC[sweep['metric']].name} against `{sweep['setting']}`, one line "
                     "per attention preset, error bars = 95% CI over seeds.")
    lines += ["", "KV bytes/token: the whole model's decoding cache per token at the model's context length "
              "(fp32), from the closed form that the test suite checks against the cache tensors.", ""]
    return "\n".join(lines)


def _legend(summary: dict[str, Any], compared: bool) -> list[str]:
    reference = summary["reference"]
    if not compared:
        return [f"Reference `{reference}` is not among these configurations: no comparisons (choose one with "
                "`report.reference=<configuration>` or `--reference`)."]
    basis = summary["p_values_judged"].get(PRIMARY, "raw")
    judged = ("its Benjamini-Hochberg adjusted p-value (over this metric's comparisons)" if basis == "adjusted"
              else "its p-value (unadjusted: fewer than two comparisons were tested)")
    return [f"`vs {reference}`: each configuration against `{reference}` (with the same settings) on final "
            "validation loss: a paired t-test when both ran the same seeds (the seed fixes the data order and the "
            "initialisation), else Welch's t-test.",
            f"`≈ {reference}`: the difference is within noise, {judged} ≥ {stats.ALPHA}; "
            "`better` / `worse`: a real difference at that level (p shown is the one judged on); "
            "`(identical)`: the same value on every seed; "
            "`n too small`: fewer than two completed seeds on one side, no test."]


def _eval_length_lines(groups: dict[str, Any], order: list[str]) -> list[str]:
    lengths = sorted({length for label in order for length in groups[label]["eval_lengths"]}, key=_length_order)
    if not lengths:
        return []
    rows = []
    for label in order:
        row = [f"`{label}`"]
        for length in lengths:
            record = groups[label]["eval_lengths"].get(length)
            if record is None:
                row.append("-")
            elif record["status"] != "ok":
                row.append(f"n/a: {record['reason']}")
            else:
                cell = f"{_fmt_stat(record['val_loss'], 4)} (n={record['val_loss']['n']})"
                if "not_applicable" in record:
                    cell += f"; n/a for {record['not_applicable']['n']}: {record['not_applicable']['reason']}"
                row.append(cell)
        rows.append(row)
    return ["", "## Evaluation at other lengths", "",
            "Validation loss at each evaluated context length (mean ± std over seeds, n); the training "
            "length is the ranking's `val loss`.", "",
            *_table(["configuration", *(f"L={length}" for length in lengths)], rows)]


# ----------------------------------------------------------------------------------- results/ view


def folder_name(label: str) -> str:
    """A filesystem-safe folder name for a configuration: the preset name as it is, other labels
    with every run of unsafe characters replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("._") or "configuration"


def _folders(labels: list[str]) -> dict[str, str]:
    folders: dict[str, str] = {}
    taken: set[str] = set()
    for label in labels:
        name, i = folder_name(label), 2
        while name in taken:
            name, i = f"{folder_name(label)}-{i}", i + 1
        taken.add(name)
        folders[label] = name
    return folders


def write_results_view(out: Path, groups: dict[str, Any], jobs: list[Job]) -> None:
    """``results/``: the exp10 ablation's layout (its analysis snippets read it as they are)."""
    view = out / "results"
    write_json(view / "comprehensive_results.json", groups)
    shutil.copyfile(out / "comparison.png", view / "comparison.png")
    first_run = {}
    for job in jobs:
        if job.status == "completed":
            first_run.setdefault(job.label, job)
    for label, g in groups.items():
        folder = view / g["results_dir"]
        curves = g["curves"]
        test = g["statistics"].get("test_loss", {})
        write_json(folder / "metrics.json", {
            "kind": VIEW_KIND,
            "configuration": label,
            "final_loss": g["final_loss"],
            "final_perplexity": g["final_perplexity"],
            "final_loss_std": g["statistics"].get(PRIMARY, {}).get("std"),
            "test_loss": test.get("mean"),
            "n": g["n"],
            "seeds": g["seeds"],
            "runs": [r["path"] for r in g["runs"] if r["status"] == "completed"],
            "train_steps": curves["train_loss"]["steps"],
            "train_loss": curves["train_loss"]["mean"],
            "train_loss_std": curves["train_loss"]["std"],
            "val_steps": curves["val_loss"]["steps"],
            "val_loss": curves["val_loss"]["mean"],
            "val_loss_std": curves["val_loss"]["std"],
        })
        write_json(folder / "config.json", first_run[label].config)
    # folders of configurations that a previous report had and this one has not
    current = {g["results_dir"] for g in groups.values()}
    for folder in view.iterdir():
        if folder.is_dir() and folder.name not in current and {p.name for p in folder.iterdir()} <= {
                "metrics.json", "config.json"} and (read_json(folder / "metrics.json") or {}).get("kind") == VIEW_KIND:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()


# ----------------------------------------------------------------------------------- writing


def _reference_from_configs(jobs: list[Job]) -> str | None:
    for job in jobs:
        block = job.config.get("report")
        if isinstance(block, dict) and isinstance(block.get("reference"), str):
            return block["reference"]
    return None


def write_report(sources: list[str | Path], out_dir: str | Path | None = None, *, reference: str | None = None,
                 wandb: dict | None = None) -> Report:
    """Write the report files for ``sources`` into ``out_dir`` (default: the first source).

    ``reference``: the configuration (or attention preset) every other one is compared with;
    default: the runs' ``report.reference``, else ``mha``."""
    from attnlab import plots

    sources = [Path(s) for s in sources]
    jobs = find_jobs(sources)  # before creating the output folder, which may be a (missing) source
    out = Path(out_dir) if out_dir else sources[0]
    out.mkdir(parents=True, exist_ok=True)
    reference = reference or _reference_from_configs(jobs) or DEFAULT_REFERENCE
    groups = aggregate(jobs)
    judged = compare_with_reference(groups, jobs, reference)
    ranking = ranked(groups)
    folders = _folders(ranking + [label for label in groups if label not in ranking])
    for label, g in groups.items():
        g["results_dir"] = folders[label]
    summary: dict[str, Any] = {
        "sources": [str(s) for s in sources],
        "reference": reference,
        "confidence": stats.CONFIDENCE,
        "alpha": stats.ALPHA,
        "p_values_judged": judged,
        "ranking": ranking,
        "diverged": [{"label": j.label, "seed": j.seed, "diverged_at_step": j.diverged_at_step, "path": str(j.path),
                      "error": j.error} for j in jobs if j.status == "diverged"],
        "failed": [{"label": j.label, "seed": j.seed, "status": j.status, "path": str(j.path), "error": j.error}
                   for j in jobs if j.status not in ("completed", "diverged")],
        "figures": ["comparison.png"],
        "metric_vs_setting": None,
    }
    plots.comparison(groups, ranking, out / "comparison.png")
    if plots.loss_by_position(groups, ranking, out / "loss_by_position.png"):
        summary["figures"].append("loss_by_position.png")
    setting = swept_setting(jobs)
    if setting is not None:
        sweep = metric_vs_setting(jobs, setting)
        sweep["file"] = f"metric_vs_{folder_name(setting)}.png"
        plots.metric_vs_setting(sweep, out / sweep["file"], METRIC[sweep["metric"]].name)
        summary["metric_vs_setting"] = sweep
        summary["figures"].append(sweep["file"])
    write_json(out / "comprehensive_results.json", groups)
    write_json(out / "report.json", summary)
    atomic_write_text(out / "results.md", markdown(groups, summary))
    write_results_view(out, groups, jobs)
    report = Report(summary, groups, out)
    if wandb:
        log_to_wandb(report, **wandb)
    log.info("report: %d completed, %d diverged, %d failed or incomplete jobs -> %s",
             sum(g["n"] for g in groups.values()), len(summary["diverged"]), len(summary["failed"]), out)
    return report


def log_to_wandb(report: Report, project: str = "attnlab", group: str | None = None, offline: bool | None = None,
                 **init_kwargs: Any) -> None:
    """Log the ranked table (with the comparison against the reference) and the figures as a W&B
    run of the sweep's group."""
    import wandb

    from attnlab.loggers import wandb_has_credentials

    if offline is None:
        offline = not wandb_has_credentials()
    out = report.out_dir
    mode = os.environ.get("WANDB_MODE") or ("offline" if offline else "online")
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{group or out.name}",
                     dir=str(out), mode=mode, reinit="finish_previous", **init_kwargs)
    columns = ["rank", "configuration", "n", "val_loss_mean", "val_loss_std", "val_loss_ci_low", "val_loss_ci_high",
               "vs_reference", "p_value", "val_ppl", "test_loss", "val_acc", "test_acc", "params", "tokens_per_sec",
               "kv_bytes_per_token"]
    table = wandb.Table(columns=columns)
    reference = report.summary["reference"]
    for rank, label in enumerate(report.summary["ranking"], 1):
        g = report.configurations[label]
        s = g["statistics"]
        primary = s.get(PRIMARY, {})
        comparison = g["comparisons"].get(PRIMARY) or {}
        p = comparison.get("p_adjusted") if comparison.get("p_adjusted") is not None else comparison.get("p_value")
        ci = primary.get("ci95") or [None, None]
        table.add_data(rank, label, g["n"], primary.get("mean"), primary.get("std"), ci[0], ci[1],
                       mark(label, g, PRIMARY, reference), p,
                       *(s.get(k, {}).get("mean") for k in ("final_val_ppl", "test_loss", "final_val_acc", "test_acc")),
                       (g.get("params") or {}).get("total"), s.get("train_tokens_per_sec", {}).get("mean"),
                       g.get("kv_cache_bytes_per_token"))
    images = {f"report/{Path(name).stem}": wandb.Image(str(out / name)) for name in report.summary["figures"]}
    run.log({"report/results": table, **images})
    run.finish()


# ----------------------------------------------------------------------------------- Hydra callback


def report_options(config: Any) -> dict[str, Any]:
    """The validated top-level ``report:`` block of the training config."""
    block = config.get("report") or {}
    allowed = ("reference", "published_val_loss")
    for key in block:
        require(key in allowed, f"report.{key}", block[key], "one of the report options: " + ", ".join(allowed),
                reason="unknown option")
    reference = block.get("reference", DEFAULT_REFERENCE)
    require(isinstance(reference, str) and bool(reference), "report.reference", reference,
            "a configuration name, e.g. an attention preset such as mha")
    published = block.get("published_val_loss")
    require(published is None or (hasattr(published, "items") and all(
        isinstance(v, (int, float)) for v in published.values())), "report.published_val_loss", published,
        "null or a mapping preset -> published validation loss")
    return {"reference": reference}


from hydra.experimental.callback import Callback as _HydraCallback  # noqa: E402


class ReportOnMultirunEnd(_HydraCallback):
    """Hydra callback (``hydra.callbacks``): write the report into the sweep directory when a
    multirun ends - also when some of its jobs failed or diverged. The ``report:`` block is
    checked when the multirun starts, before any job runs."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        report_options(config)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        wandb = None
        logger_cfg = config.get("logger") or {}
        if "wandb" in logger_cfg:
            wb = logger_cfg["wandb"]
            wandb = {"project": wb.get("project", "attnlab"), "group": wb.get("group"), "offline": wb.get("offline")}
        try:
            write_report([sweep_dir], sweep_dir, reference=report_options(config)["reference"], wandb=wandb)
        except Exception:  # a report failure must not turn a finished sweep into a failed one
            log.exception("writing the sweep report failed; run attnlab-report %s", sweep_dir)
