"""Comparison reports over sweep (or run) directories.

``python scripts/report.py <sweep dir> [<sweep dir> ...]`` - and automatically at the end of a
Hydra multirun - reads every job's ``metrics.json`` (and ``config.json`` / ``.hydra``), groups
jobs that differ only in their seed, and writes:

* ``comprehensive_results.json``: every group's aggregated metrics (mean, std, n) and every run;
* ``results.md``: the ranked table (validation loss mean ± std over seeds, perplexity, test loss,
  parameters, training tokens/s, KV-cache bytes per token) and the failed jobs with their errors;
* ``comparison.png``: training and validation curves, and quality against KV-cache bytes and
  against throughput with the Pareto fronts marked.

A job that failed or was killed is listed as such; it never hides the others' results.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.io import atomic_write_text, read_json, write_json

log = logging.getLogger(__name__)

#: Overrides that do not change what a job measures (bookkeeping) or that define repeats (seed).
_NOT_A_SETTING = ("seed", "experiment", "resume_sweep", "logger", "callbacks", "paths.", "hydra.", "tags",
                  "trainer.enable_progress_bar", "+resume_sweep", "hparams_search")
AGGREGATED = ("final_val_loss", "final_val_ppl", "best_val_loss", "test_loss", "test_ppl", "train_tokens_per_sec",
              "wall_time_s", "peak_rss_mb", "peak_gpu_memory_mb")


@dataclass
class Job:
    path: Path
    status: str  # completed | failed | incomplete
    preset: str | None
    settings: list[str]
    seed: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    label: str = ""


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
        job.label = " ".join([job.preset or "?"] + [s for s in job.settings if s not in common])


def _tail(path: Path, lines: int = 8) -> str | None:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return None


def find_jobs(roots: list[Path]) -> list[Job]:
    """Every job directory under ``roots``: those with a ``metrics.json`` or a ``.hydra`` folder."""
    dirs: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such sweep directory: {root}")
        for marker in ("metrics.json", ".hydra"):
            dirs.update(p.parent for p in root.rglob(marker))
    # the sweep directory itself has a multirun.yaml and no job of its own
    jobs = []
    for job_dir in sorted(dirs):
        if (job_dir / "multirun.yaml").exists() and not (job_dir / "metrics.json").exists():
            continue
        metrics = read_json(job_dir / "metrics.json") or {}
        config = read_json(job_dir / "config.json") or {}
        if not config and (job_dir / ".hydra" / "config.yaml").is_file():
            from omegaconf import OmegaConf

            try:
                config = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "config.yaml"), resolve=False)
            except Exception:  # a half-written config of a killed job
                config = {}
        preset = metrics.get("attention_preset") or _preset_from(job_dir, config)
        overrides = _overrides(job_dir, metrics)
        seed = metrics.get("seed", config.get("seed"))
        status = metrics.get("status", "incomplete")
        error = metrics.get("error")
        if status == "incomplete":
            logs = sorted(job_dir.glob("*.log"))
            error = "no metrics.json: the job was killed or is still running" + (
                f"; last log lines:\n{_tail(logs[0])}" if logs else "")
        jobs.append(Job(job_dir, status, preset, job_settings(overrides), seed, metrics, config, error))
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


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _mean_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for point in curve or []:
            by_step[int(point["step"])].append(float(point["loss"]))
    return [{"step": s, "loss": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_step.items())]


def aggregate(jobs: list[Job]) -> dict[str, Any]:
    """Group jobs by label; mean, std and n over the completed seeds of each group."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.label].append(job)
    out: dict[str, Any] = {}
    for label, members in groups.items():
        done = [j for j in members if j.status == "completed"]
        entry: dict[str, Any] = {
            "n": len(done),
            "n_failed": len(members) - len(done),
            "seeds": sorted((j.seed for j in done), key=str),
            "runs": [str(j.path) for j in members],
        }
        for key in AGGREGATED:
            mean, std = _mean_std([j.metrics.get(key) for j in done])
            entry[key] = {"mean": mean, "std": std, "values": [j.metrics.get(key) for j in done]}
        if done:
            first = done[0].metrics
            entry["params"] = first.get("params")
            entry["kv_cache_bytes_per_token"] = first.get("kv_cache_bytes_per_token")
            entry["attention"] = first.get("attention")
            entry["val_curve"] = _mean_curve([j.metrics.get("val_curve") for j in done])
            entry["train_curve"] = _mean_curve([j.metrics.get("train_curve") for j in done])
        reference = next((j.config.get("report_reference") for j in members if j.config.get("report_reference")), None)
        if isinstance(reference, dict):
            preset = label.split(" ", 1)[0]
            entry["reference_val_loss"] = reference.get(preset)
        out[label] = entry
    return out


