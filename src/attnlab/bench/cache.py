"""Cache size: the bytes per token the cache tensors hold after ``L`` tokens, beside the
mechanism's closed form (and what a cache class reports it uses)."""

from __future__ import annotations

from typing import Any

import torch

from attnlab.bench.decoding import prefill
from attnlab.bench.harness import eager, eval_mode
from attnlab.model import GPT

CACHE_FIELDS = ("context_len", "dtype", "measured_bytes_per_token", "closed_form_bytes_per_token",
                "used_bytes_per_token", "matches_closed_form", "error")


@torch.no_grad()
def measure_cache(model: GPT, context_len: int, compiled: bool = False) -> dict[str, Any]:
    """Bytes per token of the cache tensors after ``context_len`` tokens (``init_cache(1, L)``),
    beside the closed form ``cache_bytes(1, L) / L`` and, where cache classes report it, what
    they use (``used_nbytes()``, e.g. routed mixtures)."""
    entry = dict.fromkeys(CACHE_FIELDS)
    dtype = model.tok_emb.weight.dtype
    entry.update(context_len=context_len, dtype=str(dtype).removeprefix("torch."))
    with eval_mode(model), eager(compiled):
        cache = model.init_cache(1, context_len)
        prefill(model, cache, 1, context_len, model.tok_emb.weight.device)
    measured = cache.nbytes()
    closed_form = model.cache_bytes(1, context_len, dtype)
    entry.update(measured_bytes_per_token=measured / context_len, closed_form_bytes_per_token=closed_form / context_len,
                 matches_closed_form=measured == closed_form)
    if any(hasattr(layer, "used_nbytes") for layer in cache.layers):
        used = sum(layer.used_nbytes() if hasattr(layer, "used_nbytes") else layer.nbytes() for layer in cache.layers)
        entry["used_bytes_per_token"] = used / context_len
    return entry
