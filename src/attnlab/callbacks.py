"""Callbacks that read the mechanisms' statistics channel.

Mechanisms record per-layer statistics with ``ctx.record`` (only on the steps a callback asks
for, so ordinary steps pay nothing): 0-d tensors are scalars to log (``layer0/gate_mean/mha``,
``layer1/head_frequency/3``, ``layer0/aux/load_balance``...), and ``gates`` / ``head_active``
``(B, T, n)`` tensors describe each token's routing.

* :class:`RouterStatistics` logs the scalars to every logger (CSV, TensorBoard, W&B) every
  ``every_n_steps`` steps, and on W&B adds histograms of the routing tensors and a per-layer
  heatmap image.
* :class:`RoutingAnalysis` runs once at the end of fitting: which tokens prefer which scheme
  (or head), by token-frequency bucket, with the top tokens of each - a table, a JSON and a plot
  in the run directory (and on W&B when it is on).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from attnlab.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

#: Recorded ``(B, T, n)`` routing tensors and what their last axis means.
ROUTING_TENSORS = ("gates", "head_active")
_LAYER_KEY = re.compile(r"^layer(\d+)/(.+)$")


def _wandb_loggers(trainer: Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def routing_labels(pl_module: LightningModule, layer: int, path: str, width: int) -> list[str]:
    """Names for the last axis of a routing tensor: MoAS branch names, or routed head indices."""
    module: Any = pl_module.model.blocks[layer].attn
    names = getattr(module, "branch_names", None)
    if "/" not in path and names is not None and len(names) == width:
        return list(names)
    return [f"head{j}" for j in range(width)]


def heatmap_figure(matrix: np.ndarray, row_labels: list[str], col_labels: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(col_labels), 1.0 + 0.5 * len(row_labels)))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


class RouterStatistics(Callback):
    """Log routing statistics of every layer every ``every_n_steps`` training steps.

    Args:
        every_n_steps: how often to record (one step's statistics each time).
        histograms: on W&B, also log histograms of gates / head activations and a heatmap image.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True):
        self.every_n_steps = max(1, every_n_steps)
        self.histograms = histograms
        self.enabled = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        pl_module.record_stats = self.enabled and trainer.global_step % self.every_n_steps == 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not pl_module.record_stats:
            return
        pl_module.record_stats = False
        stats = pl_module.last_stats or {}
        scalars = {k: v for k, v in stats.items() if v.ndim == 0}
        if not stats:  # nothing in this model records statistics: stop asking
            self.enabled = False
            return
        for key, value in scalars.items():
            pl_module.log(f"router/{key}", value.float(), on_step=True, on_epoch=False)
        if self.histograms and trainer.is_global_zero:
            self._log_wandb(trainer, pl_module, stats, scalars)

    def _log_wandb(self, trainer: Trainer, pl_module: LightningModule, stats: dict, scalars: dict) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        import matplotlib.pyplot as plt
        import wandb

        payload: dict[str, Any] = {}
        for key, value in stats.items():
            if value.ndim >= 2 and key.rsplit("/", 1)[-1] in ROUTING_TENSORS:
                flat = value.float().reshape(-1, value.shape[-1]).cpu().numpy()
                match = _LAYER_KEY.match(key)
                labels = routing_labels(pl_module, int(match.group(1)), match.group(2), flat.shape[1]) if match else []
                for j, label in enumerate(labels):
                    payload[f"router_hist/{key}/{label}"] = wandb.Histogram(flat[:, j])
        for family, (matrix, rows, cols) in per_layer_matrices(scalars).items():
            fig = heatmap_figure(matrix, rows, cols, family)
            payload[f"router_heatmap/{family}"] = wandb.Image(fig)
            plt.close(fig)
        if payload:
            for logger in loggers:
                logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})