def pareto_front(points: list[tuple[float, float]], maximize_x: bool = False) -> list[int]:
    """Indices of points not dominated when minimising y (loss) and minimising x (or maximising)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if i == j:
                continue
            better_x = x2 >= x if maximize_x else x2 <= x
            strictly = (x2 > x if maximize_x else x2 < x) or y2 < y
            if better_x and y2 <= y and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def _fmt(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if len(stat.get("values", [])) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def ranked(groups: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    def key(item):
        mean = item[1]["final_val_loss"]["mean"]
        return (mean is None, mean if mean is not None else 0.0, item[0])

    return sorted(groups.items(), key=key)


def markdown(groups: dict[str, Any], jobs: list[Job], sources: list[Path]) -> str:
    has_reference = any(g.get("reference_val_loss") is not None for g in groups.values())
    lines = ["# Results", "", "Sources: " + ", ".join(f"`{s}`" for s in sources), "",
             "Ranked by final validation loss (mean ± std over seeds; n = completed seeds).", ""]
    header = ["rank", "configuration", "n", "val loss", "val ppl", "test loss", "test ppl", "params (non-emb.)",
              "tokens/s", "KV bytes/token"]
    if has_reference:
        header.insert(4, "study val loss")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, (label, g) in enumerate(ranked(groups), 1):
        params = g.get("params") or {}
        non_emb = params.get("non_embedding")
        kv = g.get("kv_cache_bytes_per_token")
        row = [str(rank) if g["n"] else "-", f"`{label}`", f"{g['n']}" + (f" (+{g['n_failed']} failed)" if g["n_failed"] else ""),
               _fmt(g["final_val_loss"]), _fmt(g["final_val_ppl"], 2), _fmt(g["test_loss"]), _fmt(g["test_ppl"], 2),
               f"{non_emb:,}" if non_emb is not None else "-", _fmt(g["train_tokens_per_sec"], 0),
               f"{kv:,.0f}" if kv is not None else "-"]
        if has_reference:
            ref = g.get("reference_val_loss")
            row.insert(4, f"{ref:.3f}" if ref is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    failed = [j for j in jobs if j.status != "completed"]
    if failed:
        lines += ["", f"## Failed or incomplete jobs ({len(failed)})", ""]
        for job in failed:
            error = (job.error or "unknown error").strip().replace("\n", "\n    ")
            lines.append(f"- `{job.label}` seed {job.seed} ({job.status}) in `{job.path}`:\n    {error}")
    lines += ["", "KV bytes/token: the whole model's decoding cache per token at the model's context length "
              "(fp32), from the closed form that the test suite checks against the cache tensors.", ""]
    return "\n".join(lines)


def plot(groups: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    order = [label for label, g in ranked(groups) if g["n"]]
    colors = {label: plt.cm.tab20(i % 20) for i, label in enumerate(order)}
    for label in order:
        g = groups[label]
        for ax, curve in ((axes[0, 0], g.get("train_curve")), (axes[0, 1], g.get("val_curve"))):
            if curve:
                ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=label, color=colors[label],
                        marker="o" if ax is axes[0, 1] else None, markersize=3)
    for ax, title in ((axes[0, 0], "training loss"), (axes[0, 1], "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, ncol=2)

    def scatter(ax, x_of, xlabel, maximize_x, log_x):
        points, labels = [], []
        for label in order:
            x, y = x_of(groups[label]), groups[label]["final_val_loss"]["mean"]
            if x is not None and y is not None:
                points.append((x, y))
                labels.append(label)
        for (x, y), label in zip(points, labels):
            ax.scatter(x, y, color=colors[label], s=40, zorder=3)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if points:
            front = sorted((points[i] for i in pareto_front(points, maximize_x)), key=lambda p: p[0])
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front", zorder=2)
            ax.legend(fontsize=8)
        if log_x and points and all(p[0] > 0 for p in points):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss")
        ax.grid(alpha=0.3)

    scatter(axes[1, 0], lambda g: g.get("kv_cache_bytes_per_token"), "KV-cache bytes per token (lower is better)",
            False, False)
    axes[1, 0].set_title("quality vs KV-cache size")
    scatter(axes[1, 1], lambda g: g["train_tokens_per_sec"]["mean"], "training tokens/s (higher is better)", True, False)
    axes[1, 1].set_title("quality vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sources: list[str | Path], out_dir: str | Path | None = None, wandb: dict | None = None) -> dict[str, Any]:
    """Write the three report files for ``sources`` into ``out_dir`` (default: the first source)."""
    sources = [Path(s) for s in sources]
    out = Path(out_dir) if out_dir else sources[0]
    out.mkdir(parents=True, exist_ok=True)
    jobs = find_jobs(sources)
    groups = aggregate(jobs)
    result = {
        "sources": [str(s) for s in sources],
        "ranking": [label for label, g in ranked(groups) if g["n"]],
        "groups": groups,
        "failed": [{"label": j.label, "seed": j.seed, "status": j.status, "path": str(j.path), "error": j.error}
                   for j in jobs if j.status != "completed"],
    }
    write_json(out / "comprehensive_results.json", result)
    atomic_write_text(out / "results.md", markdown(groups, jobs, sources))
    plot(groups, out / "comparison.png")
    if wandb:
        log_to_wandb(result, out, **wandb)
    n_done = sum(g["n"] for g in groups.values())
    log.info("report: %d completed, %d failed or incomplete jobs -> %s", n_done, len(result["failed"]), out)
    return result


def log_to_wandb(result: dict[str, Any], out: Path, project: str = "attnlab", group: str | None = None,
                 offline: bool | None = None, **init_kwargs: Any) -> None:
    """Log the ranked table and the comparison image as a W&B run of the sweep's group."""
    import wandb

    from attnlab.loggers import wandb_has_credentials

    if offline is None:
        offline = not wandb_has_credentials()
    mode = os.environ.get("WANDB_MODE") or ("offline" if offline else "online")
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{group or out.name}",
                     dir=str(out), mode=mode, reinit="finish_previous", **init_kwargs)
    columns = ["rank", "configuration", "n", "val_loss_mean", "val_loss_std", "val_ppl", "test_loss", "params",
               "tokens_per_sec", "kv_bytes_per_token"]
    table = wandb.Table(columns=columns)
    for rank, label in enumerate(result["ranking"], 1):
        g = result["groups"][label]
        table.add_data(rank, label, g["n"], g["final_val_loss"]["mean"], g["final_val_loss"]["std"],
                       g["final_val_ppl"]["mean"], g["test_loss"]["mean"], (g.get("params") or {}).get("total"),
                       g["train_tokens_per_sec"]["mean"], g.get("kv_cache_bytes_per_token"))
    run.log({"report/results": table, "report/comparison": wandb.Image(str(out / "comparison.png"))})
    run.finish()


from hydra.experimental.callback import Callback as _HydraCallback  # noqa: E402


class ReportOnMultirunEnd(_HydraCallback):
    """Hydra callback (``hydra.callbacks``): write the report into the sweep directory when a
    multirun ends - also when some of its jobs failed."""

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
            write_report([sweep_dir], sweep_dir, wandb=wandb)
        except Exception:  # a report failure must not turn a finished sweep into a failed one
            log.exception("writing the sweep report failed; run scripts/report.py %s", sweep_dir)
