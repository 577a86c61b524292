"""DeepSeek-V3.2-style sparse attention: a lightning indexer picks the top-k tokens per query.

A small indexer scores every earlier token ``s`` for query ``t``::

    I(t, s) = sum_j w_j(t) * ReLU(q_j(t) . k(s))

over ``index_n_heads`` indexer heads ``j`` of ``index_head_dim`` channels: ``q_j(t)`` and the
weights ``w_j(t)`` come from ``x_t``, one key ``k(s)`` shared by all indexer heads from ``x_s``
(RoPE-rotated like the main queries and keys when the model uses RoPE). Each query then runs
ordinary MHA/GQA softmax attention over only its ``top_k`` highest-scoring causal positions
(all of them while ``t < top_k``). Ties at the selection boundary go to the most recent
positions, so a flat indexer degrades to a sliding window.

The selection is not differentiable, so the indexer learns from an auxiliary loss: the KL
divergence from the main attention distribution (dense causal softmax averaged over heads,
detached) to ``softmax_s I(t, s)``, averaged over queries and scaled by
``indexer_loss_weight``. The indexer reads a detached copy of its input, so this loss trains
only the indexer and the main model trains only through the language-model loss.

Decoding caches keys and values like MHA/GQA plus one rotated indexer key per token:
``2 * H_kv * head_dim + index_head_dim`` values per token and layer. Each new token scores every
cached position with the indexer and attends over the gathered ``top_k`` entries only; a
multi-token prefill chunk uses the training path (a dense softmax masked to the selection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig, require

from .base import AttentionCache, AttentionContext, KVCache, causal_mask, sdpa, sdpa_causal, softmax_scale
from .gqa import GQAConfig, GroupedQueryAttention
from .registry import register_attention


@dataclass
class SparseConfig(GQAConfig):
    #: Positions each query attends to (DeepSeek-V3.2 uses 2048 at 128K context; 512 is half
    #: the exp10 context of 1024).
    top_k: int = 512
    #: Indexer heads ``j`` and their width: small, as the indexer scores all ``T^2`` pairs.
    index_n_heads: int = 4
    index_head_dim: int = 64
    #: Scale of the indexer's KL loss. It is the only loss reaching the indexer (whose input is
    #: detached), so it sets the indexer's effective learning rate, not a trade-off with the LM loss.
    indexer_loss_weight: float = 0.01

    def validate(self, model: ModelConfig, field: str) -> None:
        super().validate(model, field)
        require(self.top_k >= 1, f"{field}.top_k", self.top_k, "an integer >= 1")
        require(self.index_n_heads >= 1, f"{field}.index_n_heads", self.index_n_heads, "an integer >= 1")
        require(self.index_head_dim >= 1, f"{field}.index_head_dim", self.index_head_dim, "an integer >= 1")
        if model.pos_encoding == "rope":
            require(self.index_head_dim % 2 == 0, f"{field}.index_head_dim", self.index_head_dim,
                    "an even integer >= 2", reason="RoPE rotates channel pairs")
        require(self.indexer_loss_weight >= 0, f"{field}.indexer_loss_weight", self.indexer_loss_weight,
                "a number >= 0")


class SparseKVCache(KVCache):
    """:class:`KVCache` plus the rotated indexer keys ``index_k`` ``(B, S_max, D_index)``."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, index_head_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype):
        super().__init__(batch_size, n_kv_heads, max_len, head_dim, head_dim, device, dtype)
        self.index_k = torch.zeros(batch_size, max_len, index_head_dim, device=device, dtype=dtype)

    def update_index_keys(self, index_k: Tensor, start: int) -> Tensor:
        """Write ``index_k`` ``(B, T, D_index)`` at ``start..start+T``; return all ``(B, start+T, D_index)``."""
        end = start + index_k.shape[1]
        self.index_k[:, start:end] = index_k
        return self.index_k[:, :end]

    def update_index_keys_at(self, index_k: Tensor, position: Tensor) -> Tensor:
        """Static step: write one token's ``index_k`` ``(B, 1, D_index)`` at the 0-d tensor
        ``position``; return all ``(B, S_max, D_index)`` (unwritten rows are zeros)."""
        self.index_k.index_copy_(1, position.view(1), index_k.to(self.index_k.dtype))
        return self.index_k


