"""The comparison report's figures (matplotlib, Agg backend), drawn from the aggregated
configurations of :mod:`attnlab.report`.

Spread is always shown and always said: curves carry a band of ±1 std over seeds, final values
(scatter points, the metric against a swept setting) carry error bars of the 95% confidence
interval of the mean over seeds (t distribution). A configuration with one seed has neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(plt, labels: list[str]) -> dict[str, Any]:
    # tab20 pairs similar hues; only use it when tab10 runs out
    cmap, size = (plt.cm.tab10, 10) if len(labels) <= 10 else (plt.cm.tab20, 20)
    return {label: cmap(i % size) for i, label in enumerate(labels)}


def _band(ax, xs: list[float], means: list[float], stds: list[float | None], color: Any) -> None:
    """Shade mean ± std where the std is defined (two or more seeds at that point)."""
    points = [(x, m, s) for x, m, s in zip(xs, means, stds) if s is not None]
    if len(points) > 1:
        ax.fill_between([p[0] for p in points], [p[1] - p[2] for p in points], [p[1] + p[2] for p in points],
                        color=color, alpha=0.2, linewidth=0)


def _ci_error(summary: dict[str, Any]) -> list[list[float]]:
    """Asymmetric errorbar offsets of the 95% CI (zero where it is undefined)."""
    if summary.get("ci95") is None:
        return [[0.0], [0.0]]
    low, high = summary["ci95"]
    return [[summary["mean"] - low], [high - summary["mean"]]]


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


def comparison(groups: dict[str, Any], ranking: list[str], path: Path) -> None:
    """``comparison.png``: training and validation curves (mean, ±1 std band), and final validation
    loss against KV-cache bytes and against throughput (95% CI error bars, Pareto fronts)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    order = ranking + [label for label in groups if label not in ranking]
    colors = _colors(plt, order)
    for label in order:
        curves = groups[label]["curves"]
        for ax, curve, marker in ((axes[0, 0], curves["train_loss"], None), (axes[0, 1], curves["val_loss"], "o")):
            if curve["steps"]:
                ax.plot(curve["steps"], curve["mean"], label=label, color=colors[label], marker=marker, markersize=3)
                _band(ax, curve["steps"], curve["mean"], curve["std"], colors[label])
    for ax, title in ((axes[0, 0], "training loss"), (axes[0, 1], "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{title} (mean over seeds, band: ±1 std)")
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, ncol=2)

    def scatter(ax, x_of, xlabel, maximize_x):
        points, labels = [], []
        for label in ranking:
            x, y = x_of(groups[label]), groups[label]["final_loss"]
            if x is not None:
                points.append((x, y))
                labels.append(label)
        for (x, y), label in zip(points, labels):
            g = groups[label]
            x_stat = g["statistics"].get("train_tokens_per_sec") if maximize_x else None
            ax.errorbar(x, y, yerr=_ci_error(g["statistics"]["final_val_loss"]),
                        xerr=_ci_error(x_stat) if x_stat else None, fmt="o", color=colors[label], markersize=6,
                        capsize=3, zorder=3)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if points:
            front = sorted((points[i] for i in pareto_front(points, maximize_x)), key=lambda p: p[0])
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front (means)", zorder=2)
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss (error bars: 95% CI)")
        ax.grid(alpha=0.3)

    scatter(axes[1, 0], lambda g: g.get("kv_cache_bytes_per_token"), "KV-cache bytes per token (lower is better)",
            False)
    axes[1, 0].set_title("quality vs KV-cache size")
    scatter(axes[1, 1], lambda g: g["statistics"].get("train_tokens_per_sec", {}).get("mean"),
            "training tokens/s (higher is better; error bars: 95% CI)", True)
    axes[1, 1].set_title("quality vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_by_position(groups: dict[str, Any], ranking: list[str], path: Path) -> bool:
    """``loss_by_position.png``: validation loss per position bucket (log x), one line per
    configuration, ±1 std band over seeds. Returns False (and draws nothing) when no run has
    ``val_loss_by_position``."""
    order = [label for label in ranking + [label for label in groups if label not in ranking]
             if groups[label].get("val_loss_by_position")]
    if not order:
        return False
    plt = _pyplot()
    colors = _colors(plt, order)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label in order:
        record = groups[label]["val_loss_by_position"]
        # a bucket [2^k, 2^(k+1) - 1] is drawn at its first position, 2^k
        points = [(lo, m, s) for (lo, _), m, s in
                  zip(record["positions"], record["loss"]["mean"], record["loss"]["std"]) if m is not None]
        xs, means, stds = ([p[i] for p in points] for i in range(3))
        ax.plot(xs, means, marker="o", markersize=3, label=label, color=colors[label])
        _band(ax, xs, means, stds, colors[label])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the evaluation window (tokens of context): bucket [p, 2p - 1] drawn at p")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss by position (mean over seeds, band: ±1 std)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def metric_vs_setting(sweep: dict[str, Any], path: Path, metric_name: str) -> None:
    """``metric_vs_<setting>.png``: the sweep's primary metric against the swept setting, one line
    per attention preset, 95% CI error bars over seeds."""
    plt = _pyplot()
    presets = list(sweep["series"])
    colors = _colors(plt, presets)
    fig, ax = plt.subplots(figsize=(7, 5))
    xs_all = []
    for preset in presets:
        points = [p for p in sweep["series"][preset] if p["mean"] is not None]
        xs = [p["value"] for p in points]
        xs_all += xs
        low = [p["mean"] - p["ci95"][0] if p["ci95"] else 0.0 for p in points]
        high = [p["ci95"][1] - p["mean"] if p["ci95"] else 0.0 for p in points]
        ax.errorbar(xs, [p["mean"] for p in points], yerr=[low, high], marker="o", capsize=3, label=preset,
                    color=colors[preset])
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(sweep["setting"])
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} vs {sweep['setting']} (mean over seeds, error bars: 95% CI)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
