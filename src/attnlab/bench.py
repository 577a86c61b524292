"""The efficiency benchmark behind ``scripts/bench.py``: speed, memory and cache size per mechanism.

For every mechanism (every registered name, or the presets in ``bench.attention``) on one model:

* **training**: tokens/s of a full step (forward, task + aux losses, backward, AdamW) and its peak
  memory, at each context length; model FLOPs per token and MFU against the measured matmul peak;
* **decoding**: tokens/s of single-token steps with the cache, after a prefill of ``L`` tokens:
  eager (each mechanism's own code) and, with ``bench.decode_compile=true``, the compiled static
  step (``GPT.step(compile=True)``, CUDA graphs on CUDA) with its compile time and graph counts;
  beside them the time of one read of the LM head's weights, the floor of any decoding step;
* **cache**: bytes per token held by the actual cache tensors after ``L`` tokens, beside the
  mechanism's closed form (and ``used_nbytes()`` where a cache class reports what it uses);
* **parameters**: ``GPT.parameter_counts()``.

``bench.reference=true`` instead compares attnlab's training path (LitLM under a Lightning
Trainer, chunked loss) with a bare PyTorch loop over the same model (plain cross-entropy), with
``torch.compile`` and dropout variants.

How things are measured:

* Timing: ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA synchronised); the median is
  reported with min/max and the interquartile range.
* Peak memory runs in a separate, untimed step. CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. CPU has no allocator statistic, so the peak of live tensor bytes
  (parameters, gradients, optimizer states and every intermediate) is tracked op by op
  (:class:`attnlab.profiling.LiveTensorTracker`); it cannot see inside compiled graphs, so
  compiled CPU runs report no peak.
* FLOPs are counted by ``FlopCounterMode`` over one training step: they are the FLOPs the
  implementation *executes*. A fused causal kernel counts the ``T (T + 1) / 2`` scores it computes;
  an explicit mask (chunked prefill, a mechanism's dense masked path) counts the whole ``T x S``
  product, so FLOPs (and MFU) can exceed the algorithmic minimum. Elementwise work and the optimizer are not counted.

Every measurement that fails is recorded with its error; the benchmark goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.attention import registered_names, resolve_layer_attention
from attnlab.config import ConfigError, ModelConfig, OptimConfig, from_dict, import_modules, require, to_container
from attnlab.model import GPT, ModelCache
from attnlab.profiling import (
    LiveTensorTracker,
    count_flops,
    matmul_peak_gflops,
    state_tensors,
    summarize,
    synchronize,
    time_calls,
)
from attnlab.recipe import build_optimizer, model_recipe, training_loss

log = logging.getLogger("attnlab.bench")

GPT2_VOCAB_SIZE = 50257
NOT_MEASURABLE_COMPILED = "not measurable: live-tensor tracking cannot see inside compiled CPU graphs"
PRECISIONS = ("32-true", "bf16-mixed")
MATMUL_PRECISIONS = ("highest", "high", "medium")

#: Keys of every entry in ``bench.json`` (present with ``None`` values when a measurement failed).
TRAIN_FIELDS = ("seq_len", "batch_size", "tokens_per_step", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
                "step_ms", "step_ms_iqr", "peak_memory_bytes", "peak_memory_method", "peak_memory_op",
                "flops_per_step", "flops_per_token", "flops_by_op", "mfu", "error")
DECODE_FIELDS = ("context_len", "batch_size", "steps", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
                 "ms_per_token", "error")
#: Compiled decoding adds: seconds of the first (compiling) step, graphs compiled for it and
#: graphs compiled afterwards (0: every later position ran the same graph).
COMPILED_DECODE_FIELDS = (*DECODE_FIELDS, "compile_s", "graphs_compiled", "recompiles")
LM_HEAD_FIELDS = ("vocab_size", "d_model", "bytes", "read_ms", "read_ms_min", "read_ms_max", "read_gb_per_s",
                  "cold_read_ms", "cold_read_ms_min", "cold_read_ms_max", "cold_read_gb_per_s",
                  "matvec_ms", "matvec_ms_min", "matvec_ms_max", "error")
CACHE_FIELDS = ("context_len", "dtype", "measured_bytes_per_token", "closed_form_bytes_per_token",
                "used_bytes_per_token", "matches_closed_form", "error")
MECHANISM_FIELDS = ("label", "attention", "params", "error", "train", "decode", "decode_compiled", "cache")
REFERENCE_FIELDS = ("name", "path", "dropout", "compile", "batch_size", "seq_len", "tokens_per_s",
                    "tokens_per_s_min", "tokens_per_s_max", "step_ms", "step_ms_iqr", "peak_memory_bytes",
                    "peak_memory_method", "error")


# ----------------------------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """The ``bench`` config section (see conf/bench.yaml for each option's meaning)."""

    attention: list | None = None
    lengths: list = field(default_factory=lambda: [256, 1024, 4096])
    batch_size: int | None = None
    tokens_per_step: int = 4096
    decode_lengths: list | None = None
    decode_steps: int = 32
    decode_batch_size: int = 1
    decode_compile: bool = False
    warmup: int = 2
    compile_warmup: int = 3
    repeats: int = 5
    device: str | None = None
    precision: str | None = None
    compile: bool = False
    threads: int | None = None
    matmul_size: int | None = None
    matmul_repeats: int = 5
    plots: bool = True
    quick: bool = False
    quick_settings: dict = field(default_factory=dict)
    reference: bool = False
    reference_batch_size: int = 4
    reference_seq_len: int = 1024
    reference_dropouts: list = field(default_factory=lambda: [0.1, 0.0])
    reference_compile: bool = True

    def __post_init__(self) -> None:
        p = "bench"
        for name in ("lengths", "decode_lengths"):
            values = getattr(self, name)
            if values is not None:
                require(len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                for v in values),
                        f"{p}.{name}", values, "a non-empty list of integers >= 1")
        if self.attention is not None:
            require(len(self.attention) > 0 and all(isinstance(a, str) for a in self.attention), f"{p}.attention",
                    self.attention, "null (every registered mechanism) or a non-empty list of preset names")
        for name in ("tokens_per_step", "decode_steps", "decode_batch_size", "warmup", "compile_warmup", "repeats",
                     "matmul_repeats", "reference_batch_size", "reference_seq_len"):
            value = getattr(self, name)
            require(value >= 1, f"{p}.{name}", value, "an integer >= 1")
        for name in ("batch_size", "threads", "matmul_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{p}.{name}", value, "null or an integer >= 1")
        require(self.device in (None, "cpu", "cuda"), f"{p}.device", self.device,
                "null (cuda when available) | cpu | cuda")
        require(self.precision in (None, *PRECISIONS), f"{p}.precision", self.precision,
                "null (32-true on cpu, bf16-mixed on cuda) | " + " | ".join(PRECISIONS))
        require(len(self.reference_dropouts) > 0 and all(isinstance(d, (int, float)) and 0 <= d < 1
                                                         for d in self.reference_dropouts),
                f"{p}.reference_dropouts", self.reference_dropouts, "a non-empty list of probabilities in [0, 1)")


