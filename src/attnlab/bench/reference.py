"""``bench.reference=true``: attnlab's training path (LitLM under a Lightning Trainer, chunked
loss) against the bare PyTorch loop a researcher would write over the same model (plain
cross-entropy), each at every dropout, attnlab's also under ``torch.compile``."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from attnlab.attention import resolve_layer_attention
from attnlab.bench.harness import NOT_MEASURABLE_COMPILED, attempt, autocast, throughput
from attnlab.bench.settings import BenchSettings, bench_model_config, warmup_steps
from attnlab.config import OptimConfig
from attnlab.model import GPT
from attnlab.profiling import PeakMemoryProbe, state_tensors, summarize, synchronize, time_calls

REFERENCE_FIELDS = ("name", "path", "dropout", "compile", "batch_size", "seq_len", "tokens_per_s",
                    "tokens_per_s_min", "tokens_per_s_max", "step_ms", "step_ms_iqr", "peak_memory_bytes",
                    "peak_memory_method", "error")


def random_token_batches(vocab_size: int, batch_size: int, seq_len: int, steps: int) -> DataLoader:
    """``steps`` batches ``(x, y)``, each ``(B, T)``: the training split's sampler
    (:class:`attnlab.data.RandomWindows`) over a stream of random tokens."""
    from attnlab.data import RandomWindows  # imports Lightning: only when a reference is measured

    stream = np.random.default_rng(0).integers(vocab_size, size=max(1 << 20, seq_len + 2))
    return DataLoader(RandomWindows(stream, seq_len, seed=0, length=steps * batch_size), batch_size=batch_size)


def fused_adamw_available(device: torch.device) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def reference_name(path: str, dropout: float, compiled: bool) -> str:
    return f"{'bare loop' if path == 'bare' else 'attnlab'}{' + compile' if compiled else ''}, dropout {dropout:g}"


def _reference_entry(path: str, dropout: float, compiled: bool, batch_size: int, seq_len: int,
                     seconds: list[float], peak: int | None, method: str) -> dict[str, Any]:
    stats = summarize(seconds)
    entry = dict.fromkeys(REFERENCE_FIELDS)
    entry.update(throughput(batch_size * seq_len, stats), name=reference_name(path, dropout, compiled), path=path,
                 dropout=dropout, compile=compiled, batch_size=batch_size, seq_len=seq_len,
                 step_ms=1e3 * stats["median"], step_ms_iqr=1e3 * stats["iqr"], peak_memory_bytes=peak,
                 peak_memory_method=method)
    return entry


def measure_bare_loop(model_values: dict[str, Any], optim: OptimConfig, dropout: float, settings: BenchSettings,
                      device: torch.device, precision: str) -> dict[str, Any]:
    """The loop a researcher would write: ``GPT`` with the plain cross-entropy over full logits
    (``loss_chunk_size=0``), ``AdamW(fused=True)`` where available, gradient clipping, random
    windows; no Lightning, no Hydra."""
    B, T = settings.reference_batch_size, settings.reference_seq_len
    cfg = bench_model_config({**model_values, "dropout": dropout, "loss_chunk_size": 0}, T)
    torch.manual_seed(0)
    model = GPT(cfg, resolve_layer_attention("mha", cfg)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay, fused=fused_adamw_available(device))
    batches = iter(random_token_batches(cfg.vocab_size, B, T, settings.warmup + settings.repeats + 1))

    def step(batch: tuple[Tensor, Tensor]) -> None:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        with autocast(device, precision):
            loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_calls(lambda: step(next(batches)), settings.warmup, settings.repeats, device)
    # the batch is drawn before the memory pass, as Lightning's loader does before a step
    batch = next(batches)
    probe = PeakMemoryProbe(device)
    peak = probe.measure(lambda: step(batch), state_tensors(model, optimizer))
    return _reference_entry("bare", dropout, False, B, T, seconds, peak, probe.method)


def measure_lightning(model_values: dict[str, Any], optim: OptimConfig, dropout: float, compiled: bool,
                      settings: BenchSettings, device: torch.device, precision: str) -> dict[str, Any]:
    """attnlab's training path: :class:`attnlab.lit_module.LitLM` (default chunked loss) fitted by a
    Lightning Trainer as train.py does. Step time is measured between consecutive batch ends, so it
    includes the data loader and every Lightning hook; the step after the timed ones measures
    the peak memory."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from attnlab.lit_module import LitLM

    for name in ("lightning.pytorch", "lightning.fabric"):  # no banners (set on import, hence here)
        logging.getLogger(name).setLevel(logging.WARNING)

    B, T = settings.reference_batch_size, settings.reference_seq_len
    cfg = bench_model_config({**model_values, "dropout": dropout}, T)
    torch.manual_seed(0)
    module = LitLM(dataclasses.asdict(cfg), "mha", dataclasses.asdict(optim), compile=compiled)
    probe = PeakMemoryProbe(device)
    measure_memory = not (compiled and device.type != "cuda")
    warmup = warmup_steps(settings, compiled)
    memory_step = warmup + settings.repeats

    class StepClock(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.peak: int | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            if batch_idx == memory_step and measure_memory:
                probe.start(state_tensors(pl_module, *trainer.optimizers))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx == memory_step:
                if measure_memory:
                    self.peak = probe.stop()
                return
            synchronize(device)
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=memory_step + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock])
    loader = random_token_batches(cfg.vocab_size, B, T, memory_step + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on data loader workers
        trainer.fit(module, train_dataloaders=loader)
    if len(clock.ends) < memory_step:
        raise RuntimeError(f"the trainer stopped after {len(clock.ends)} of {memory_step + 1} steps")
    ends = clock.ends[warmup - 1:memory_step]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    method = probe.method if measure_memory else NOT_MEASURABLE_COMPILED
    return _reference_entry("attnlab", dropout, compiled, B, T, seconds, clock.peak, method)


def reference_run_count(settings: BenchSettings) -> int:
    """Runs of :func:`run_reference`: the bare loop and attnlab's path (and its compiled variant) per dropout."""
    return len(settings.reference_dropouts) * (3 if settings.reference_compile else 2)


def run_reference(model_values: dict[str, Any], optim: OptimConfig, settings: BenchSettings, device: torch.device,
                  precision: str, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The bare loop and attnlab's path (eager and compiled) at each dropout, and their ratios."""
    runs: list[dict[str, Any]] = []
    for dropout in settings.reference_dropouts:
        variants: list[tuple[str, bool]] = [("bare", False), ("attnlab", False)]
        if settings.reference_compile:
            variants.append(("attnlab", True))
        for path, compiled in variants:
            name = reference_name(path, dropout, compiled)
            advance(f"reference: {name}")
            known = {"name": name, "path": path, "dropout": dropout, "compile": compiled,
                     "batch_size": settings.reference_batch_size, "seq_len": settings.reference_seq_len}

            def measure(path=path, dropout=dropout, compiled=compiled) -> dict[str, Any]:
                if path == "bare":
                    return measure_bare_loop(model_values, optim, dropout, settings, device, precision)
                return measure_lightning(model_values, optim, dropout, compiled, settings, device, precision)

            runs.append(attempt(REFERENCE_FIELDS, known, device, measure))
            if compiled:
                torch._dynamo.reset()
    return {"runs": runs, "ratios": reference_ratios(runs), "dropout_effect": dropout_effect(runs)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def reference_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each attnlab run against the bare loop at the same dropout (> 1: attnlab is faster / larger)."""
    bare = {r["dropout"]: r for r in runs if r["path"] == "bare"}
    ratios = []
    for run in runs:
        base = bare.get(run["dropout"])
        if run["path"] == "bare" or base is None:
            continue
        ratios.append({"name": run["name"], "versus": base["name"],
                       "tokens_per_s_ratio": _ratio(run["tokens_per_s"], base["tokens_per_s"]),
                       "peak_memory_ratio": _ratio(run["peak_memory_bytes"], base["peak_memory_bytes"])})
    return ratios


def dropout_effect(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per path, each dropout's tokens/s relative to the first dropout listed (the baseline)."""
    effects = []
    for path, compiled in dict.fromkeys((r["path"], r["compile"]) for r in runs):
        same = [r for r in runs if r["path"] == path and r["compile"] == compiled]
        for run in same[1:]:
            effects.append({"path": path, "compile": compiled, "dropout": run["dropout"],
                            "versus_dropout": same[0]["dropout"],
                            "tokens_per_s_ratio": _ratio(run["tokens_per_s"], same[0]["tokens_per_s"]),
                            "peak_memory_ratio": _ratio(run["peak_memory_bytes"], same[0]["peak_memory_bytes"])})
    return effects
