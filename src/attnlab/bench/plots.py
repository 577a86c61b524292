"""The benchmark's plots: training throughput and peak memory, and decoding throughput, against
the context length."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(out_dir: Path, mechanisms: dict[str, Any]) -> list[Path]:
    """``throughput.png``, ``memory.png`` (training, vs context length) and ``decode.png``; log-log,
    one line per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    specs = [("throughput.png", "train", "seq_len", "tokens_per_s", "training tokens/s"),
             ("memory.png", "train", "seq_len", "peak_memory_bytes", "peak training memory (MiB)"),
             ("decode.png", "decode", "context_len", "tokens_per_s", "decode tokens/s")]
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    written = []
    for filename, section, x_key, y_key, ylabel in specs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        lengths: set[int] = set()
        for i, (label, m) in enumerate(mechanisms.items()):
            series = [(section, label, "-")]
            if section == "decode":
                series.append(("decode_compiled", f"{label} (compiled)", "--"))
            for key, name, style in series:
                points = sorted((e[x_key], e[y_key]) for e in m.get(key) or [] if e.get(y_key) is not None)
                if not points:
                    continue
                xs, ys = zip(*points)
                lengths.update(xs)
                if y_key == "peak_memory_bytes":
                    ys = [y / 2**20 for y in ys]
                ax.plot(xs, ys, style, marker=markers[i % len(markers)],
                        color=colors[(2 * i) % 20 + (2 * i // 20) % 2], label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if lengths:
            ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        plt.close(fig)
        written.append(out_dir / filename)
    return written
