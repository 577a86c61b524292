"""Kernel choices: which implementation computes an attention, apart from what it computes.

The mechanisms state their math once; the decisions that depend on the device, the dtype, the
shapes or the thread count live here, each a small function with one line of reason per branch.
The measurements behind them are in the README ("Kernel choices").

* :func:`plan_sdpa`: how :func:`~attnlab.attention.base.sdpa` feeds grouped K/V heads and narrow
  values to ``scaled_dot_product_attention``, and :func:`sdpa_backends` which CUDA kernels it may use;
* :func:`use_flex_attention`: flex attention or the blocked band for a sliding window;
* :func:`selected_attention_kernel`: C kernels, sparse CSR products or gathered SDPA for top-k attention;
* :func:`use_native_decode`: the C kernel or SDPA for the static decoding step's attention;
* :func:`plain_kernels`: a scope in which every choice falls back to ATen operations.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _native

#: Whether this torch has flex attention (older ones: the blocked band serves every device).
FLEX_ATTENTION_AVAILABLE = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None

_plain_kernels: contextvars.ContextVar[bool] = contextvars.ContextVar("attnlab_plain_kernels", default=False)


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """Inside, mechanisms compute with ATen operations only: no compiled flex attention, no
    flash-linear-attention Triton kernels, and compiled functions run eagerly. FLOP counting uses
    it, since ``FlopCounterMode`` cannot see Triton kernels, and compiled flex attention fails
    under it (on an H100 the failure also made later compilations of flex attention in the
    process fail). Scoped per thread and task (a context variable)."""
    token = _plain_kernels.set(True)
    # nothing is traced inside, so a compiled graph never has to depend on this scope
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    try:
        with stance:
            yield
    finally:
        _plain_kernels.reset(token)


@torch._dynamo.assume_constant_result
def plain_kernels_only() -> bool:
    """Whether :func:`plain_kernels` is active (always False while tracing: see there)."""
    return _plain_kernels.get()


@torch._dynamo.assume_constant_result
def cpu_threads() -> int:
    """``torch.get_num_threads()``, which a compiled graph takes as the constant it was at tracing."""
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------- SDPA

#: How grouped K/V heads (``H_kv < H``) reach the kernel: ``none`` (not grouped), ``pack_rows``
#: (the ``G`` query heads of a KV head become ``G`` query rows of it), ``repeat_kv`` (K/V
#: repeated to ``H`` heads) or ``enable_gqa`` (the kernel groups them).
Grouping = Literal["none", "pack_rows", "repeat_kv", "enable_gqa"]


@dataclass(frozen=True)
class SDPAPlan:
    grouping: Grouping
    #: Zero-pad ``v`` to the query/key head width (and slice the padding off the output).
    pad_values: bool


def plan_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> SDPAPlan:
    """The kernel plan for ``q`` ``(B, H, T, D)`` over ``k, v`` ``(B, H_kv, S, D_k|D_v)``."""
    # the fused kernels need one head width; padding is 3x faster than the unfused path on CPU
    return SDPAPlan(_grouping(q, k.shape[1], attn_mask), pad_values=v.shape[-1] < q.shape[-1])


def _grouping(q: Tensor, H_kv: int, attn_mask: Tensor | None) -> Grouping:
    B, H, T, _ = q.shape
    if H_kv == H:
        return "none"
    on_cpu = q.device.type == "cpu"
    if T == 1:  # single-token decoding never repeats K/V: that would copy the whole cache
        # packed rows share one mask row: only a mask broadcast over heads and the query fits them
        shared_mask = attn_mask is None or (attn_mask.shape[-2] == 1
                                            and (attn_mask.dim() < 3 or attn_mask.shape[-3] == 1))
        if not shared_mask:
            return "enable_gqa"
        if on_cpu:
            # packed, a KV head is read once, not once per query head: faster even where fewer
            # (sequence, KV head) pairs than threads leave a thread idle (MQA, one sequence)
            return "pack_rows"
        # CUDA: flash (grouped K/V) takes no mask, so masked calls pack onto the efficient kernel
        return "pack_rows" if attn_mask is not None else "enable_gqa"
    if on_cpu:
        return "repeat_kv"  # the fused CPU kernel is faster on repeated K/V than with enable_gqa
    if q.dtype in (torch.float16, torch.bfloat16):
        return "enable_gqa"  # the 16-bit flash kernel takes grouped K/V
    return "repeat_kv"  # float32 with enable_gqa would fall back to the unfused math path


#: CUDA kernels for every call: flash (16-bit), memory-efficient, math; never cuDNN attention,
#: which builds an execution graph for every new shape (decoding, routed branch lengths).
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA kernels allowed on ``device`` (a context manager around the call)."""
    return sdpa_kernel(_CUDA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------- sliding window


def use_flex_attention(device: torch.device, n_prefix: int, dropout_p: float) -> bool:
    """Whether a sliding window that cuts keys off runs on flex attention (else the blocked band)."""
    if not FLEX_ATTENTION_AVAILABLE or device.type != "cuda":
        return False  # flex attention runs compiled for CUDA only; other devices take the band
    if n_prefix or dropout_p:
        return False  # the block mask covers the queries' own keys only, and flex has no dropout
    return not plain_kernels_only()  # FLOP counters cannot see its Triton kernel


# ----------------------------------------------------------------------------------- top-k attention


def selected_attention_kernel(device: torch.device, dropout_p: float, dtype: torch.dtype = torch.float32
                              ) -> Literal["native", "csr", "gathered"]:
    """How the top-k mechanism's training path selects and attends (see ``_topk_attention``)."""
    if dropout_p:
        return "gathered"  # only SDPA has attention dropout
    if plain_kernels_only():
        return "csr"  # counting FLOPs: ATen operations on every device, so the counts agree
    if device.type == "cpu":
        if torch.promote_types(dtype, torch.float32) == torch.float32 and native_kernels_available():
            return "native"  # top-k, products and transposes without sorts or copies (``_native``)
        return "csr"  # the sparse products read the keys in place, without gathered copies
    return "gathered"  # CUDA: the fused SDPA kernels, which take 16-bit inputs


@torch._dynamo.assume_constant_result
def native_kernels_available() -> bool:
    """Whether the C kernels of ``_native`` built on this machine (compiled once, on first use)."""
    return _native.available()


# ----------------------------------------------------------------------------------- static decoding


def use_native_decode(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the static step's single-token attention runs on ``_native.decode_attention``."""
    if q.device.type != "cpu" or plain_kernels_only():
        return False  # CUDA: SDPA inside the captured graph; FLOP counting: ATen operations
    if torch.is_grad_enabled():
        return False  # the C kernel has no backward (decoding runs without gradients)
    if not q.dtype == k.dtype == v.dtype == torch.float32:
        return False  # float32 only (16-bit decoding keeps SDPA)
    group, value_dim = q.shape[1] // k.shape[1], v.shape[-1]
    if group > _native.DECODE_MAX_GROUP or value_dim > _native.DECODE_MAX_VALUE_DIM:
        return False
    # one query per head reads the cache 1.7-3x faster than SDPA's fused CPU kernel (README, "Kernel choices")
    return native_decode_available()


@torch._dynamo.assume_constant_result
def native_decode_available() -> bool:
    """Whether ``csrc/decode.c`` built on this machine (compiled once, on first use)."""
    return _native.decode_available()
