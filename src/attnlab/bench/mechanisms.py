"""One mechanism's measurements (training at each length, decoding and cache size at each
context), and which mechanisms a run benchmarks."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from attnlab.attention import registered_names
from attnlab.bench.cache import CACHE_FIELDS, measure_cache
from attnlab.bench.decoding import COMPILED_DECODE_FIELDS, DECODE_FIELDS, measure_decode, set_decode_timing
from attnlab.bench.harness import attempt, failed, free_memory
from attnlab.bench.settings import BenchSettings, bench_model_config
from attnlab.bench.training import TRAIN_FIELDS, measure_training, set_step_timing
from attnlab.config import ModelConfig, OptimConfig
from attnlab.model import GPT
from attnlab.profiling import describe_error
from attnlab.recipe import build_optimizer, model_recipe

log = logging.getLogger("attnlab.bench")

MECHANISM_FIELDS = ("label", "attention", "params", "error", "train", "decode", "decode_compiled", "cache")


def build_model(model: ModelConfig, attention: Any, device: torch.device) -> GPT:
    """A GPT with ``attention`` everywhere (or ``model.layer_attention``), matched in parameters
    when ``model.match_params`` is set, as train.py builds it."""
    return model_recipe(model, attention).build().to(device)


def bench_mechanism(label: str, attention: Any, model_values: dict[str, Any], optim: OptimConfig,
                    settings: BenchSettings, device: torch.device, precision: str, peak_gflops: float | None,
                    advance: Callable[[str], None] = lambda _: None, timing_only: bool = False) -> dict[str, Any]:
    """Every measurement of one mechanism; errors are recorded per measurement. ``timing_only``
    (a later round, see :func:`pool_rounds`): the timed measurements only, no memory, FLOPs,
    decoding floor or cache bytes."""
    decode_lengths = settings.decode_lengths or settings.lengths
    decoded = (settings.warmup + settings.repeats) * settings.decode_steps  # positions beyond the prefill
    needed = max(max(settings.lengths), max(decode_lengths) + decoded)
    result: dict[str, Any] = dict.fromkeys(MECHANISM_FIELDS)
    result.update(label=label, train=[], decode=[], decode_compiled=[], cache=[])
    batch_sizes = {L: settings.batch_size or max(1, settings.tokens_per_step // L) for L in settings.lengths}
    try:
        torch.manual_seed(0)
        model_cfg = bench_model_config(model_values, needed)
        model = build_model(model_cfg, attention, device)
        configs = [dataclasses.asdict(spec.config) for spec in model.attention_specs]
        # one config, or one per layer when they differ (layer_attention)
        result["attention"] = configs[0] if all(c == configs[0] for c in configs) else configs
        result["params"] = model.parameter_counts()
        if settings.compile:
            model.compile()
        optimizer = build_optimizer(model, optim, device)
    except Exception as exc:
        error = describe_error(exc)
        log.warning("%s: could not build the model: %s", label, error)
        result["error"] = error
        result["train"] = [failed(TRAIN_FIELDS, error, seq_len=L, batch_size=batch_sizes[L],
                                  tokens_per_step=L * batch_sizes[L]) for L in settings.lengths]
        result["decode"] = [failed(DECODE_FIELDS, error, context_len=L) for L in decode_lengths]
        if settings.decode_compile:
            result["decode_compiled"] = [failed(COMPILED_DECODE_FIELDS, error, context_len=L) for L in decode_lengths]
        result["cache"] = [] if timing_only else [failed(CACHE_FIELDS, error, context_len=L) for L in decode_lengths]
        for _ in range(measurements_per_mechanism(settings, timing_only)):
            advance(label)
        return result

    for L in settings.lengths:
        advance(f"{label}: training step, T={L}")
        known = {"seq_len": L, "batch_size": batch_sizes[L], "tokens_per_step": L * batch_sizes[L]}
        result["train"].append(attempt(TRAIN_FIELDS, known, device, partial(
            measure_training, model, optimizer, optim.grad_clip, L, batch_sizes[L], settings, device, precision,
            settings.compile, peak_gflops, timing_only)))
    del optimizer  # decoding needs no optimizer state or gradients
    model.zero_grad(set_to_none=True)
    for L in decode_lengths:
        advance(f"{label}: decoding at context {L}")
        result["decode"].append(attempt(DECODE_FIELDS, {"context_len": L}, device, partial(
            measure_decode, model, L, settings, device, precision, settings.compile, timing_only=timing_only)))
        if settings.decode_compile:
            advance(f"{label}: compiled decoding at context {L}")
            result["decode_compiled"].append(attempt(COMPILED_DECODE_FIELDS, {"context_len": L}, device, partial(
                measure_decode, model, L, settings, device, precision, settings.compile, static_step=True,
                timing_only=timing_only)))
        if timing_only:
            continue
        advance(f"{label}: cache bytes at context {L}")
        result["cache"].append(attempt(CACHE_FIELDS, {"context_len": L}, device, partial(
            measure_cache, model, L, settings.compile)))
    del model
    free_memory(device)
    return result


def measurements_per_mechanism(settings: BenchSettings, timing_only: bool = False) -> int:
    """Progress steps of :func:`bench_mechanism`: training lengths, then per decode length the
    eager (and compiled) decoding and (unless ``timing_only``) the cache."""
    decode_count = len(settings.decode_lengths or settings.lengths)
    return len(settings.lengths) + (1 + settings.decode_compile + (not timing_only)) * decode_count


def pool_rounds(first: dict[str, Any], later: dict[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    """``first`` (a mechanism's result from round 1) with the timed calls of a ``later`` round's
    :func:`bench_mechanism` (``timing_only``) added to each training and decoding entry, and the
    medians, spreads and ratios recomputed over all of them. An entry that failed in either round
    keeps round 1's values; a later failure is logged."""
    for kind, samples, set_timing in (("train", "step_seconds", partial(set_step_timing, peak_gflops=peak_gflops)),
                                      ("decode", "call_seconds", set_decode_timing),
                                      ("decode_compiled", "call_seconds", set_decode_timing)):
        for entry, extra in zip(first[kind], later[kind]):
            if entry.get(samples) and extra.get(samples):
                set_timing(entry, entry[samples] + extra[samples])
            elif entry.get(samples):
                log.warning("%s: a later round of %s failed (%s); round 1's timing stands",
                            first["label"], kind, extra.get("error"))
    return first


def mechanisms_to_run(settings: BenchSettings, model_values: dict[str, Any],
                      attention: dict[str, Any] | None = None, attention_label: str | None = None) -> dict[str, Any]:
    """Label -> attention config: ``bench.attention`` (presets or names); else the ``attention``
    group when one was chosen on the command line (``attention=gqa_2``); else every registered
    name. A model with ``layer_attention`` is one hybrid model, benchmarked once."""
    if model_values.get("layer_attention"):
        return {"layers:" + ",".join(str(a) for a in model_values["layer_attention"]): "mha"}
    if settings.attention:
        return {name: name for name in settings.attention}
    if attention is not None:
        return {attention_label or attention.get("name", "attention"): attention}
    return {name: name for name in registered_names()}