def load_settings(cfg: Any, overridden: set[str] | frozenset[str] = frozenset()
                  ) -> tuple[BenchSettings, dict[str, Any], OptimConfig]:
    """Validated bench settings, model values (``vocab_size`` filled in) and optimizer config.

    ``bench.quick=true`` applies ``bench.quick_settings`` (its ``model`` entry to the model), for a
    run of about a minute; keys in ``overridden`` (``"bench.lengths"``, ``"model.d_model"``: set on
    the command line) keep their given values."""
    bench_values = to_container(cfg.bench)
    model_values = to_container(cfg.model)
    if bench_values.get("quick"):
        quick = dict(bench_values.get("quick_settings") or {})
        for key, value in (quick.pop("model", None) or {}).items():
            if f"model.{key}" not in overridden:
                model_values[key] = value
        bench_values.update({k: v for k, v in quick.items() if f"bench.{k}" not in overridden})
    settings = from_dict(BenchSettings, bench_values, "bench")
    if model_values.get("vocab_size") is None:
        model_values["vocab_size"] = GPT2_VOCAB_SIZE
    from_dict(ModelConfig, model_values, "model")  # fail early on a bad model
    optim = from_dict(OptimConfig, to_container(cfg.get("optim") or {}), "optim")
    matmul_precision = cfg.get("matmul_precision", "high")
    require(matmul_precision in MATMUL_PRECISIONS, "matmul_precision", matmul_precision, " | ".join(MATMUL_PRECISIONS))
    return settings, model_values, optim


