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
from attnlab.bench.decoding import COMPILED_DECODE_FIELDS, DECODE_FIELDS, measure_decode
from attnlab.bench.harness import attempt, failed, free_memory
from attnlab.bench.settings import BenchSettings, bench_model_config
from attnlab.bench.training import TRAIN_FIELDS, measure_training
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
                    advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every measurement of one mechanism; errors are recorded per measurement."""
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
        result["cache"] = [failed(CACHE_FIELDS, error, context_len=L) for L in decode_lengths]
        for _ in range(measurements_per_mechanism(settings)):
            advance(label)
        return result

    for L in settings.lengths:
        advance(f"{label}: training step, T={L}")
        known = {"seq_len": L, "batch_size": batch_sizes[L], "tokens_per_step": L * batch_sizes[L]}
        result["train"].append(attempt(TRAIN_FIELDS, known, device, partial(
            measure_training, model, optimizer, optim.grad_clip, L, batch_sizes[L], settings, device, precision,
            settings.compile, peak_gflops)))
    del optimizer  # decoding needs no optimizer state or gradients
    model.zero_grad(set_to_none=True)
    for L in decode_lengths:
        advance(f"{label}: decoding at context {L}")
        result["decode"].append(attempt(DECODE_FIELDS, {"context_len": L}, device, partial(
            measure_decode, model, L, settings, device, precision, settings.compile)))
        if settings.decode_compile:
            advance(f"{label}: compiled decoding at context {L}")
            result["decode_compiled"].append(attempt(COMPILED_DECODE_FIELDS, {"context_len": L}, device, partial(
                measure_decode, model, L, settings, device, precision, settings.compile, static_step=True)))
        advance(f"{label}: cache bytes at context {L}")
        result["cache"].append(attempt(CACHE_FIELDS, {"context_len": L}, device, partial(
            measure_cache, model, L, settings.compile)))
    del model
    free_memory(device)
    return result


def measurements_per_mechanism(settings: BenchSettings) -> int:
    """Progress steps of :func:`bench_mechanism`: training lengths, then per decode length the
    eager (and compiled) decoding and the cache."""
    decode_count = len(settings.decode_lengths or settings.lengths)
    return len(settings.lengths) + (3 if settings.decode_compile else 2) * decode_count


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