def index_scores(index_q: Tensor, index_k: Tensor, index_w: Tensor) -> Tensor:
    """``I(t, s) = sum_j w_j(t) ReLU(q_j(t) . k(s))``.

    ``index_q`` ``(B, H_I, T, D_I)``, ``index_k`` ``(B, S, D_I)``, ``index_w`` ``(B, T, H_I)``
    -> ``(B, T, S)`` (future positions are not masked here)."""
    per_head = torch.relu(index_q @ index_k.unsqueeze(1).transpose(-1, -2))
    return torch.einsum("bjts,btj->bts", per_head, index_w)


def select_top_k(scores: Tensor, allowed: Tensor, top_k: int) -> Tensor:
    """Boolean mask of the ``top_k`` highest ``scores`` among the ``allowed`` positions of each row.

    ``scores`` ``(..., S)``, ``allowed`` broadcastable to it. Rows with at most ``top_k`` allowed
    positions keep all of them; otherwise exactly ``top_k`` are kept, ties at the threshold going
    to the latest positions (deterministic, so a one-row decode step picks what the full forward
    picks, and ReLU's exact zeros do not make the choice arbitrary)."""
    allowed = allowed.expand_as(scores)
    if top_k >= scores.shape[-1]:
        return allowed
    masked = scores.masked_fill(~allowed, float("-inf"))
    threshold = masked.topk(top_k, dim=-1).values[..., -1:]
    above = masked > threshold
    tied = (masked == threshold) & allowed
    # of the tied positions, skip the earliest ones that do not fit beside those above the threshold
    skipped = tied.sum(-1, keepdim=True) - (top_k - above.sum(-1, keepdim=True))
    return above | (tied & (tied.cumsum(-1) > skipped))


def indexer_kl(target: Tensor, scores: Tensor, allowed: Tensor) -> Tensor:
    """Per-query ``KL(p || softmax(I))`` over the ``allowed`` positions.

    ``target`` ``(B, T, S)``: probabilities ``p`` summing to one over ``allowed`` and zero outside;
    ``scores`` ``(B, T, S)``: finite indexer scores ``I`` (values outside ``allowed`` are ignored);
    ``allowed`` broadcastable boolean. Returns ``(B, T)``."""
    # -sum_s p log softmax(I) = logsumexp(I) - sum_s p I, without a (B, T, S) log-probability tensor
    cross_entropy = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1) - (target * scores).sum(-1)
    entropy = -torch.special.xlogy(target, target).sum(-1)
    return cross_entropy - entropy


