"""Linear attention with the gated delta rule: Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025).

Each head keeps a matrix memory ``S`` ``(D_v, D_k)`` instead of a KV cache. At every token it
decays the whole memory by ``alpha_t = exp(g_t)`` (Mamba2's gate) and then applies one step of
the delta rule: it moves the value stored under key ``k_t`` a fraction ``beta_t`` towards
``v_t``::

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,        o_t = S_t q_t / sqrt(D_k)

Layer, per token ``x_t``:

* ``q, k, v``: linear projections, each through a causal depthwise convolution of width
  ``conv_size`` and SiLU; ``q, k`` L2-normalised per head (keeps ``I - beta k k^T`` a contraction);
* ``beta_t = sigmoid(W_b x_t)``, ``g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)`` per head,
  with ``A`` uniform in [1, 16] and ``dt`` log-uniform in [0.001, 0.1] at initialisation;
* output: ``RMSNorm(o_t) * SiLU(W_g x_t)`` per head, then the output projection.

Heads and sizes: ``H = model.n_heads``, ``D_k = model.head_dim``, ``D_v = expand_v * D_k``. The
default ``expand_v = 1`` keeps the layer close to MHA's parameters: about ``5 d^2`` (q, k, v,
output gate, output projection) against MHA's ``4 d^2`` when ``H * D_k = d_model``; the paper
uses ``expand_v = 2`` with fewer heads.

Training and prefill run the chunked algorithm of :mod:`attnlab.attention._gated_delta`
(``O(T)`` time, ``O(T * chunk_size)`` memory), or flash-linear-attention's Triton kernel for
16-bit activations on CUDA (bf16 autocast) when the optional ``fla`` package (>= 0.2) is
installed (for training only where its backward is reliable, see
:func:`~attnlab.attention._gated_delta.fla_backward_is_reliable`); decoding one token is one
step of the recurrence. No rotary embeddings: the convolutions and the decay carry the order of
tokens. ``model.attn_dropout`` does not apply (there are no attention probabilities).

Decoding state per sequence and layer, constant in the context length::

    cache_bytes = B * H * D_v * D_k * s  +  B * (2 H D_k + H D_v) * (conv_size - 1) * e

where ``e`` is the cache dtype's element size and ``s = max(e, 4)`` (the memory is float32 for
16-bit and 32-bit caches, float64 for float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig, require

from ._gated_delta import (
    chunk_gated_delta_rule,
    fla_chunk_gated_delta_rule,
    fla_usable,
    l2_normalize,
    recurrent_gated_delta_rule,
)
from .base import Attention, AttentionCache, AttentionConfig, AttentionContext, mark_residual_projection
from .registry import register_attention

A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (0.001, 0.1)


@dataclass
class GatedDeltaNetConfig(AttentionConfig):
    #: Tokens per chunk of the pure-PyTorch training algorithm (fla's kernel uses its own 64).
    chunk_size: int = 64
    #: Width of the causal depthwise convolutions on q, k and v (1: no mixing, only SiLU).
    conv_size: int = 4
    #: Value head size as a multiple of ``model.head_dim``.
    expand_v: int = 1

    def validate(self, model: ModelConfig, field: str) -> None:
        for option in ("chunk_size", "conv_size", "expand_v"):
            value = getattr(self, option)
            require(value >= 1, f"{field}.{option}", value, "an integer >= 1")


class GatedDeltaCache(AttentionCache):
    """Recurrent state of one layer: ``state`` ``(B, H, D_v, D_k)`` (float32, or float64 for a
    float64 cache) and ``conv_state`` ``(B, 2 H D_k + H D_v, conv_size - 1)``, the last
    convolution inputs of the q, k and v streams (zeros before the first token)."""

    def __init__(self, batch_size: int, n_heads: int, k_dim: int, v_dim: int, conv_channels: int,
                 conv_size: int, device: torch.device | str | None, dtype: torch.dtype):
        state_dtype = torch.promote_types(dtype, torch.float32)
        self.state = torch.zeros(batch_size, n_heads, v_dim, k_dim, device=device, dtype=state_dtype)
        self.conv_state = torch.zeros(batch_size, conv_channels, conv_size - 1, device=device, dtype=dtype)


@register_attention("linear")
class GatedDeltaNet(Attention):
    Config = GatedDeltaNetConfig
    uses_rope = False
    unsupported_reasons = {
        "bidirectional": "a recurrence runs left to right: the state at t holds only tokens <= t",
        "cross_attention": "the recurrent state is written by the sequence's own tokens; there is no memory to read",
        "key_padding": "padded tokens would still decay and convolve into the state (not implemented)",
    }

    def __init__(self, cfg: GatedDeltaNetConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.chunk_size = cfg.chunk_size
        self.conv_size = cfg.conv_size
        self.k_dim = self.head_dim
        self.v_dim = self.head_dim * cfg.expand_v
        H = self.n_heads
        self.qkv_split = (H * self.k_dim, H * self.k_dim, H * self.v_dim)
        conv_channels = sum(self.qkv_split)
        # one matmul for q, k, v, the output gate, the decay input a and the beta logit b
        self.split = (conv_channels, H * self.v_dim, H, H)
        self.in_proj = nn.Linear(self.d_model, sum(self.split), bias=model.bias)
        # one depthwise convolution over the concatenated q, k, v channels = three separate ones
        self.conv = nn.Conv1d(conv_channels, conv_channels, self.conv_size, groups=conv_channels, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True  # type: ignore[attr-defined]  (1-D, so the optimiser skips it anyway)
        self.out_norm = nn.RMSNorm(self.v_dim, eps=model.norm_eps)
        self.out_proj = mark_residual_projection(nn.Linear(H * self.v_dim, self.d_model, bias=model.bias))
        self.reset_mechanism_parameters()

    def reset_mechanism_parameters(self) -> None:
        """Mamba2's gate init: ``A ~ U[1, 16]``, ``softplus(dt_bias) = dt ~ logU[0.001, 0.1]``."""
        with torch.no_grad():
            self.A_log.uniform_(*A_INIT_RANGE).log_()
            dt = torch.empty_like(self.dt_bias).uniform_(*(math.log(r) for r in DT_INIT_RANGE)).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.conv.reset_parameters()

    def gates(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head projections ``a, b`` ``(B, T, H)`` -> log decay ``g`` (float32 or wider, ``< 0``:
        the state is multiplied by ``alpha = exp(g)`` in (0, 1) each token) and write strength
        ``beta`` in (0, 1)."""
        dtype = torch.promote_types(a.dtype, torch.float32)  # the decay compounds: never in 16 bits
        g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
        return g, b.sigmoid()

    def short_conv(self, x: Tensor, cache: GatedDeltaCache | None) -> Tensor:
        """Causal depthwise convolution and SiLU of ``x`` ``(B, T, channels)``; with a cache the
        window starts with the cached inputs, which are then replaced by the newest ones."""
        x = x.transpose(1, 2)
        if cache is None:
            window = F.pad(x, (self.conv_size - 1, 0))
        else:
            window = torch.cat([cache.conv_state.to(x.dtype), x], dim=-1)
            cache.conv_state.copy_(window[..., window.shape[-1] - (self.conv_size - 1):])
            if x.shape[-1] == 1:
                # one token: a weighted sum over the window; a convolution call costs ~0.1 ms of
                # oneDNN set-up per layer here, more than the rest of a compiled decoding step
                mixed = (window * self.conv.weight.squeeze(1)).sum(-1, keepdim=True)
                return F.silu(mixed).transpose(1, 2)
        return F.silu(F.conv1d(window, self.conv.weight, groups=x.shape[1])).transpose(1, 2)

    def delta_rule(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                   cache: GatedDeltaCache | None) -> Tensor:
        """``q, k`` ``(B, H, T, D_k)``, ``v`` ``(B, H, T, D_v)``, ``g, beta`` ``(B, H, T)`` ->
        ``o`` ``(B, H, T, D_v)``; with a cache, starts from and advances its state."""
        scale = self.k_dim ** -0.5
        initial = cache.state if cache is not None else None
        if cache is not None and q.shape[2] == 1:
            o, final = recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial)
        elif fla_usable(v, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))):
            o, final = fla_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial,
                                                  output_final_state=cache is not None)
        else:
            o, final = chunk_gated_delta_rule(q, k, v, g, beta, scale, self.chunk_size, initial)
        if cache is not None:
            cache.state.copy_(final)
        return o

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``; with a cache, ``x`` continues the cached sequence."""
        assert cache is None or isinstance(cache, GatedDeltaCache)
        B, T, _ = x.shape
        H = self.n_heads
        qkv, gate, a, b = self.in_proj(x).split(self.split, dim=-1)
        q, k, v = self.short_conv(qkv, cache).split(self.qkv_split, dim=-1)
        q = l2_normalize(q.view(B, T, H, self.k_dim)).transpose(1, 2)
        k = l2_normalize(k.view(B, T, H, self.k_dim)).transpose(1, 2)
        v = v.view(B, T, H, self.v_dim).transpose(1, 2)
        g, beta = self.gates(a, b)
        if ctx.recording:
            ctx.record("decay_mean", g.exp().mean())
            ctx.record("beta_mean", beta.float().mean())
        o = self.delta_rule(q, k, v, g.transpose(1, 2), beta.transpose(1, 2), cache)
        o = o.transpose(1, 2)  # (B, T, H, D_v)
        o = self.out_norm(o) * F.silu(gate.view(B, T, H, self.v_dim))
        return self.out_proj(o.reshape(B, T, H * self.v_dim))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """One token: :meth:`forward`'s step of the recurrence, already the same shapes at every
        position (the state and the convolution window have no position axis)."""
        return self.forward(x, ctx, cache)

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> GatedDeltaCache:
        return GatedDeltaCache(batch_size, self.n_heads, self.k_dim, self.v_dim, sum(self.qkv_split),
                               self.conv_size, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        """Independent of ``context_len``: see the module docstring."""
        element = torch.empty((), dtype=dtype).element_size()
        state = batch_size * self.n_heads * self.v_dim * self.k_dim * max(element, 4)
        conv = batch_size * sum(self.qkv_split) * (self.conv_size - 1) * element
        return state + conv
