"""Decoding: tokens/s of single-token steps with the cache after a prefill, eager and through the
compiled static step, each beside its floor (one read of the bytes the step must read: the
weights that multiply the token and the cache), and the floor shared by every model of a
vocabulary (one read of the LM head's weights)."""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor

from attnlab.bench.harness import autocast, eager, eval_mode, throughput
from attnlab.bench.settings import BenchSettings
from attnlab.model import GPT, ModelCache
from attnlab.profiling import summarize, synchronize, time_calls

DECODE_FIELDS = ("context_len", "batch_size", "steps", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
                 "ms_per_token", "call_seconds", "step_bytes", "step_read_ms", "x_step_read", "error")
#: Compiled decoding adds: seconds of the first (compiling) step, graphs compiled for it and
#: graphs compiled afterwards (0: every later position ran the same graph).
COMPILED_DECODE_FIELDS = (*DECODE_FIELDS, "compile_s", "graphs_compiled", "recompiles")
LM_HEAD_FIELDS = ("vocab_size", "d_model", "bytes", "read_ms", "read_ms_min", "read_ms_max", "read_gb_per_s",
                  "cold_read_ms", "cold_read_ms_min", "cold_read_ms_max", "cold_read_gb_per_s",
                  "matvec_ms", "matvec_ms_min", "matvec_ms_max", "error")


def set_decode_timing(entry: dict[str, Any], seconds: list[float]) -> None:
    """The timing fields of a decoding ``entry`` from the seconds of its timed calls of ``steps``
    tokens per sequence (all kept in ``call_seconds``, so that rounds can be pooled), and its
    ratio to the floor when that is known."""
    stats = summarize(seconds)
    entry.update(throughput(entry["steps"] * entry["batch_size"], stats),
                 ms_per_token=1e3 * stats["median"] / entry["steps"], call_seconds=list(seconds))
    if entry.get("step_read_ms"):
        entry["x_step_read"] = entry["ms_per_token"] / entry["step_read_ms"]


def step_bytes(model: GPT, batch_size: int, context_len: int) -> int:
    """The bytes a decoding step reads at least: every weight that multiplies the new token
    (attention, feed-forward, norms and the LM head's ``V x C``; of the embeddings only one row,
    left out) and the cache of ``context_len`` positions (the mechanism's closed form, not what
    a pre-allocated buffer holds beyond them)."""
    counts = model.parameter_counts()
    weights = counts["attention"] + counts["feed_forward"] + counts["norms"] + model.cfg.vocab_size * model.cfg.d_model
    element = model.tok_emb.weight.element_size()
    return weights * element + model.cache_bytes(batch_size, context_len)