def command_line_keys() -> set[str]:
    """Config keys set on the command line of this Hydra run (``bench.lengths=[64]`` -> ``bench.lengths``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return set()
    return {override.split("=", 1)[0].lstrip("+~") for override in overrides}


# ----------------------------------------------------------------------------------- machine


def pick_device(settings: BenchSettings) -> torch.device:
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device", "cuda", "cpu | null", reason="CUDA is not available on this machine")
    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def set_threads(threads: int | None) -> int:
    """Intra-op CPU threads: ``threads``, or every core this process may run on."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or available)
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, settings: BenchSettings) -> dict[str, Any]:
    """Device, software and the measured fp32 / bf16 GEMM peaks (GFLOP/s)."""
    size = settings.matmul_size or (8192 if device.type == "cuda" else 1024)
    peaks: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        try:
            peaks[name] = matmul_peak_gflops(dtype, size, device, repeats=settings.matmul_repeats)
        except Exception as exc:  # e.g. no bf16 GEMM on this device
            peaks[name], errors[name] = None, _describe(exc)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "matmul_size": size,
        "matmul_peak_gflops": peaks,
    }
    if errors:
        info["matmul_peak_errors"] = errors
    return info


# ----------------------------------------------------------------------------------- helpers


def _describe(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"[:500]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eager(compiled: bool) -> contextlib.AbstractContextManager:
    """Run a compiled model eagerly (FLOP counting, decoding with growing positions)."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def warmup_steps(settings: BenchSettings, compiled: bool) -> int:
    """Untimed steps: compiled models get ``compile_warmup`` at least (compilation and the
    recompilations of the first steps)."""
    return max(settings.warmup, settings.compile_warmup) if compiled else settings.warmup


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fused_adamw_available(device: torch.device) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


class PeakMemoryProbe:
    """Peak memory of the code between :meth:`start` and :meth:`stop`, in bytes.

    CUDA: the caching allocator's peak of allocated bytes. CPU: the peak of live tensor bytes,
    ``roots`` (tensors alive before, e.g. parameters and optimizer states) included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tracker: LiveTensorTracker | None = None
        #: CPU only: the ATen op whose output reached the peak.
        self.peak_op: str | None = None

    @property
    def method(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "live_tensor_bytes"

    def start(self, roots: list[Tensor]) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracker = LiveTensorTracker(roots)
            self.tracker.__enter__()

    def stop(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        assert self.tracker is not None
        self.tracker.__exit__(None, None, None)
        peak, self.peak_op, self.tracker = self.tracker.peak, self.tracker.peak_op, None
        return int(peak)

    def measure(self, fn: Callable[[], Any], roots: list[Tensor]) -> int:
        self.start(roots)
        try:
            fn()
        finally:
            peak = self.stop()
        return peak


def bench_model_config(model_values: dict[str, Any], needed_len: int) -> ModelConfig:
    """The model config, with ``max_seq_len`` raised to ``needed_len`` for rotary models (learned
    positions cannot go beyond their table)."""
    model = from_dict(ModelConfig, model_values, "model")
    if model.pos_encoding == "rope" and needed_len > model.max_seq_len:
        model = dataclasses.replace(model, max_seq_len=needed_len)
    return model


def build_model(model: ModelConfig, attention: Any, device: torch.device) -> GPT:
    """A GPT with ``attention`` everywhere (or ``model.layer_attention``), matched in parameters
    when ``model.match_params`` is set, as train.py builds it."""
    return model_recipe(model, attention).build().to(device)


# ----------------------------------------------------------------------------------- measurements


def measure_training(model: GPT, optimizer: torch.optim.Optimizer, grad_clip: float | None, seq_len: int,
                     batch_size: int, settings: BenchSettings, device: torch.device, precision: str, compiled: bool,
                     peak_gflops: float | None) -> dict[str, Any]:
    """Tokens/s of full training steps as train.py takes them (the loss with the aux losses,
    gradient clipping at ``grad_clip``, the run's AdamW), then (untimed) their peak memory and FLOPs."""
    entry = dict.fromkeys(TRAIN_FIELDS)
    entry.update(seq_len=seq_len, batch_size=batch_size, tokens_per_step=seq_len * batch_size)
    model.train()
    x = torch.randint(model.cfg.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(model.cfg.vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = training_loss(model(x, y))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()

    seconds = time_calls(step, warmup_steps(settings, compiled), settings.repeats, device)
    time_stats = summarize(seconds)
    tokens = seq_len * batch_size
    entry.update(tokens_per_s=tokens / time_stats["median"], tokens_per_s_min=tokens / time_stats["max"],
                 tokens_per_s_max=tokens / time_stats["min"], step_ms=1e3 * time_stats["median"],
                 step_ms_iqr=1e3 * time_stats["iqr"])

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
            errors.append(f"peak memory: {_describe(exc)}")
    try:
        with _eager(compiled):
            flops, by_op = count_flops(step)
        entry.update(flops_per_step=flops, flops_per_token=flops / tokens, flops_by_op=by_op)
        if peak_gflops:
            entry["mfu"] = flops * entry["tokens_per_s"] / tokens / (peak_gflops * 1e9)
    except Exception as exc:
        errors.append(f"flops: {_describe(exc)}")
    entry["error"] = "; ".join(errors) or None
    return entry


def _prefill(model: GPT, cache: ModelCache, batch_size: int, length: int, device: torch.device) -> Tensor:
    """Run ``length`` random tokens into ``cache``; return the greedy next token ``(B, 1)``."""
    prompt = torch.randint(model.cfg.vocab_size, (batch_size, length), device=device)
    logits = model(prompt, cache=cache, last_only=True).logits
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.no_grad()
def measure_decode(model: GPT, context_len: int, settings: BenchSettings, device: torch.device,
                   precision: str, compiled: bool = False, static_step: bool = False) -> dict[str, Any]:
    """Tokens/s of single-token greedy steps with the cache after a prefill of ``context_len``.

    Each timed call decodes ``decode_steps`` tokens (so the context grows by up to
    ``(warmup + repeats) * decode_steps`` during the measurement). ``static_step``: the steps run
    ``GPT.step(compile=True)`` after a fresh ``torch._dynamo.reset()`` (every mechanism is counted
    from zero and gets the whole recompile limit); its first call, which compiles, is timed
    separately. ``compiled``: the model itself was compiled for training, so the prefill and the
    eager steps run it eagerly."""
    steps, batch_size = settings.decode_steps, settings.decode_batch_size
    entry = dict.fromkeys(COMPILED_DECODE_FIELDS if static_step else DECODE_FIELDS)
    entry.update(context_len=context_len, batch_size=batch_size, steps=steps)
    if static_step and (reason := model.decode_step_unsupported()) is not None:
        entry["error"] = f"no static decoding step: {reason}"
        return entry
    total = context_len + (settings.warmup + settings.repeats) * steps + static_step
    with _eval_mode(model), _autocast(device, precision):
        with _eager(compiled):
            cache = model.init_cache(batch_size, total)
            token = _prefill(model, cache, batch_size, context_len, device)
        if static_step:
            step = partial(model.step, cache=cache, compile=True)
            stance: contextlib.AbstractContextManager = contextlib.nullcontext()
            torch._dynamo.reset()
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            token = step(token).argmax(dim=-1, keepdim=True)
            synchronize(device)
            entry["compile_s"] = time.perf_counter() - start
            compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            entry["graphs_compiled"] = compiled_graphs - before
        else:
            def step(token: Tensor) -> Tensor:
                return model(token, cache=cache, last_only=True).logits[:, -1]
            stance = _eager(compiled)

        def decode_steps() -> None:
            nonlocal token
            for _ in range(steps):
                token = step(token).argmax(dim=-1, keepdim=True)

        with stance:
            seconds = time_calls(decode_steps, settings.warmup, settings.repeats, device)
        if static_step:
            entry["recompiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_graphs
    stats = summarize(seconds)
    tokens = steps * batch_size
    entry.update(tokens_per_s=tokens / stats["median"], tokens_per_s_min=tokens / stats["max"],
                 tokens_per_s_max=tokens / stats["min"], ms_per_token=1e3 * stats["median"] / steps)
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


@torch.no_grad()
def measure_cache(model: GPT, context_len: int, compiled: bool = False) -> dict[str, Any]:
    """Bytes per token of the cache tensors after ``context_len`` tokens (``init_cache(1, L)``),
    beside the closed form ``cache_bytes(1, L) / L`` and, where cache classes report it, what
    they use (``used_nbytes()``, e.g. routed mixtures)."""
    entry = dict.fromkeys(CACHE_FIELDS)
    dtype = model.tok_emb.weight.dtype
    entry.update(context_len=context_len, dtype=str(dtype).removeprefix("torch."))
    with _eval_mode(model), _eager(compiled):
        cache = model.init_cache(1, context_len)
        _prefill(model, cache, 1, context_len, model.tok_emb.weight.device)
    measured = cache.nbytes()
    closed_form = model.cache_bytes(1, context_len, dtype)
    entry.update(measured_bytes_per_token=measured / context_len, closed_form_bytes_per_token=closed_form / context_len,
                 matches_closed_form=measured == closed_form)
    if any(hasattr(layer, "used_nbytes") for layer in cache.layers):
        used = sum(layer.used_nbytes() if hasattr(layer, "used_nbytes") else layer.nbytes() for layer in cache.layers)
        entry["used_bytes_per_token"] = used / context_len
    return entry


def _failed(fields: tuple[str, ...], error: str, **known: Any) -> dict[str, Any]:
    entry = dict.fromkeys(fields)
    entry.update(known, error=error)
    return entry


def _attempt(fields: tuple[str, ...], known: dict[str, Any], device: torch.device,
             fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or an entry recording its error (out-of-memory included)."""
    try:
        return fn()
    except Exception as exc:
        log.warning("%s failed: %s", known, _describe(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        return _failed(fields, _describe(exc), **known)
    finally:
        _free_memory(device)


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
        error = _describe(exc)
        log.warning("%s: could not build the model: %s", label, error)
        result["error"] = error
        result["train"] = [_failed(TRAIN_FIELDS, error, seq_len=L, batch_size=batch_sizes[L],
                                   tokens_per_step=L * batch_sizes[L]) for L in settings.lengths]
        result["decode"] = [_failed(DECODE_FIELDS, error, context_len=L) for L in decode_lengths]
        if settings.decode_compile:
            result["decode_compiled"] = [_failed(COMPILED_DECODE_FIELDS, error, context_len=L) for L in decode_lengths]
        result["cache"] = [_failed(CACHE_FIELDS, error, context_len=L) for L in decode_lengths]
        for _ in range(measurements_per_mechanism(settings)):
            advance(label)
        return result

    for L in settings.lengths:
        advance(f"{label}: training step, T={L}")
        known = {"seq_len": L, "batch_size": batch_sizes[L], "tokens_per_step": L * batch_sizes[L]}
        result["train"].append(_attempt(TRAIN_FIELDS, known, device, partial(
            measure_training, model, optimizer, optim.grad_clip, L, batch_sizes[L], settings, device, precision,
            settings.compile, peak_gflops)))
    del optimizer  # decoding needs no optimizer state or gradients
    model.zero_grad(set_to_none=True)
    for L in decode_lengths:
        advance(f"{label}: decoding at context {L}")
        result["decode"].append(_attempt(DECODE_FIELDS, {"context_len": L}, device, partial(
            measure_decode, model, L, settings, device, precision, settings.compile)))
        if settings.decode_compile:
            advance(f"{label}: compiled decoding at context {L}")
            result["decode_compiled"].append(_attempt(COMPILED_DECODE_FIELDS, {"context_len": L}, device, partial(
                measure_decode, model, L, settings, device, precision, settings.compile, static_step=True)))
        advance(f"{label}: cache bytes at context {L}")
        result["cache"].append(_attempt(CACHE_FIELDS, {"context_len": L}, device, partial(
            measure_cache, model, L, settings.compile)))
    del model
    _free_memory(device)
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


def _hydra_choice(group: str) -> str | None:
    """The option chosen for a config group (``attention=gqa_2`` -> ``gqa_2``), outside Hydra None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except (ImportError, ValueError):
        return None


# ----------------------------------------------------------------------------------- reference


class RandomWindows(torch.utils.data.IterableDataset):
    """Endless batches of random ``seq_len + 1`` windows of a random token stream: ``(x, y)``
    each ``(B, T)``, ``y`` shifted by one (what a language-model data loader yields)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, stream_len: int = 1 << 20):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.stream = torch.randint(vocab_size, (max(stream_len, seq_len + 2),), generator=self.generator)

    def sample(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.stream) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        windows = torch.stack([self.stream[s:s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.sample()


def reference_name(path: str, dropout: float, compiled: bool) -> str:
    return f"{'bare loop' if path == 'bare' else 'attnlab'}{' + compile' if compiled else ''}, dropout {dropout:g}"


def _reference_entry(path: str, dropout: float, compiled: bool, batch_size: int, seq_len: int,
                     seconds: list[float], peak: int | None, method: str) -> dict[str, Any]:
    stats = summarize(seconds)
    tokens = batch_size * seq_len
    entry = dict.fromkeys(REFERENCE_FIELDS)
    entry.update(name=reference_name(path, dropout, compiled), path=path, dropout=dropout, compile=compiled,
                 batch_size=batch_size, seq_len=seq_len, tokens_per_s=tokens / stats["median"],
                 tokens_per_s_min=tokens / stats["max"], tokens_per_s_max=tokens / stats["min"],
                 step_ms=1e3 * stats["median"],
                 step_ms_iqr=1e3 * stats["iqr"], peak_memory_bytes=peak, peak_memory_method=method)
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
    data = RandomWindows(cfg.vocab_size, B, T)

    def step(batch: tuple[Tensor, Tensor]) -> None:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        with _autocast(device, precision):
            loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_calls(lambda: step(data.sample()), settings.warmup, settings.repeats, device)
    # the batch is drawn before the memory pass, as Lightning's loader does before a step
    batch = data.sample()
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
    loader = torch.utils.data.DataLoader(RandomWindows(cfg.vocab_size, B, T), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and iterable datasets
        trainer.fit(module, train_dataloaders=loader)
    if len(clock.ends) < memory_step:
        raise RuntimeError(f"the trainer stopped after {len(clock.ends)} of {memory_step + 1} steps")
    ends = clock.ends[warmup - 1:memory_step]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    method = probe.method if measure_memory else NOT_MEASURABLE_COMPILED
    return _reference_entry("attnlab", dropout, compiled, B, T, seconds, clock.peak, method)


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

            runs.append(_attempt(REFERENCE_FIELDS, known, device, measure))
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


# ----------------------------------------------------------------------------------- reporting

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


def mechanism_tables(result: dict[str, Any]) -> list[Table]:
    """The benchmark's tables: (title, header, rows)."""
    mechanisms = result["mechanisms"]
    lengths = sorted({e["seq_len"] for m in mechanisms.values() for e in m["train"]})
    decode_lengths = sorted({e["context_len"] for m in mechanisms.values() for e in m["decode"]})
    tables: list[Table] = []

    def by_length(entries: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
        return {e[key]: e for e in entries}

    rows = []
    for label, m in mechanisms.items():
        train = by_length(m["train"], "seq_len")
        rows.append([label, *(_rate(train[L]) if L in train else "-" for L in lengths)])
    tables.append(("Training tokens/s, median (min-max)", ["mechanism", *(f"T={L}" for L in lengths)], rows))

    rows = []
    for label, m in mechanisms.items():
        train = by_length(m["train"], "seq_len")
        rows.append([label, *(_mib(train[L]["peak_memory_bytes"]) if L in train else "-" for L in lengths)])
    tables.append(("Peak training memory (MiB)", ["mechanism", *(f"T={L}" for L in lengths)], rows))

    rows = []
    for label, m in mechanisms.items():
        train = by_length(m["train"], "seq_len")
        cells = []
        for L in lengths:
            e = train.get(L)
            if e is None or e["flops_per_token"] is None:
                cells.append("-")
            else:
                mfu = "-" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
                cells.append(f"{e['flops_per_token'] / 1e6:,.1f} / {mfu}")
        rows.append([label, *cells])
    tables.append(("Model MFLOPs per training token / MFU", ["mechanism", *(f"T={L}" for L in lengths)], rows))

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
    lm_head = result.get("lm_head")
    if lm_head and lm_head.get("read_ms") is not None:
        rows = []
        for label, m in mechanisms.items():
            for kind, entries in (("eager", m["decode"]), ("compiled", m.get("decode_compiled") or [])):
                for e in entries:
                    if e.get("ms_per_token") is not None:
                        rows.append([label, kind, str(e["context_len"]), _num(e["ms_per_token"], 3),
                                     _num(e["ms_per_token"] / lm_head["read_ms"], 1),
                                     _num(e["ms_per_token"] / lm_head["cold_read_ms"], 1)])
        tables.append((f"Decode ms per token against one read of the LM head's weights "
                       f"({lm_head['bytes'] / 2**20:,.1f} MiB: {lm_head['read_ms']:.3f} ms from the cache, "
                       f"{lm_head['read_gb_per_s']:.1f} GB/s; {lm_head['cold_read_ms']:.3f} ms from memory, "
                       f"{lm_head['cold_read_gb_per_s']:.1f} GB/s; its matvec {lm_head['matvec_ms']:.3f} ms)",
                       ["mechanism", "decoding", "context", "ms per token", "x the read", "x the read from memory"],
                       rows))

    rows = []
    for label, m in mechanisms.items():
        cache = by_length(m["cache"], "context_len")
        cells = []
        for L in decode_lengths:
            e = cache.get(L)
            if e is None or e["error"]:
                cells.append("error" if e else "-")
                continue
            cell = f"{_num(e['measured_bytes_per_token'], 1)} / {_num(e['closed_form_bytes_per_token'], 1)}"
            if e["used_bytes_per_token"] is not None:
                cell += f" (used {_num(e['used_bytes_per_token'], 1)})"
            cells.append(cell)
        rows.append([label, *cells])
    tables.append(("Cache bytes per token: measured / closed form",
                   ["mechanism", *(f"context {L}" for L in decode_lengths)], rows))

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
            ["matmul size", str(machine["matmul_size"])]]
    return ("Machine", ["", ""], rows)


def markdown_table(table: Table) -> str:
    title, header, rows = table
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


NOTES = """\
## Notes

- Timing: `warmup` untimed calls, then `repeats` timed ones; median with (min-max) over repeats.
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
  compiled by the first step and those compiled afterwards (recompiles, 0 when every position ran
  the same graph). `n/a`: the mechanism has no static step (the reason is listed under Errors).
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
    path.write_text("\n".join(parts))


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


# ----------------------------------------------------------------------------------- the run


def run(cfg: Any) -> dict[str, Any]:
    """Benchmark the configured mechanisms (or the reference comparison); write ``bench.json``,
    ``bench.md`` and the plots into the run directory; return the result."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from attnlab.io import write_json

    started = time.time()
    import_modules(to_container(cfg.get("imports")))  # the user's mechanisms register themselves first
    settings, model_values, optim = load_settings(cfg, command_line_keys())
    device = pick_device(settings)
    threads = set_threads(settings.threads)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    precision = settings.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("benchmarking on %s with %d threads, %s", device, threads, precision)

    machine = machine_info(device, settings)
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
    per_mechanism = measurements_per_mechanism(settings)
    reference_count = len(settings.reference_dropouts) * (3 if settings.reference_compile else 2)
    total = reference_count if settings.reference else per_mechanism * len(mechanisms)
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
            result["lm_head"] = _attempt(LM_HEAD_FIELDS, {}, device, partial(measure_lm_head, model_values, settings,
                                                                             device))
        for label, attention in mechanisms.items():
            result["mechanisms"][label] = bench_mechanism(label, attention, model_values, optim, settings, device,
                                                          precision, peak, advance)
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
