"""Sliding-window attention: causal softmax attention restricted to the most recent keys.

Convention: token ``t`` attends to the ``window`` most recent positions, itself included,
i.e. keys ``s`` with ``t - window < s <= t`` (``window=1`` sees only itself). With
``window >= T`` this is ordinary causal attention. Bidirectional (``ctx.causal=False``), the
band is two-sided: ``|t - s| < window``. Key padding masks hide padded keys inside the band. Projections, heads (``n_kv_heads`` for
GQA/MQA) and RoPE are those of :class:`GroupedQueryAttention`; only the attention core and the
cache differ (Beltagy et al. 2020; Child et al. 2019; as used by Mistral 7B).

Cost is O(T * window) in time and memory:

* flex attention with a sliding-window block mask, which skips the key blocks outside the band,
  where :func:`~attnlab.attention.kernels.use_flex_attention` allows it (CUDA, no cache, no
  attention dropout);
* otherwise a blocked computation: queries are split into blocks of ``b`` rows; block ``m``
  gathers only the ``b + window - 1`` keys that any of its rows can see and applies one band
  mask, and a single ``scaled_dot_product_attention`` call runs all blocks as a batch.

The decode cache is a rolling buffer of ``W = min(window, max_len)`` slots per layer, keys and
values ``(B, H_kv, W, D)``; absolute position ``p`` lives in slot ``p % W``, so the cache
never grows past ``window`` tokens: ``2 * B * H_kv * D * min(window, context)`` elements.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.config import ModelConfig, require

from .base import AttentionCache, AttentionContext, sdpa, sdpa_in_context, sdpa_static
from .gqa import GQAConfig, GroupedQueryAttention
from .kernels import use_flex_attention
from .registry import register_attention

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch: use_flex_attention always chooses the blocked band
    create_block_mask = flex_attention = None


@dataclass
class SlidingWindowConfig(GQAConfig):
    #: Keys visible to token t: positions s with t - window < s <= t (itself included).
    window: int = 256
    #: Query rows per block of the blocked (non-flex) path; null: min(window, 128). Each block
    #: scores b + window - 1 keys, so smaller blocks waste less on masked scores but gather
    #: more key/value copies ((b + window - 1) / b per key).
    block_size: int | None = None

    def validate(self, model: ModelConfig, field: str) -> None:
        super().validate(model, field)
        require(isinstance(self.window, int) and self.window >= 1, f"{field}.window", self.window,
                "an integer >= 1")
        if self.block_size is not None:
            require(isinstance(self.block_size, int) and self.block_size >= 1, f"{field}.block_size",
                    self.block_size, "an integer >= 1, or null for min(window, 128)")


class RollingKVCache(AttentionCache):
    """Keys and values of the last ``W`` positions: ``k, v`` ``(B, H_kv, W, D)``, position ``p`` in slot ``p % W``."""

    def __init__(self, batch_size: int, n_kv_heads: int, slots: int, head_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype):
        self.k = torch.zeros(batch_size, n_kv_heads, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, n_kv_heads, slots, head_dim, device=device, dtype=dtype)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def write(self, k: Tensor, v: Tensor, start: int) -> None:
        """Store ``k, v`` ``(B, H_kv, T, D)`` of positions ``start..start+T``; only the last ``W`` survive."""
        keep = min(k.shape[2], self.slots)
        end = start + k.shape[2]
        slot = torch.arange(end - keep, end, device=k.device) % self.slots
        # (under autocast the new rows may be 16-bit while the cache keeps its own dtype)
        self.k.index_copy_(2, slot, k[:, :, -keep:].to(self.k.dtype))
        self.v.index_copy_(2, slot, v[:, :, -keep:].to(self.v.dtype))

    def update_at(self, k: Tensor, v: Tensor, position: Tensor) -> tuple[Tensor, Tensor]:
        """Static step: store one token's ``k, v`` ``(B, H_kv, 1, D)`` of the 0-d tensor ``position``
        in slot ``position % W``; return the whole buffers ``(B, H_kv, W, D)``."""
        slot = (position % self.slots).view(1)
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))
        return self.k, self.v

    def recent(self, end: int, count: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``end-count..end``, in order: ``(B, H_kv, count, D)``."""
        slot = torch.arange(end - count, end, device=self.k.device) % self.slots
        return self.k.index_select(2, slot), self.v.index_select(2, slot)

    def extend(self, k: Tensor, v: Tensor, start: int, window: int) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` ``(B, H_kv, T, D)`` of positions ``start..start+T`` and return the keys and
        values a ``window`` lets these tokens see, ``(B, H_kv, n_prefix + T, D)``: the ``n_prefix``
        cached ones before the new tokens' own. One token gets the written buffer itself: it then
        holds exactly the visible keys, in slot order (which softmax attention does not care
        about, but position-indexed key flags do): no mask, no gather, ``n_prefix = min(start, W - 1)``."""
        T = k.shape[2]
        if self.slots < window and start + T > self.slots:
            raise RuntimeError(f"sliding-window cache holds {self.slots} positions; writing up to {start + T}")
        if T == 1:
            self.write(k, v, start)
            filled = min(start + 1, self.slots)
            return self.k[:, :, :filled], self.v[:, :, :filled]
        # Chunked prefill: the cached keys the first new token can still see, then the new ones
        # (``recent`` copies them, so the new tokens may then overwrite their slots).
        n_prefix = min(start, window - 1)
        if n_prefix > 0:
            k_prev, v_prev = self.recent(start, n_prefix)
            self.write(k, v, start)
            return torch.cat([k_prev, k], dim=2), torch.cat([v_prev, v], dim=2)
        self.write(k, v, start)
        return k, v


@functools.lru_cache(maxsize=8)
def _sliding_block_mask(window: int, seq_len: int, device: torch.device):
    """Flex-attention block mask of the band ``q - window < kv <= q`` (built once per shape)."""

    def in_window(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(in_window, None, None, seq_len, seq_len, device=device)


@functools.cache
def _compiled_flex_attention():
    # Uncompiled flex attention runs an unfused reference path; compile once per process.
    return torch.compile(flex_attention, dynamic=False)


def _key_spans(x: Tensor, pad_front: int, pad_end: int, span: int, step: int) -> Tensor:
    """``(B, H_kv, S, D)`` -> ``(B * n_blocks, H_kv, span, D)``: the keys of each query block."""
    B, H_kv, _, D = x.shape
    spans = F.pad(x, (0, 0, pad_front, pad_end)).unfold(2, span, step)  # (B, H_kv, n_blocks, D, span), a view
    return spans.permute(0, 2, 1, 4, 3).reshape(-1, H_kv, span, D)  # the copy: O(T * span / step) keys


def banded_attention(q: Tensor, k: Tensor, v: Tensor, window: int, n_prefix: int, block: int,
                     dropout_p: float = 0.0, lookahead: int = 0, key_padding_mask: Tensor | None = None) -> Tensor:
    """Sliding-window attention by query blocks, O(T * (block + window + lookahead)) memory.

    ``q`` ``(B, H, T, D)``; ``k, v`` ``(B, H_kv, n_prefix + T, D)``: ``n_prefix <= window - 1``
    earlier keys (from a cache) followed by the queries' own keys. Query ``t`` sees keys
    ``t - window < s <= t + lookahead`` (``lookahead = window - 1``: the two-sided band), only the
    real ones under ``key_padding_mask`` ``(B, n_prefix + T)``. Returns ``(B, T, H * D)``.
    """
    B, H, T, D = q.shape
    b = min(block, T)
    n_blocks = math.ceil(T / b)
    span = b + window - 1 + lookahead  # keys any row of one block may see
    pad_end = n_blocks * b - T  # query rows after the last block's real ones
    key_pad_end = pad_end + lookahead
    # Front padding puts query row r's own key at padded index r + window - 1 for every block.
    pad_front = window - 1 - n_prefix

    # Blocks become batch rows, (B * n_blocks, heads, rows, D): 4-D inputs with a boolean mask
    # take the fused CPU kernel (5-D inputs or overlapping strided views fall back to slow paths).
    q_blocks = F.pad(q, (0, 0, 0, pad_end)).view(B, H, n_blocks, b, D).transpose(1, 2).reshape(-1, H, b, D)
    k_blocks = _key_spans(k, pad_front, key_pad_end, span, b)
    v_blocks = _key_spans(v, pad_front, key_pad_end, span, b)

    # Row i of a block sits at span index i + window - 1, so the band t - window < s <= t + lookahead
    # is i <= j <= i + window - 1 + lookahead in every block; the padding keys before and after
    # the sequence are hidden too.
    row = torch.arange(b, device=q.device)[:, None]
    col = torch.arange(span, device=q.device)[None, :]
    band = (col >= row) & (col <= row + window - 1 + lookahead)  # (b, span)
    padded_index = torch.arange(n_blocks, device=q.device)[:, None] * b + col  # (n_blocks, span)
    in_sequence = (padded_index >= pad_front) & (padded_index < pad_front + n_prefix + T)
    mask = (band & in_sequence[:, None, :]).expand(B, n_blocks, b, span)  # (B, n_blocks, b, span)
    if key_padding_mask is not None:  # each block's keys' flags, spanned like the keys
        flags = key_padding_mask.to(torch.uint8).view(B, 1, -1, 1)  # (F.pad takes no booleans)
        real = _key_spans(flags, pad_front, key_pad_end, span, b)  # (B * n_blocks, 1, span, 1)
        mask = mask & real.view(B, n_blocks, 1, span).bool()
    mask = mask.reshape(B * n_blocks, 1, b, span)

    y = sdpa(q_blocks, k_blocks, v_blocks, attn_mask=mask, dropout_p=dropout_p)  # (B * n_blocks, H, b, D)
    return y.view(B, n_blocks, H, b, D).transpose(2, 3).reshape(B, n_blocks * b, H * D)[:, :T]


@register_attention("sliding")
class SlidingWindowAttention(GroupedQueryAttention):
    Config = SlidingWindowConfig
    supports_cross_attention = False
    unsupported_reasons = {"cross_attention": "a window of positions relates a sequence to itself, not to a memory"}

    def __init__(self, cfg: SlidingWindowConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.window = cfg.window
        self.block_size = cfg.block_size or min(cfg.window, 128)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        T = x.shape[1]
        q, k, v = self.project(x, ctx)
        if cache is None:
            return self.out_proj(self.attend(q, k, v, 0, ctx))
        assert isinstance(cache, RollingKVCache)
        start = ctx.start_pos
        k, v = cache.extend(k, v, start, self.window)
        if T == 1 and ctx.key_padding_mask is not None:
            # one token gets the buffer in slot order: slot s holds the latest position p <= start with p % W == s
            filled = k.shape[2]
            slot = torch.arange(filled, device=x.device)
            mask = ctx.key_padding_mask[:, start - (start - slot) % cache.slots].view(x.shape[0], 1, 1, filled)
            return self.out_proj(sdpa(q, k, v, attn_mask=mask).transpose(1, 2).reshape(x.shape[0], 1, -1))
        return self.out_proj(self.attend(q, k, v, k.shape[2] - T, ctx))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """One token over the rolling buffer: once written, its slots hold exactly the visible keys
        (in slot order, which softmax attention does not care about); before, the unwritten ones
        are masked."""
        assert isinstance(cache, RollingKVCache)
        q, k, v = self.project(x, ctx)
        k, v = cache.update_at(k, v, ctx.start_pos)
        y = sdpa_static(q, k, v, ctx)
        return self.out_proj(y.transpose(1, 2).reshape(x.shape[0], 1, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, n_prefix: int, ctx: AttentionContext) -> Tensor:
        """``q`` ``(B, H, T, D)`` (positions from ``ctx.start_pos``) over ``k, v``
        ``(B, H_kv, n_prefix + T, D)`` (the ``n_prefix`` positions before) -> ``(B, T, H * D)``."""
        B, H, T, D = q.shape
        start = ctx.start_pos
        if n_prefix + T <= self.window:  # no key ever leaves the window: attention without a band
            y = sdpa_in_context(q, k, v, ctx, start, self.dropout_p, key_start=start - n_prefix)
            return y.transpose(1, 2).reshape(B, T, H * D)
        if not ctx.plain:
            padding = ctx.key_padding_mask
            return banded_attention(q, k, v, self.window, n_prefix, self.block_size, self.dropout_p,
                                    lookahead=0 if ctx.causal else self.window - 1,
                                    key_padding_mask=None if padding is None else padding[:, start - n_prefix:start + T])
        if use_flex_attention(q.device, n_prefix, self.dropout_p):
            block_mask = _sliding_block_mask(self.window, T, q.device)
            y = _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H)
            return y.transpose(1, 2).reshape(B, T, H * D)
        return banded_attention(q, k, v, self.window, n_prefix, self.block_size, self.dropout_p)

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> RollingKVCache:
        return RollingKVCache(batch_size, self.n_kv_heads, min(self.window, max_len), self.head_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * batch_size * self.n_kv_heads * self.head_dim * min(self.window, context_len) * element
