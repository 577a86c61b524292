"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2").

Every head's key and value are up-projected from one small normalised latent per token, so the
decoding cache holds that latent instead of per-head keys and values. With ``H`` heads,
``d_n = qk_nope_head_dim``, ``d_r = qk_rope_head_dim``, ``d_v = v_head_dim``, ``r = kv_lora_rank``:

    c_kv      = RMSNorm(W_dkv x)                     (B, T, r)      cached
    k_rope    = RoPE(W_kr x)                         (B, T, d_r)    cached, shared by all heads
    k_h       = [W_uk,h c_kv ; k_rope]               (B, T, d_n + d_r)
    v_h       = W_uv,h c_kv                          (B, T, d_v)
    q_h       = [q_nope_h ; RoPE(q_rope_h)]          from W_q x, or W_uq RMSNorm(W_dq x) with q_lora_rank
    y         = W_o concat_h softmax(q_h k_h^T / sqrt(d_n + d_r) + causal) v_h

RoPE touches only the decoupled ``d_r`` channels: rotating ``W_uk c_kv`` would put a
position-dependent rotation between ``q`` and ``W_uk`` and make absorption (below) impossible.
With learned positions (``ctx.rope is None``) the rope channels are used unrotated: they are then
simply ``d_r`` more key channels shared by all heads, and positions come from the embeddings.

The same attention is computed two ways:

* unabsorbed (training, plain forward, the first prefill into a cache): up-project the latents
  into per-head ``K, V`` once and run ``scaled_dot_product_attention`` per head;
* absorbed (continuing a cached sequence, ``absorb: true``): since
  ``q_nope_h . (W_uk,h c) = (W_uk,h^T q_nope_h) . c``, each query is mapped into the latent space
  and attends straight over the cached ``[c_kv ; k_rope]`` rows, a single key/value "head" shared
  by all query heads (like MQA); ``W_uv,h`` is applied to the attention-weighted latent afterwards.
  A decoded token then reads the ``r + d_r`` cached values per position instead of
  up-projecting each of them into ``H (d_n + d_v)`` values.

Biases (``model.bias``) survive absorption: the key bias adds ``q_nope_h . b_uk,h`` to every score
of a query, which the softmax cancels, and the value bias passes through unchanged because the
attention weights sum to one (with attention dropout in training they no longer do; the absorbed
path only runs on cached continuations, i.e. at inference).

Cache per token and layer: ``r + d_r`` values. On exp10 (defaults): 64 + 32 = 96, against MHA's
2 * 4 * 32 = 256.

Parameters (``C = d_model``, without biases):

    queries      C H (d_n + d_r)                          plain W_q
                 C r_q + r_q + r_q H (d_n + d_r)          with q_lora_rank r_q (+ r_q: its RMSNorm gain)
    W_dkv, W_kr  C (r + d_r)
    RMSNorm      r
    W_uk, W_uv   r H (d_n + d_v)
    W_o          H d_v C

With ``model.bias`` every Linear adds its output width. On exp10 with the defaults:
32768 + 12288 + 64 + 16384 + 16384 = 77888 (MHA: 4 C^2 = 65536). ``model.head_dim`` is not used:
MLA's head widths are its own options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig, require

from .base import (
    Attention,
    AttentionCache,
    AttentionConfig,
    AttentionContext,
    causal_mask,
    mark_residual_projection,
    sdpa,
    sdpa_in_context,
    sdpa_static,
    use_native_decode,
)
from .registry import register_attention


@dataclass
class MLAConfig(AttentionConfig):
    #: Width of the key/value latent c_kv, the cached part besides the rotary key.
    kv_lora_rank: int = 64
    #: Width of the query bottleneck; null or 0 means a plain W_q.
    q_lora_rank: int | None = None
    #: Per-head key channels up-projected from c_kv (no position information).
    qk_nope_head_dim: int = 32
    #: Rotary key channels, one key shared by all heads; each query head has as many. Even.
    qk_rope_head_dim: int = 32
    #: Per-head value width.
    v_head_dim: int = 32
    #: Decode cached continuations with W_uk / W_uv absorbed (same result, less work per token).
    absorb: bool = True

    def validate(self, model: ModelConfig, field: str) -> None:
        require(self.kv_lora_rank >= 1, f"{field}.kv_lora_rank", self.kv_lora_rank, "integers >= 1")
        require(self.q_lora_rank is None or self.q_lora_rank >= 0, f"{field}.q_lora_rank", self.q_lora_rank,
                "null or 0 (a plain W_q), or integers >= 1 (the query bottleneck width)")
        for name in ("qk_nope_head_dim", "v_head_dim"):
            require(getattr(self, name) >= 1, f"{field}.{name}", getattr(self, name), "integers >= 1")
        require(self.qk_rope_head_dim >= 1, f"{field}.qk_rope_head_dim", self.qk_rope_head_dim, "even integers >= 2")
        require(self.qk_rope_head_dim % 2 == 0, f"{field}.qk_rope_head_dim", self.qk_rope_head_dim,
                "even integers >= 2", reason="RoPE rotates channels in pairs")


