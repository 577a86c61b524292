"""Identity "attention": no token mixing, ``y_t = W_o W_v x_t``.

The ablation's lower bound: the same value/output projections as MHA but every position sees
only itself, so whatever the model learns comes from the MLPs and the embeddings. Nothing is
cached (0 bytes per token). Parameters: ``2 C^2`` (``C = d_model``; with ``model.bias``, ``+ 2 C``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attention, AttentionCache, AttentionContext, EmptyCache, mark_residual_projection
from .registry import register_attention


@register_attention("identity")
class IdentityAttention(Attention):
    uses_rope = False
    # no token mixing: the same function causal or not, and no key to hide
    supports_bidirectional = True
    supports_key_padding = True
    unsupported_reasons = {"cross_attention": "no token mixing: its output reads no other sequence"}

    def __init__(self, cfg, model, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.v_proj = nn.Linear(self.d_model, self.d_model, bias=model.bias)
        self.out_proj = mark_residual_projection(nn.Linear(self.d_model, self.d_model, bias=model.bias))

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``, position-wise."""
        return self.out_proj(self.v_proj(x))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        return self.forward(x, ctx, cache)

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> EmptyCache:
        return EmptyCache()

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        return 0
