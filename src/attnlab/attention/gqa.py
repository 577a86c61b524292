"""Multi-head, grouped-query and multi-query attention: one implementation, ``n_kv_heads`` apart.

``H`` query heads share ``H_kv`` key/value heads in groups of ``H / H_kv``: MHA is
``H_kv = H`` (Vaswani et al. 2017), MQA ``H_kv = 1`` (Shazeer 2019), GQA anything between
(Ainslie et al. 2023). The KV cache holds ``2 * H_kv * head_dim`` values per token and layer.

Besides causal self-attention: bidirectional, cross-attention (queries from ``x``, keys and
values from ``ctx.memory`` through the same projections, grouped as usual, without rotary
positions) and key padding masks (:class:`~attnlab.attention.base.AttentionContext`).

Parameters (``C = d_model``, ``d = head_dim``): ``W_qkv`` ``C (H + 2 H_kv) d``, ``W_o`` ``H d C``;
with ``model.bias`` also ``(H + 2 H_kv) d + C``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig, divisors, require

from .base import (
    Attention,
    AttentionCache,
    AttentionConfig,
    AttentionContext,
    KVCache,
    mark_residual_projection,
    sdpa_in_context,
    sdpa_static,
)
from .registry import register_attention


@dataclass
class GQAConfig(AttentionConfig):
    #: Key/value heads; null means one per query head (MHA). Must divide ``model.n_heads``.
    n_kv_heads: int | None = None

    def validate(self, model: ModelConfig, field: str) -> None:
        if self.n_kv_heads is not None:
            require(1 <= self.n_kv_heads <= model.n_heads and model.n_heads % self.n_kv_heads == 0,
                    f"{field}.n_kv_heads", self.n_kv_heads,
                    f"divisors of model.n_heads={model.n_heads}: {divisors(model.n_heads)}",
                    reason="must divide model.n_heads")


@register_attention("mqa", n_kv_heads=1)
@register_attention("mha", n_kv_heads=None)
@register_attention("gqa")
class GroupedQueryAttention(Attention):
    Config = GQAConfig
    supports_bidirectional = True
    supports_cross_attention = True
    supports_key_padding = True

    def __init__(self, cfg: GQAConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.n_kv_heads = cfg.n_kv_heads or model.n_heads
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        # one matmul for q, k and v
        self.qkv_proj = nn.Linear(self.d_model, sum(self.split), bias=model.bias)
        self.out_proj = mark_residual_projection(nn.Linear(q_dim, self.d_model, bias=model.bias))

    def project(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``(B, T, C)`` -> rotated ``q`` ``(B, H, T, D)``, ``k, v`` ``(B, H_kv, T, D)``; with
        ``ctx.memory`` ``(B, S, C)``, ``k, v`` ``(B, H_kv, S, D)`` are the memory's, nothing rotated."""
        B, T, _ = x.shape
        if ctx.memory is None:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:  # the same weights, the query rows applied to x and the key/value rows to the memory
            q_dim = self.split[0]
            weight, bias = self.qkv_proj.weight, self.qkv_proj.bias
            q = F.linear(x, weight[:q_dim], None if bias is None else bias[:q_dim])
            k, v = F.linear(ctx.memory, weight[q_dim:], None if bias is None else bias[q_dim:]).split(self.split[1:], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.rope is not None and ctx.memory is None:
            q = ctx.rope.rotate(q, ctx.start_pos)
            k = ctx.rope.rotate(k, ctx.start_pos)
        return q, k, v

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        if cache is not None:
            assert isinstance(cache, KVCache)
            k, v = cache.update(k, v, ctx.start_pos)
        y = sdpa_in_context(q, k, v, ctx, ctx.start_pos, self.dropout_p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """One token over the whole pre-allocated cache, unwritten positions masked."""
        assert isinstance(cache, KVCache)
        q, k, v = self.project(x, ctx)
        k, v = cache.update_at(k, v, ctx.start_pos)
        y = sdpa_static(q, k, v, ctx)
        return self.out_proj(y.transpose(1, 2).reshape(x.shape[0], 1, -1))

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, self.head_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * batch_size * self.n_kv_heads * self.head_dim * context_len * element