def streaming_read_ms(nbytes: int, device: torch.device, repeats: int = 20) -> float:
    """Median milliseconds to read ``nbytes`` of float32 once (a sum over a buffer that size, read
    again and again as a decoding loop reads the same weights and cache at every token)."""
    buffer = torch.ones(max(1, nbytes // 4), device=device)
    return 1e3 * summarize(time_calls(buffer.sum, 3, repeats, device))["median"]


def prefill(model: GPT, cache: ModelCache, batch_size: int, length: int, device: torch.device) -> Tensor:
    """Run ``length`` random tokens into ``cache``; return the greedy next token ``(B, 1)``."""
    prompt = torch.randint(model.cfg.vocab_size, (batch_size, length), device=device)
    logits = model(prompt, cache=cache, last_only=True).logits
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.no_grad()
def measure_decode(model: GPT, context_len: int, settings: BenchSettings, device: torch.device,
                   precision: str, compiled: bool = False, static_step: bool = False,
                   timing_only: bool = False) -> dict[str, Any]:
    """Tokens/s of single-token greedy steps with the cache after a prefill of ``context_len``.

    Each timed call decodes ``decode_steps`` tokens (so the context grows by up to
    ``(warmup + repeats) * decode_steps`` during the measurement). ``static_step``: the steps run
    ``GPT.step(compile=True)`` after a fresh ``torch._dynamo.reset()`` and
    :meth:`~attnlab.model.GPT.forget_compiled_step` (every mechanism and context is counted from
    zero and gets the whole recompile limit); its first call, which compiles, is timed
    separately, then ``decode_steps`` steps with dynamo's guards checked count the recompiles,
    and the timed steps trust the guards as :meth:`GPT.stream` does. ``compiled``: the model
    itself was compiled for training, so the prefill and the eager steps run it eagerly.
    ``timing_only``: without the floor (a later round of the benchmark)."""
    steps, batch_size = settings.decode_steps, settings.decode_batch_size
    entry = dict.fromkeys(COMPILED_DECODE_FIELDS if static_step else DECODE_FIELDS)
    entry.update(context_len=context_len, batch_size=batch_size, steps=steps)
    if static_step and (reason := model.decode_step_unsupported()) is not None:
        entry["error"] = f"no static decoding step: {reason}"
        return entry
    total = context_len + (settings.warmup + settings.repeats + static_step) * steps + static_step
    with eval_mode(model), autocast(device, precision):
        with eager(compiled):
            cache = model.init_cache(batch_size, total)
            token = prefill(model, cache, batch_size, context_len, device)
        if static_step:
            step = partial(model.step, cache=cache, compile=True)
            stance: contextlib.AbstractContextManager = contextlib.nullcontext()
            torch._dynamo.reset()
            model.forget_compiled_step()  # a precompiled CPU step of an earlier context is compiled again too
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            token = step(token).argmax(dim=-1, keepdim=True)
            synchronize(device)
            entry["compile_s"] = time.perf_counter() - start
            compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            entry["graphs_compiled"] = compiled_graphs - before
            for _ in range(steps):  # guards checked: any recompile across positions shows here
                token = step(token).argmax(dim=-1, keepdim=True)
            entry["recompiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_graphs
            step = partial(model.step, cache=cache, compile=True, trust_guards=True)
        else:
            def step(token: Tensor) -> Tensor:
                return model(token, cache=cache, last_only=True).logits[:, -1]
            stance = eager(compiled)

        def decode_steps() -> None:
            nonlocal token
            for _ in range(steps):
                token = step(token).argmax(dim=-1, keepdim=True)

        with stance:
            seconds = time_calls(decode_steps, settings.warmup, settings.repeats, device)
    if not timing_only:  # the floor of a step: reading its bytes once, timed on this machine now
        entry["step_bytes"] = step_bytes(model, batch_size, context_len)
        entry["step_read_ms"] = streaming_read_ms(entry["step_bytes"], device)
    set_decode_timing(entry, seconds)
    return entry


@torch.no_grad()
def measure_lm_head(model_values: dict[str, Any], settings: BenchSettings, device: torch.device,
                    repeats: int = 50, flush_bytes: int = 256 * 2**20) -> dict[str, Any]:
    """The floor of a decoding step: the time to read the LM head's ``(V, C)`` float32 weights once
    (a sum over them: a pure streaming read) and of the LM head's own product for one token
    (``F.linear`` of ``(decode_batch_size, C)``), medians of ``repeats`` calls with min and max.
    ``read`` reads a weight read over and over (from the last-level cache when it fits there);
    ``cold_read`` reads it after writing ``flush_bytes`` elsewhere, i.e. from memory, as a decoding
    step whose weights and caches together outgrow the cache does."""
    entry = dict.fromkeys(LM_HEAD_FIELDS)
    V, C = model_values["vocab_size"], model_values["d_model"]
    weight = torch.randn(V, C, device=device)
    x = torch.randn(settings.decode_batch_size, C, device=device)
    entry.update(vocab_size=V, d_model=C, bytes=weight.numel() * weight.element_size())
    flush = torch.empty(flush_bytes // 4, device=device)

    def cold_read() -> float:
        flush.fill_(1.0)
        synchronize(device)
        start = time.perf_counter()
        weight.sum()
        synchronize(device)
        return time.perf_counter() - start

    timings = {"read": time_calls(weight.sum, 5, repeats, device),
               "cold_read": [cold_read() for _ in range(max(3, repeats // 5))],
               "matvec": time_calls(lambda: torch.nn.functional.linear(x, weight), 5, repeats, device)}
    for name, seconds in timings.items():
        stats = summarize(seconds)
        entry.update({f"{name}_ms": 1e3 * stats["median"], f"{name}_ms_min": 1e3 * stats["min"],
                      f"{name}_ms_max": 1e3 * stats["max"]})
    for name in ("read", "cold_read"):
        entry[f"{name}_gb_per_s"] = entry["bytes"] / (entry[f"{name}_ms"] * 1e-3) / 1e9
    return entry
