"""Pluggable attention mechanisms.

Every module of this package is imported on first use, so a new mechanism is one file here
(decorated with :func:`register_attention`) and one YAML in ``conf/attention/``; nothing else
changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    STRUCTURES,
    Attention,
    AttentionCache,
    AttentionConfig,
    AttentionContext,
    EmptyCache,
    KVCache,
    ModelCache,
    ParameterGroupHint,
    causal_mask,
    mark_residual_projection,
    sdpa,
    sdpa_causal,
    sdpa_in_context,
)
from .factory import AttentionLayer, build
from .registry import (
    AttentionSpec,
    attention_options,
    get_registration,
    load_preset,
    preset_names,
    register_attention,
    registered_names,
    resolve_attention,
    resolve_layer_attention,
)

_INFRASTRUCTURE = {"base", "factory", "kernels", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Attention", "AttentionCache", "AttentionConfig", "AttentionContext", "AttentionLayer", "AttentionSpec",
    "EmptyCache", "KVCache", "ModelCache", "ParameterGroupHint", "attention_options", "build", "causal_mask", "get_registration", "load_preset", "mark_residual_projection", "preset_names",
    "register_attention", "registered_names", "resolve_attention", "resolve_layer_attention", "sdpa", "sdpa_causal",
    "sdpa_in_context", "STRUCTURES",
]
