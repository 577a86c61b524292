"""The benchmark's tables, (title, header, rows): printed to the terminal and written to ``bench.md``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from attnlab.io import atomic_write_text

Table = tuple[str, list[str], list[list[str]]]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _rate(entry: dict[str, Any]) -> str:
    if entry.get("tokens_per_s") is None:
        return "error" if entry.get("error") else "-"
    return f"{_num(entry['tokens_per_s'])} ({_num(entry['tokens_per_s_min'])}-{_num(entry['tokens_per_s_max'])})"


def _compiled_rate(entry: dict[str, Any] | None, eager: dict[str, Any] | None) -> str:
    """``tokens/s (min-max), x speedup, graphs + recompiles``, or why there is none."""
    if entry is None:
        return "-"
    if entry.get("tokens_per_s") is None:
        return "n/a" if (entry.get("error") or "").startswith("no static decoding step") else "error"
    cell = _rate(entry)
    if eager and eager.get("tokens_per_s"):
        cell += f", {entry['tokens_per_s'] / eager['tokens_per_s']:.2f}x"
    return cell + f", {entry['graphs_compiled']}+{entry['recompiles']} graphs"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def timed_decode_entries(mechanisms: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(label, "eager" | "compiled", entry)`` of every decoding entry that was timed."""
    for label, m in mechanisms.items():
        for kind, entries in (("eager", m["decode"]), ("compiled", m.get("decode_compiled") or [])):
            yield from ((label, kind, e) for e in entries if e.get("ms_per_token") is not None)