def per_layer_matrices(scalars: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, list[str], list[str]]]:
    """Group ``layer{i}/<path>/<family>/<name>`` scalars into ``layers x names`` matrices per family
    (``gate_mean``, ``top1_share``, ``head_frequency``)."""
    cells: dict[str, dict[tuple[int, str], float]] = defaultdict(dict)
    for key, value in scalars.items():
        match = _LAYER_KEY.match(key)
        if not match:
            continue
        parts = match.group(2).split("/")
        if len(parts) >= 2 and parts[-2] in ("gate_mean", "top1_share", "head_frequency"):
            family = "/".join(parts[:-1])
            cells[family][(int(match.group(1)), parts[-1])] = float(value)
    out = {}
    for family, values in cells.items():
        layers = sorted({layer for layer, _ in values})
        names = sorted({name for _, name in values}, key=lambda n: (len(n), n))
        matrix = np.array([[values.get((layer, n), np.nan) for n in names] for layer in layers])
        out[family] = (matrix, [f"layer{layer}" for layer in layers], names)
    return out


class RoutingAnalysis(Callback):
    """At the end of fitting: which tokens prefer which scheme (MoAS) or routed head (MoH).

    Runs the trained model over up to ``max_tokens`` validation tokens, collects every token's
    gates per layer, and relates them to the token's frequency in the training split:
    the average gate per scheme in ``n_buckets`` frequency buckets (rare -> common) and the
    ``top_tokens`` tokens with the highest average gate for each scheme (among tokens seen at least
    ``min_count`` times). Writes ``routing_analysis.{json,md,png}`` to ``output_dir``.
    """

    def __init__(self, output_dir: str, max_tokens: int = 16384, n_buckets: int = 4, top_tokens: int = 10,
                 min_count: int = 5):
        self.output_dir = Path(output_dir)
        self.max_tokens, self.n_buckets, self.top_tokens, self.min_count = max_tokens, n_buckets, top_tokens, min_count
        self.result: dict[str, Any] | None = None

    @torch.no_grad()
    def collect(self, pl_module: LightningModule, datamodule) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Token ids ``(N,)`` and, per routing tensor key, its values ``(N, n)`` over validation tokens."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        tokens, routed = [], defaultdict(list)
        seen = 0
        try:
            for x, _ in datamodule.val_dataloader():
                x = x.to(pl_module.device)
                out = model(x, record_stats=True, last_only=True)
                for key, value in (out.stats or {}).items():
                    if key.rsplit("/", 1)[-1] in ROUTING_TENSORS and value.ndim == 3:
                        routed[key].append(value.float().reshape(-1, value.shape[-1]).cpu().numpy())
                tokens.append(x.reshape(-1).cpu().numpy())
                seen += x.numel()
                if seen >= self.max_tokens:
                    break
        finally:
            model.train(was_training)
        return np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64), {k: np.concatenate(v) for k, v in routed.items()}

    def analyse(self, token_ids: np.ndarray, routed: dict[str, np.ndarray], train_tokens: np.ndarray,
                labels: dict[str, list[str]], decode) -> dict[str, Any]:
        """Gate statistics by frequency bucket and top tokens per scheme (pure function, testable)."""
        vocab = int(max(token_ids.max(initial=0), train_tokens.max(initial=0))) + 1
        frequency = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab)
        token_freq = frequency[token_ids]
        # buckets by training frequency quantiles of the analysed tokens: bucket 0 = rarest
        edges = np.quantile(token_freq, np.linspace(0, 1, self.n_buckets + 1)[1:-1]) if len(token_freq) else []
        bucket = np.searchsorted(edges, token_freq, side="left")  # a value equal to an edge goes below it
        result: dict[str, Any] = {"n_tokens": int(len(token_ids)), "bucket_edges": [float(e) for e in edges], "layers": {}}
        for key, values in routed.items():
            names = labels[key]
            by_bucket = []
            for b in range(self.n_buckets):
                rows = values[bucket == b]
                by_bucket.append({
                    "bucket": b,
                    "n_tokens": int(len(rows)),
                    "train_freq_range": [int(token_freq[bucket == b].min()), int(token_freq[bucket == b].max())] if len(rows) else None,
                    "mean_gate": {n: float(rows[:, j].mean()) if len(rows) else None for j, n in enumerate(names)},
                })
            counts = np.bincount(token_ids, minlength=vocab)
            sums = np.zeros((vocab, values.shape[1]))
            np.add.at(sums, token_ids, values)
            frequent = np.flatnonzero(counts >= self.min_count)
            means = sums[frequent] / counts[frequent, None]
            top = {}
            for j, name in enumerate(names):
                order = frequent[np.argsort(-means[:, j], kind="stable")][: self.top_tokens]
                top[name] = [{"token": decode([int(t)]), "id": int(t), "mean_gate": float(sums[t, j] / counts[t]),
                              "count": int(counts[t]), "train_freq": int(frequency[t])} for t in order]
            result["layers"][key] = {"labels": names, "by_frequency": by_bucket, "top_tokens": top,
                                     "mean_gate": {n: float(values[:, j].mean()) for j, n in enumerate(names)}}
        return result

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not trainer.is_global_zero:
            return
        if getattr(pl_module, "diverged_at_step", None) is not None:
            return  # gates of non-finite weights say nothing
        token_ids, routed = self.collect(pl_module, datamodule)
        if not routed:
            return  # no routed mechanism in this model
        labels = {}
        for key, values in routed.items():
            match = _LAYER_KEY.match(key)
            labels[key] = routing_labels(pl_module, int(match.group(1)), match.group(2), values.shape[1]) if match else \
                [str(j) for j in range(values.shape[1])]
        try:
            decode = datamodule.tokenizer.decode
        except Exception:  # the tokenizer files may be gone; ids still identify tokens
            decode = lambda ids: f"<{ids[0]}>"  # noqa: E731
        self.result = self.analyse(token_ids, routed, np.asarray(datamodule.prepare_corpus().splits["train"]), labels, decode)
        self.write(self.result, trainer)

    def write(self, result: dict[str, Any], trainer: Trainer | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "routing_analysis.json", result)
        lines = [f"# Routing analysis ({result['n_tokens']} validation tokens)", "",
                 "Average gate per scheme (MoAS `gates`) or activation frequency per routed head (MoH "
                 "`head_active`), by the token's frequency in the training split (bucket 0 = rarest).", ""]
        layers = result["layers"]
        fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.6), squeeze=False)
        for ax, (key, data) in zip(axes[0], layers.items()):
            names = data["labels"]
            lines += [f"## {key}", "", "| bucket | train freq | tokens | " + " | ".join(names) + " |",
                      "|---|---|---|" + "---|" * len(names)]
            for row in data["by_frequency"]:
                freq = "-" if row["train_freq_range"] is None else f"{row['train_freq_range'][0]}-{row['train_freq_range'][1]}"
                gates = " | ".join("-" if row["mean_gate"][n] is None else f"{row['mean_gate'][n]:.3f}" for n in names)
                lines.append(f"| {row['bucket']} | {freq} | {row['n_tokens']} | {gates} |")
            lines += ["", "Tokens with the highest average value, per column:", ""]
            for name in names:
                shown = ", ".join(f"`{t['token']!r}` ({t['mean_gate']:.2f})" for t in data["top_tokens"][name])
                lines.append(f"- **{name}**: {shown}")
            lines.append("")
            width = 0.8 / len(names)
            for j, name in enumerate(names):
                values = [row["mean_gate"][name] or 0.0 for row in data["by_frequency"]]
                ax.bar(np.arange(len(values)) + j * width, values, width, label=name)
            ax.set_xticks(np.arange(len(data["by_frequency"])) + 0.4 - width / 2,
                          [f"b{row['bucket']}" for row in data["by_frequency"]])
            ax.set_xlabel("training frequency bucket (rare -> common)")
            ax.set_ylabel("mean gate")
            ax.set_title(key, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.output_dir / "routing_analysis.png", dpi=110)
        plt.close(fig)
        atomic_write_text(self.output_dir / "routing_analysis.md", "\n".join(lines))
        if trainer is not None:
            for logger in _wandb_loggers(trainer):
                import wandb

                table = wandb.Table(columns=["layer", "bucket", "scheme", "mean_gate"])
                for key, data in layers.items():
                    for row in data["by_frequency"]:
                        for name, gate in row["mean_gate"].items():
                            table.add_data(key, row["bucket"], name, gate)
                logger.experiment.log({"routing_analysis/table": table,
                                       "routing_analysis/plot": wandb.Image(str(self.output_dir / "routing_analysis.png"))})
