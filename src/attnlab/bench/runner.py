"""The benchmark run: settings, machine, every mechanism (or the reference comparison), then
``bench.json``, ``bench.md``, the plots and the tables on the terminal."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from attnlab.bench.decoding import LM_HEAD_FIELDS, measure_lm_head
from attnlab.bench.harness import attempt
from attnlab.bench.mechanisms import bench_mechanism, measurements_per_mechanism, mechanisms_to_run, pool_rounds
from attnlab.bench.plots import write_plots
from attnlab.bench.reference import reference_run_count, run_reference
from attnlab.bench.settings import load_settings, pick_device
from attnlab.bench.tables import machine_table, mechanism_tables, print_tables, reference_tables, write_markdown
from attnlab.config import import_modules, to_container
from attnlab.io import write_json
from attnlab.profiling import machine_info, set_threads

log = logging.getLogger("attnlab.bench")


def _hydra_choice(group: str) -> str | None:
    """The option chosen for a config group (``attention=gqa_2`` -> ``gqa_2``), outside Hydra None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except (ImportError, ValueError):
        return None


def run(cfg: Any) -> dict[str, Any]:
    """Benchmark the configured mechanisms (or the reference comparison); write ``bench.json``,
    ``bench.md`` and the plots into the run directory; return the result."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.time()
    import_modules(to_container(cfg.get("imports")))  # the user's mechanisms register themselves first
    settings, model_values, optim = load_settings(cfg)
    device = pick_device(settings)
    threads = set_threads(settings.threads)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    precision = settings.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("benchmarking on %s with %d threads, %s", device, threads, precision)

    machine = machine_info(device, settings.matmul_size, settings.matmul_repeats)
    peak = machine["matmul_peak_gflops"]["bfloat16" if precision == "bf16-mixed" else "float32"]
    result: dict[str, Any] = {
        "status": "running",
        "machine": machine,
        "settings": {**dataclasses.asdict(settings), "precision": precision, "model": model_values,
                     "optim": dataclasses.asdict(optim), "argv": sys.argv[1:]},
        "mechanisms": {},
        "lm_head": None,
        "reference": None,
        "notes": {"flops": "FLOPs the implementation executes (FlopCounterMode over forward+backward); fused causal "
                           "kernels count their triangle, explicitly masked paths the whole T x S product, so "
                           "they can exceed the algorithmic minimum",
                  "peak_memory": "cuda: max_memory_allocated; cpu: peak of live tensor bytes (parameters, "
                                 "gradients and optimizer states included), untimed pass"},
    }

    attention = to_container(cfg.get("attention"))  # the optional `attention=<preset>` group
    mechanisms = {} if settings.reference else mechanisms_to_run(settings, model_values, attention,
                                                                  _hydra_choice("attention"))
    total = (reference_run_count(settings) if settings.reference
             else (measurements_per_mechanism(settings) + (settings.rounds - 1)
                   * measurements_per_mechanism(settings, timing_only=True)) * len(mechanisms))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("benchmark", total=total)
        done = -1

        def advance(description: str) -> None:
            """Name the measurement starting now (the previous one is done)."""
            nonlocal done
            done += 1
            progress.update(task, completed=done, description=description)

        if settings.reference:
            result["reference"] = run_reference(model_values, optim, settings, device, precision, advance)
        elif mechanisms:
            result["lm_head"] = attempt(LM_HEAD_FIELDS, {}, device, partial(measure_lm_head, model_values, settings,
                                                                            device))
        for round_index in range(settings.rounds):  # round by round over every mechanism (bench.rounds)
            for label, attention in mechanisms.items():
                later = round_index > 0
                where = f"round {round_index + 1}/{settings.rounds}, {label}" if settings.rounds > 1 else label
                measured = bench_mechanism(label, attention, model_values, optim, settings, device, precision,
                                           peak, lambda what: advance(what.replace(label, where, 1)), later)
                mechanisms_done = result["mechanisms"]
                mechanisms_done[label] = pool_rounds(mechanisms_done[label], measured, peak) if later else measured
                write_json(out_dir / "bench.json", result)  # partial results survive an interruption
        progress.update(task, completed=total, description="done")

    result["status"] = "completed"
    result["wall_time_s"] = time.time() - started
    write_json(out_dir / "bench.json", result)
    write_markdown(out_dir / "bench.md", result)
    tables = [machine_table(machine, result["settings"])]
    if result["mechanisms"]:
        tables += mechanism_tables(result)
        if settings.plots:
            write_plots(out_dir, result["mechanisms"])
    if result["reference"]:
        tables += reference_tables(result["reference"])
    print_tables(tables)
    log.info("results in %s", out_dir)
    return result