def mechanism_tables(result: dict[str, Any]) -> list[Table]:
    """The benchmark's tables: (title, header, rows)."""
    mechanisms = result["mechanisms"]
    lengths = sorted({e["seq_len"] for m in mechanisms.values() for e in m["train"]})
    decode_lengths = sorted({e["context_len"] for m in mechanisms.values() for e in m["decode"]})
    tables: list[Table] = []

    def by_length(entries: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
        return {e[key]: e for e in entries}

    def rows_by_length(section: str, key: str, at: list[int], cell: Callable[[dict[str, Any]], str]) -> list[list[str]]:
        """One row per mechanism: its label, then ``cell(entry)`` of its ``section`` entry at each
        length of ``at`` ("-" where it has none)."""
        rows = []
        for label, m in mechanisms.items():
            entries = by_length(m[section], key)
            rows.append([label, *(cell(entries[L]) if L in entries else "-" for L in at)])
        return rows

    def flops_and_mfu(e: dict[str, Any]) -> str:
        if e["flops_per_token"] is None:
            return "-"
        mfu = "-" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
        return f"{e['flops_per_token'] / 1e6:,.1f} / {mfu}"

    def cache_bytes(e: dict[str, Any]) -> str:
        if e["error"]:
            return "error"
        cell = f"{_num(e['measured_bytes_per_token'], 1)} / {_num(e['closed_form_bytes_per_token'], 1)}"
        if e["used_bytes_per_token"] is not None:
            cell += f" (used {_num(e['used_bytes_per_token'], 1)})"
        return cell

    header = ["mechanism", *(f"T={L}" for L in lengths)]
    tables.append(("Training tokens/s, median (min-max)", header, rows_by_length("train", "seq_len", lengths, _rate)))
    tables.append(("Peak training memory (MiB)", header,
                   rows_by_length("train", "seq_len", lengths, lambda e: _mib(e["peak_memory_bytes"]))))
    tables.append(("Model MFLOPs per training token / MFU", header,
                   rows_by_length("train", "seq_len", lengths, flops_and_mfu)))

    compiled_lengths = sorted({e["context_len"] for m in mechanisms.values() for e in m.get("decode_compiled") or []})
    rows = []
    for label, m in mechanisms.items():
        decode = by_length(m["decode"], "context_len")
        compiled = by_length(m.get("decode_compiled") or [], "context_len")
        cells = [_rate(decode[L]) if L in decode else "-" for L in decode_lengths]
        cells += [_compiled_rate(compiled.get(L), decode.get(L)) for L in compiled_lengths]
        rows.append([label, *cells])
    tables.append(("Decode tokens/s with the cache, median (min-max)" + (
        "; compiled: the static step under torch.compile, x = compiled / eager, graphs compiled + recompiles"
        if compiled_lengths else ""),
                   ["mechanism", *(f"context {L}" for L in decode_lengths),
                    *(f"compiled, context {L}" for L in compiled_lengths)], rows))
    timed = list(timed_decode_entries(mechanisms))
    rows = [[label, kind, str(e["context_len"]), _num(e["ms_per_token"], 3), _num(e["step_bytes"] / 2**20, 2),
             _num(e["step_read_ms"], 3), _num(e["x_step_read"], 1)]
            for label, kind, e in timed if e.get("x_step_read") is not None]
    if rows:
        tables.append(("Decode ms per token against reading the step's bytes once (the weights that multiply "
                       "the token and the cache at that context, timed as a streaming read on this machine)",
                       ["mechanism", "decoding", "context", "ms per token", "MiB read", "read ms", "x the read"],
                       rows))
    lm_head = result.get("lm_head")
    if lm_head and lm_head.get("read_ms") is not None:
        rows = [[label, kind, str(e["context_len"]), _num(e["ms_per_token"], 3),
                 _num(e["ms_per_token"] / lm_head["read_ms"], 1), _num(e["ms_per_token"] / lm_head["cold_read_ms"], 1)]
                for label, kind, e in timed]
        tables.append((f"Decode ms per token against one read of the LM head's weights "
                       f"({lm_head['bytes'] / 2**20:,.1f} MiB: {lm_head['read_ms']:.3f} ms from the cache, "
                       f"{lm_head['read_gb_per_s']:.1f} GB/s; {lm_head['cold_read_ms']:.3f} ms from memory, "
                       f"{lm_head['cold_read_gb_per_s']:.1f} GB/s; its matvec {lm_head['matvec_ms']:.3f} ms)",
                       ["mechanism", "decoding", "context", "ms per token", "x the read", "x the read from memory"],
                       rows))

    tables.append(("Cache bytes per token: measured / closed form",
                   ["mechanism", *(f"context {L}" for L in decode_lengths)],
                   rows_by_length("cache", "context_len", decode_lengths, cache_bytes)))

    parts = ["total", "non_embedding", "attention", "feed_forward", "embeddings"]
    rows = [[label, *(_num((m["params"] or {}).get(p)) for p in parts)] for label, m in mechanisms.items()]
    tables.append(("Parameters", ["mechanism", *parts], rows))
    return tables


def reference_tables(reference: dict[str, Any]) -> list[Table]:
    rows = []
    for r in reference["runs"]:
        rows.append([r["name"], "error: " + r["error"] if r["error"] else _rate(r), _num(r["step_ms"], 1),
                     _mib(r["peak_memory_bytes"])])
    tables: list[Table] = [("Training path against a bare PyTorch loop",
                            ["run", "tokens/s, median (min-max)", "step ms", "peak MiB"], rows)]
    rows = [[r["name"], r["versus"], _num(r["tokens_per_s_ratio"], 3), _num(r["peak_memory_ratio"], 3)]
            for r in reference["ratios"]]
    tables.append(("Ratios (attnlab / bare loop)", ["run", "versus", "tokens/s ratio", "peak memory ratio"], rows))
    rows = [[f"{r['path']}{' + compile' if r['compile'] else ''}", f"{r['dropout']:g} vs {r['versus_dropout']:g}",
             _num(r["tokens_per_s_ratio"], 3), _num(r["peak_memory_ratio"], 3)] for r in reference["dropout_effect"]]
    tables.append(("Dropout effect", ["path", "dropout", "tokens/s ratio", "peak memory ratio"], rows))
    return tables


def machine_table(machine: dict[str, Any], settings: dict[str, Any]) -> Table:
    peaks = machine["matmul_peak_gflops"]
    rows = [["device", machine["device_name"] + f" ({machine['device']})"],
            ["torch", machine["torch_version"]],
            ["threads", str(machine["threads"])],
            ["precision", settings["precision"]],
            ["fp32 matmul peak", f"{_num(peaks.get('float32'), 1)} GFLOP/s ({machine['float32_matmul_precision']})"],
            ["bf16 matmul peak", f"{_num(peaks.get('bfloat16'), 1)} GFLOP/s"],
            ["matmul size", str(machine["matmul_size"])],
            ["timed calls", f"{settings.get('rounds', 1)} round(s) x {settings['repeats']} after {settings['warmup']} "
                            "untimed"]]
    return ("Machine", ["", ""], rows)


def markdown_table(table: Table) -> str:
    title, header, rows = table
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


NOTES = """\
## Notes

- Timing: `warmup` untimed calls, then `repeats` timed ones; median with (min-max) over repeats.
  With `rounds` > 1 every mechanism is timed once per round, round after round over all of them,
  and the figures pool the `rounds x repeats` timed calls (memory, FLOPs and cache from round 1).
- Peak memory runs in a separate, untimed step: `torch.cuda.max_memory_allocated` on CUDA; on CPU
  the peak of live tensor bytes (parameters, gradients, AdamW states and every intermediate),
  tracked op by op. Kernel-internal scratch buffers are not visible to that tracker.
- FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over one training step
  (forward + backward): the FLOPs the implementation executes. A fused causal kernel counts the
  `T (T + 1) / 2` scores it computes; explicitly masked paths count the whole `T x S` product, so
  FLOPs and MFU can exceed the algorithmic minimum. MFU = FLOPs/token x tokens/s / measured matmul peak
  (bf16 peak for bf16-mixed, fp32 otherwise).
- Cache bytes per token: the cache tensors' bytes after `L` tokens with `init_cache(1, L)`, over `L`,
  next to the mechanism's closed form `cache_bytes(1, L) / L`.
- Compiled decoding (`bench.decode_compile=true`): `GPT.step(compile=True)` after a fresh
  `torch._dynamo.reset()`; its first step (tracing and compiling, from inductor's on-disk cache
  when warm) is timed apart as `compile_s`; graphs counted by dynamo (`unique_graphs`): those
  compiled by the first step and those compiled during the next `decode_steps` steps, guards checked
  (recompiles, 0 when every position ran the same graph); the timed steps then trust the guards
  (`trust_guards=True`, as `generate(compile=True)` does after its first step). `n/a`: the mechanism has no static step (the reason is listed under Errors).
- Step read: every decoding entry beside the time to read the bytes its step must read at least
  once (the weights that multiply the token, i.e. attention, feed-forward, norms and the LM
  head's `V x C`, and the mechanism's cache at that context by its closed form), timed as a
  `sum` over a buffer that size read over and over, as decoding rereads them at every token:
  `x the read` is how far a step is from reading its bytes at this machine's streaming speed.
- LM head read: the LM head's weights summed (a streaming read) and its one-token matvec, on a
  weight read over and over (so from the last-level cache when it fits) and, "from memory", after
  writing 256 MiB elsewhere: the floor of a step, from the cache or from memory.
"""


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    parts = ["# attnlab efficiency benchmark", "",
             f"Model `{result['settings']['model'].get('name')}`; {result['settings']['precision']}; "
             f"{result['machine']['device_name']}.", "",
             markdown_table(machine_table(result["machine"], result["settings"]))]
    if result.get("mechanisms"):
        parts += [markdown_table(t) for t in mechanism_tables(result)]
    if result.get("reference"):
        parts += [markdown_table(t) for t in reference_tables(result["reference"])]
    errors = [(label, m["error"] or e["error"]) for label, m in (result.get("mechanisms") or {}).items()
              for e in [*m["train"], *m["decode"], *(m.get("decode_compiled") or []), *m["cache"]] if e["error"]]
    if errors:
        parts += ["## Errors", ""] + [f"- `{label}`: {error}" for label, error in dict.fromkeys(errors)] + [""]
    parts.append(NOTES)
    atomic_write_text(path, "\n".join(parts))


def print_tables(tables: list[Table]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    for title, header, rows in tables:
        table = RichTable(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