class MLACache(AttentionCache):
    """Per position ``[c_kv ; k_rope]`` (the rope part already rotated), side by side in one tensor
    ``entries`` ``(B, S_max, r + d_r)``: absorbed decoding attends over a view of it, no copies."""

    def __init__(self, batch_size: int, max_len: int, width: int, device: torch.device | str | None,
                 dtype: torch.dtype):
        self.entries = torch.zeros(batch_size, max_len, width, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.entries.shape[1]

    def update(self, entries: Tensor, start: int) -> Tensor:
        """Write ``entries`` ``(B, T, r + d_r)`` at positions ``start..start+T``; return all rows so far."""
        end = start + entries.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"MLA cache holds {self.max_len} positions; writing up to {end}")
        self.entries[:, start:end] = entries
        return self.entries[:, :end]

    def update_at(self, entries: Tensor, position: Tensor) -> Tensor:
        """Static step: write one token's ``entries`` ``(B, 1, r + d_r)`` at the 0-d tensor
        ``position``; return all ``S_max`` rows."""
        self.entries.index_copy_(1, position.view(1), entries.to(self.entries.dtype))
        return self.entries


@register_attention("mla")
class MultiHeadLatentAttention(Attention):
    Config = MLAConfig
    supports_bidirectional = True
    supports_cross_attention = True
    supports_key_padding = True

    def __init__(self, cfg: MLAConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.kv_lora_rank = cfg.kv_lora_rank
        self.absorb = cfg.absorb
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = 1.0 / math.sqrt(self.qk_dim)
        H, C = self.n_heads, self.d_model

        # queries, per head [q_nope_h ; q_rope_h]
        self.q_lora = bool(cfg.q_lora_rank)
        if self.q_lora:
            self.q_down = nn.Linear(C, cfg.q_lora_rank, bias=model.bias)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=model.norm_eps)
            self.q_up = nn.Linear(cfg.q_lora_rank, H * self.qk_dim, bias=model.bias)
        else:
            self.q_proj = nn.Linear(C, H * self.qk_dim, bias=model.bias)
        # W_dkv and W_kr in one matmul: [latent ; shared rotary key]
        self.kv_down = nn.Linear(C, self.kv_lora_rank + self.rope_dim, bias=model.bias)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=model.norm_eps)
        # W_uk and W_uv in one matmul: per head [k_nope_h ; v_h]
        self.kv_up = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=model.bias)
        self.out_proj = mark_residual_projection(nn.Linear(H * self.v_dim, C, bias=model.bias))

    def project(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``(B, T, C)`` -> ``q_nope`` ``(B, H, T, d_n)``, rotated ``q_rope`` ``(B, H, T, d_r)``
        and the new cache rows ``[c_kv ; rotated k_rope]`` ``(B, T, r + d_r)``; for cross-attention
        the rows ``(B, S, r + d_r)`` of ``ctx.memory``, nothing rotated."""
        B, T, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, self.n_heads, self.qk_dim).transpose(1, 2).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        source = x if ctx.memory is None else ctx.memory
        latent, k_rope = self.kv_down(source).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if ctx.rope is not None and ctx.memory is None:
            q_rope = ctx.rope.rotate(q_rope, ctx.start_pos)
            k_rope = ctx.rope.rotate(k_rope, ctx.start_pos)
        return q_nope, q_rope, torch.cat([self.kv_norm(latent), k_rope], dim=-1)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q_nope, q_rope, entries = self.project(x, ctx)
        if cache is not None:
            assert isinstance(cache, MLACache)
            entries = cache.update(entries, ctx.start_pos)
        # Continuing a cached sequence is decoding: few queries over many cached latents, where
        # absorption saves up-projecting every cached position. Training and the first prefill
        # up-project each position once and can use SDPA's fused per-head kernels.
        if cache is not None and ctx.start_pos > 0 and self.absorb:
            y = self.attend_absorbed(q_nope, q_rope, entries, ctx)
        else:
            y = self.attend_unabsorbed(q_nope, q_rope, entries, ctx)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """One token over every cached row, the unwritten ones masked (absorbed unless ``absorb: false``)."""
        assert isinstance(cache, MLACache)
        q_nope, q_rope, entries = self.project(x, ctx)
        entries = cache.update_at(entries, ctx.start_pos)
        attend = self.attend_absorbed if self.absorb else self.attend_unabsorbed
        y = attend(q_nope, q_rope, entries, ctx, static=True)
        return self.out_proj(y.transpose(1, 2).reshape(x.shape[0], 1, -1))

    def attend_unabsorbed(self, q_nope: Tensor, q_rope: Tensor, entries: Tensor, ctx: AttentionContext,
                          static: bool = False) -> Tensor:
        """Materialise per-head keys and values from ``entries`` ``(B, S, r + d_r)``, then SDPA
        under ``ctx``'s structure (causal from ``ctx.start_pos``), or over a static step's written
        rows (``static``). Returns ``(B, H, T, d_v)``."""
        B, S, _ = entries.shape
        latent, k_rope = entries.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_up(latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, S, self.rope_dim)], dim=-1)
        # SDPA's default scale 1/sqrt(q.shape[-1]) is MLA's 1/sqrt(d_n + d_r)
        if static:
            return sdpa_static(q, k, v, ctx)
        return sdpa_in_context(q, k, v, ctx, ctx.start_pos, self.dropout_p)

    def attend_absorbed(self, q_nope: Tensor, q_rope: Tensor, entries: Tensor, ctx: AttentionContext,
                        static: bool = False) -> Tensor:
        """Attend over the cached latents directly, ``W_uk`` folded into the queries and ``W_uv``
        applied after. ``entries`` ``(B, S, r + d_r)``, causal from ``ctx.start_pos`` (with its key
        padding), or a static step's written rows (``static``: one query per head); returns
        ``(B, H, T, d_v)``."""
        B, H, T, _ = q_nope.shape
        S, r = entries.shape[1], self.kv_lora_rank
        w_uk = self.kv_up.weight.view(H, self.nope_dim + self.v_dim, r)[:, :self.nope_dim]
        # each head's query in latent coordinates: q_nope_h W_uk,h, (B, H, T, d_n) -> (B, H, T, r)
        q = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_rope], dim=-1)
        # All heads share the one key/value "head", so fold heads into the query axis (row h*T + t):
        # one (H*T, S) attention, and the cached rows are never repeated per head.
        q = q.reshape(B, 1, H * T, r + self.rope_dim)
        rows = entries.unsqueeze(1)
        if static:  # the query rows as heads of one token over the one shared KV head
            q = q.transpose(1, 2)
            # the C kernel reads the latents in place as the values (SDPA gets whole rows, as below)
            values = rows[..., :r] if use_native_decode(q, rows, rows) else rows
            y_latent = sdpa_static(q, rows, values, ctx, scale=self.scale).transpose(1, 2)[..., :r]
            return self.attend_values(y_latent, B, H, T)
        if ctx.plain:
            mask = None if T == 1 else causal_mask(T, S, ctx.start_pos, q.device).repeat(H, 1)
        else:
            mask = ctx.attention_mask(T, S, ctx.start_pos, q.device)
            if mask is not None and mask.shape[-2] > 1:  # a mask row per query: tiled over the heads
                mask = mask.repeat(*[1] * (mask.dim() - 2), H, 1)
        # The values are the latents c_kv: pass the whole [c_kv ; k_rope] rows as values (the same
        # width as the keys, so the fused kernel runs without copying the cache) and drop the
        # rope columns of the output.
        y_latent = sdpa(q, rows, rows, attn_mask=mask, dropout_p=self.dropout_p, scale=self.scale)[..., :r]
        return self.attend_values(y_latent, B, H, T)

    def attend_values(self, y_latent: Tensor, B: int, H: int, T: int) -> Tensor:
        """The absorbed attention's latent outputs ``(B, 1, H * T, r)`` through ``W_uv`` (and its bias):
        ``(B, H, T, d_v)``."""
        w_uv = self.kv_up.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)[:, self.nope_dim:]
        y = torch.einsum("bhtr,hvr->bhtv", y_latent.reshape(B, H, T, self.kv_lora_rank), w_uv)
        if self.kv_up.bias is not None:
            y = y + self.kv_up.bias.view(H, 1, self.nope_dim + self.v_dim)[..., self.nope_dim:]
        return y

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> MLACache:
        return MLACache(batch_size, max_len, self.kv_lora_rank + self.rope_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return batch_size * context_len * (self.kv_lora_rank + self.rope_dim) * element
