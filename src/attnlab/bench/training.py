"""Training steps: tokens/s of a full step (forward, task + aux losses, backward, AdamW), then,
untimed, its peak memory and the FLOPs it executes (with MFU against the measured matmul peak)."""

from __future__ import annotations

from typing import Any

import torch

from attnlab.bench.harness import NOT_MEASURABLE_COMPILED, autocast, eager, throughput
from attnlab.bench.settings import BenchSettings, warmup_steps
from attnlab.model import GPT
from attnlab.profiling import PeakMemoryProbe, count_flops, describe_error, state_tensors, summarize, time_calls
from attnlab.recipe import training_loss

#: Keys of every training entry in ``bench.json`` (present with ``None`` values when a measurement failed).
TRAIN_FIELDS = ("seq_len", "batch_size", "tokens_per_step", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
                "step_ms", "step_ms_iqr", "step_seconds", "peak_memory_bytes", "peak_memory_method", "peak_memory_op",
                "flops_per_step", "flops_per_token", "flops_by_op", "mfu", "error")


def set_step_timing(entry: dict[str, Any], seconds: list[float], peak_gflops: float | None = None) -> None:
    """The timing fields of a training ``entry`` from the seconds of its timed steps (all of them
    kept in ``step_seconds``, so that rounds can be pooled); MFU when the FLOPs are known."""
    stats = summarize(seconds)
    entry.update(throughput(entry["tokens_per_step"], stats), step_ms=1e3 * stats["median"],
                 step_ms_iqr=1e3 * stats["iqr"], step_seconds=list(seconds))
    if entry.get("flops_per_step") and peak_gflops:
        entry["mfu"] = entry["flops_per_token"] * entry["tokens_per_s"] / (peak_gflops * 1e9)


def measure_training(model: GPT, optimizer: torch.optim.Optimizer, grad_clip: float | None, seq_len: int,
                     batch_size: int, settings: BenchSettings, device: torch.device, precision: str, compiled: bool,
                     peak_gflops: float | None, timing_only: bool = False) -> dict[str, Any]:
    """Tokens/s of full training steps as train.py takes them (the loss with the aux losses,
    gradient clipping at ``grad_clip``, the run's AdamW), then (untimed, unless ``timing_only``)
    their peak memory and FLOPs."""
    entry = dict.fromkeys(TRAIN_FIELDS)
    entry.update(seq_len=seq_len, batch_size=batch_size, tokens_per_step=seq_len * batch_size)
    model.train()
    x = torch.randint(model.cfg.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(model.cfg.vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = training_loss(model(x, y))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()

    set_step_timing(entry, time_calls(step, warmup_steps(settings, compiled), settings.repeats, device))
    if timing_only:
        return entry
    tokens = seq_len * batch_size

    # the timing stands even if one of the untimed passes fails; the entry records why
    errors = []
    probe = PeakMemoryProbe(device)
    entry["peak_memory_method"] = probe.method
    if compiled and device.type != "cuda":
        entry["peak_memory_method"] = NOT_MEASURABLE_COMPILED
    else:
        try:
            entry["peak_memory_bytes"] = probe.measure(step, state_tensors(model, optimizer))
            entry["peak_memory_op"] = probe.peak_op
        except Exception as exc:
            errors.append(f"peak memory: {describe_error(exc)}")
    try:
        with eager(compiled):
            flops, by_op = count_flops(step)
        entry.update(flops_per_step=flops, flops_per_token=flops / tokens, flops_by_op=by_op)
        set_step_timing(entry, entry["step_seconds"], peak_gflops)  # now with MFU
    except Exception as exc:
        errors.append(f"flops: {describe_error(exc)}")
    entry["error"] = "; ".join(errors) or None
    return entry
