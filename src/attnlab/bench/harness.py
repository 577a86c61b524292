"""What every measurement of the benchmark shares: the modes a step runs in, the throughput of
timed calls, and the record of a measurement that failed (the benchmark goes on)."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from attnlab.profiling import describe_error

log = logging.getLogger("attnlab.bench")

NOT_MEASURABLE_COMPILED = "not measurable: live-tensor tracking cannot see inside compiled CPU graphs"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eager(compiled: bool) -> contextlib.AbstractContextManager:
    """Run a compiled model eagerly (FLOP counting, decoding with growing positions)."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def throughput(tokens: int, stats: dict[str, float]) -> dict[str, float]:
    """Tokens/s of the median call and its spread (the slowest and the fastest call), from the
    :func:`~attnlab.profiling.summarize` ``stats`` of calls of ``tokens`` tokens each."""
    return {"tokens_per_s": tokens / stats["median"], "tokens_per_s_min": tokens / stats["max"],
            "tokens_per_s_max": tokens / stats["min"]}


def failed(fields: tuple[str, ...], error: str, **known: Any) -> dict[str, Any]:
    """An entry with every field of ``fields``: ``known`` values, the error, ``None`` elsewhere."""
    entry = dict.fromkeys(fields)
    entry.update(known, error=error)
    return entry


def attempt(fields: tuple[str, ...], known: dict[str, Any], device: torch.device,
            fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or an entry recording its error (out-of-memory included)."""
    try:
        return fn()
    except Exception as exc:
        log.warning("%s failed: %s", known, describe_error(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        return failed(fields, describe_error(exc), **known)
    finally:
        free_memory(device)