@register_attention("sparse")
class SparseAttention(GroupedQueryAttention):
    Config = SparseConfig

    def __init__(self, cfg: SparseConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.top_k = cfg.top_k
        self.index_n_heads = cfg.index_n_heads
        self.index_head_dim = cfg.index_head_dim
        self.indexer_loss_weight = cfg.indexer_loss_weight
        # one matmul for the indexer queries q_j, the shared key k and the head weights w_j
        self.index_split = (cfg.index_n_heads * cfg.index_head_dim, cfg.index_head_dim, cfg.index_n_heads)
        self.index_proj = nn.Linear(self.d_model, sum(self.index_split), bias=model.bias)

    def project_index(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``(B, T, C)`` -> ``index_q`` ``(B, H_I, T, D_I)``, ``index_k`` ``(B, T, D_I)``,
        ``index_w`` ``(B, T, H_I)``, queries and keys rotated."""
        B, T, _ = x.shape
        index_q, index_k, index_w = self.index_proj(x).split(self.index_split, dim=-1)
        index_q = index_q.view(B, T, self.index_n_heads, self.index_head_dim).transpose(1, 2)
        if ctx.rope is not None:
            index_q = ctx.rope.rotate(index_q, ctx.start_pos)
            index_k = ctx.rope.rotate(index_k, ctx.start_pos)
        return index_q, index_k, index_w

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``. Full causal attention while every query may keep all its
        positions (``top_k >= start + T``); otherwise a one-token step gathers its ``top_k`` keys
        and a longer block (training, prefill) masks a dense softmax to the selected positions."""
        B, T, _ = x.shape
        start = ctx.start_pos
        q, k, v = self.project(x, ctx)
        # the indexer is trained by its KL loss alone: keep it out of the main model's graph
        index_q, index_k, index_w = self.project_index(x.detach(), ctx)
        if cache is not None:
            assert isinstance(cache, SparseKVCache)
            k, v = cache.update(k, v, start)
            index_k = cache.update_index_keys(index_k, start)
        S = start + T
        sparse = self.top_k < S
        wants_kl = ctx.training or ctx.recording
        allowed = causal_mask(T, S, start, x.device)
        scores = index_scores(index_q, index_k, index_w) if sparse or wants_kl else None

        if not sparse:
            y = sdpa_causal(q, k, v, start, self.dropout_p)
        elif T == 1:
            y = self.attend_gathered(q, k, v, select_top_k(scores, allowed, self.top_k))
        else:
            selected = select_top_k(scores, allowed, self.top_k)
            y = sdpa(q, k, v, attn_mask=selected.unsqueeze(1), dropout_p=self.dropout_p)
        if wants_kl:
            self.indexer_loss(q, k, scores, allowed, ctx)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend_gathered(self, q: Tensor, k: Tensor, v: Tensor, selected: Tensor) -> Tensor:
        """One decoding step: ``q`` ``(B, H, 1, D)`` attends over the ``top_k`` selected rows of
        ``k, v`` ``(B, H_kv, S, D)`` (``selected`` ``(B, 1, S)``, exactly ``top_k`` True per row),
        gathered so the softmax reads ``top_k`` entries, not ``S``."""
        # topk over a 0/1 row with exactly top_k ones returns their indices (no host sync, unlike nonzero)
        positions = selected.to(q.dtype).topk(self.top_k, dim=-1).indices  # (B, 1, top_k)
        positions = positions.unsqueeze(-1).expand(-1, self.n_kv_heads, -1, self.head_dim)
        k_selected, v_selected = k.gather(2, positions), v.gather(2, positions)
        return sdpa(q, k_selected, v_selected, dropout_p=self.dropout_p)

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """One token over the static cache: the indexer scores every cached row (unwritten ones
        excluded), and the query attends over exactly ``top_k`` gathered rows, those beyond the
        ``position + 1`` written ones (early positions) masked. Until the cache holds more than
        ``top_k`` rows this is dense attention, as in :meth:`forward`."""
        assert isinstance(cache, SparseKVCache)
        B = x.shape[0]
        q, k, v = self.project(x, ctx)
        index_q, index_k, index_w = self.project_index(x, ctx)
        k, v = cache.update_at(k, v, ctx.start_pos)
        visible = ctx.visible(k.shape[2])
        index_k = cache.update_index_keys_at(index_k, ctx.start_pos)
        if self.top_k >= cache.max_len:
            y = sdpa(q, k, v, attn_mask=visible)
        else:
            written = visible.view(1, 1, -1)
            selected = select_top_k(index_scores(index_q, index_k, index_w), written, self.top_k)  # (B, 1, S_max)
            # exactly min(top_k, position + 1) ones: topk returns them first, then unselected rows
            # (value 0) that the mask hides
            chosen = selected.to(q.dtype).topk(self.top_k, dim=-1)
            rows = chosen.indices.unsqueeze(-1).expand(-1, self.n_kv_heads, -1, self.head_dim)
            mask = chosen.values.view(B, 1, 1, self.top_k) > 0
            y = sdpa(q, k.gather(2, rows), v.gather(2, rows), attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, 1, -1))

    @torch.no_grad()
    def attention_target(self, q: Tensor, k: Tensor, allowed: Tensor) -> Tensor:
        """Dense causal attention probabilities of the main heads, averaged over heads.

        ``q`` ``(B, H, T, D)``, ``k`` ``(B, H_kv, S, D)`` -> ``(B, T, S)``. Query heads of one KV
        group are stacked along time so each KV head is used once, without repeating it."""
        B, H, T, D = q.shape
        S = k.shape[2]
        grouped_q = q.reshape(B, self.n_kv_heads, (H // self.n_kv_heads) * T, D)
        logits = (grouped_q @ k.transpose(-1, -2)).view(B, H, T, S) * softmax_scale(D)
        return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).mean(dim=1)

    def indexer_loss(self, q: Tensor, k: Tensor, scores: Tensor, allowed: Tensor, ctx: AttentionContext) -> None:
        """Record the indexer's KL to the main attention and, in training, add it as an aux loss."""
        # at least float32: under bf16 autocast the scores' rounding would dominate a small KL
        dtype = torch.promote_types(scores.dtype, torch.float32)
        kl = indexer_kl(self.attention_target(q, k, allowed).to(dtype), scores.to(dtype), allowed).mean()
        ctx.record("indexer_kl", kl)
        if ctx.training and self.indexer_loss_weight > 0:
            ctx.add_aux_loss("indexer_kl", self.indexer_loss_weight * kl)

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> SparseKVCache:
        return SparseKVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, self.index_head_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return batch_size * context_len * (2 * self.n_kv_heads * self.head_dim + self.index_head_dim) * element
