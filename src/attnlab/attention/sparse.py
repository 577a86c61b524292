"""DeepSeek-V3.2-style sparse attention (DSA): a lightning indexer picks the top-k tokens per query.

A small indexer scores every earlier token ``s`` for query ``t``::

    I(t, s) = sum_j w_j(t) * ReLU(q_j(t) . k(s))

over ``index_n_heads`` indexer heads ``j`` of ``index_head_dim`` channels: ``q_j(t)`` and the
weights ``w_j(t)`` come from ``x_t``, one key ``k(s)`` shared by all indexer heads from ``x_s``
(RoPE-rotated like the main queries and keys when the model uses RoPE). Each query then runs
ordinary MHA/GQA softmax attention over only its ``top_k`` highest-scoring causal positions
(all of them while ``t < top_k``). Ties at the selection boundary go to the most recent
positions, so a flat indexer degrades to a sliding window.

**Training the indexer** (DeepSeek-V3.2-Exp report, section 2.1). The selection is not
differentiable, so the indexer learns from an auxiliary KL loss, averaged over queries and
scaled by ``indexer_loss_weight``, in two stages chosen by the optimizer step
(``AttentionContext.step``):

* dense warm-up, the first ``indexer_warmup_steps`` steps: the main attention is dense causal
  attention, and the target is its distribution summed over heads and L1-normalised (the mean
  over heads, detached), over every causal position: ``KL(p_t || softmax_s I(t, s))``.
  DeepSeek warmed up a fresh indexer beside an already trained dense model and froze that model;
  attnlab trains from scratch, so the main model keeps training (densely) during the warm-up.
* sparse stage, every later step (and whenever ``step`` is None, e.g. a training loop that does
  not pass it): attention over the selected set ``S_t`` only, and the KL is taken over that set,
  ``KL(p_{t,S_t} || softmax(I_{t,S_t}))`` with ``p`` the sparse attention's own probabilities
  (mean over heads): no dense attention is computed.

In both stages the indexer reads a detached copy of its input: the KL trains only the indexer,
the language-model loss only the main model. Evaluation and decoding always attend sparsely.

The default warm-up is 0 steps: sparse from the first step, so a ``sparse`` run is sparse
throughout, at no measurable cost in quality. Measured with ``experiment=ablation_cpu``
(WikiText-2 v1, GPT-2 BPE, ``sparse_256`` at T=1024, 200 steps, seeds 0 and 1, mean +- std):

* warm-up 0 steps (the default): validation loss 5.5958 +- 0.0195, the selection covers 97.7%;
* warm-up 20 steps: 5.5967 +- 0.0168, 98.0%;
* warm-up 100 steps: 5.5988 +- 0.0261, 98.2%.

"Covers": the share of the trained model's dense attention mass (mean over heads, 4 validation
windows) that the indexer's 256 keys hold, relative to the best possible 256 keys (the top 256 of
that attention); the latest 256 keys (a sliding window) hold 87%. The losses differ by at most
0.003, a sixth of their seed spread; a warm-up buys a slightly better indexer (0.3-0.5 points of
coverage), not a better model.
Step time: one training step of the exp10 model (vocabulary 256, batch 1, one thread, CPU time,
median of 3): a warm-up step (dense attention plus the dense KL) is cheaper than a sparse step at
T=1024 and 1.5x dearer at T=4096, where the dense KL's ``T x S`` target dominates. (The sweep's own
tokens/s ran two jobs per two cores beside other work and are not comparable.) A warm-up is for
starting sparse attention from a model trained densely, DeepSeek's case.

**Cost.** The training path (and multi-token prefill) works in chunks of ``chunk_size`` queries
(:mod:`attnlab.attention._topk_attention`): the indexer scores each chunk against the keys
before its causal end (``T x S`` scores in all, DSA's design, never held at once) and picks each
query's ``top_k`` keys; the main heads attend over those keys only, through kernels that skip
the others (on CPU the C kernels of :mod:`~attnlab.attention._native`, or PyTorch's CSR
SDDMM/SpMM without a C compiler, both keeping the ``(T, H, top_k)`` probabilities for the
backward pass; gathered SDPA on CUDA, recomputed per chunk under checkpointing). Memory is
``O(T * top_k)`` plus one chunk. On two CPU threads with the C kernels (exp10 model, vocabulary
256, batch 1; ``scripts/bench.py ... bench.rounds=4``, four runs, see the README), ``sparse_256``
trains at 0.66-0.73x ``mha``'s tokens/s at T=4096 with 1.32x its peak memory, its step time growing
3.5-3.8x from T=1024 to 4096 against ``mha``'s 5.4-7.1x. Per layer at T=4096 the indexer's scoring
and top-k take about 50 ms (its products 20-25), the attention forward about 26 (one pass per
query: logits, softmax, weighted sum) and backward 50-60, and the KL with all its gradients about
24, against 115-150 ms for dense SDPA's forward and backward: the indexer scores ``T^2 / 2``
pairs at width ``index_n_heads * index_head_dim`` (256, twice the exp10 model's query-key width),
so on CPU the indexer alone costs about a third of dense attention at this size. The kernels
over the selected keys are bound by their scattered reads of key and value rows, not by arithmetic.

Decoding caches keys and values like MHA/GQA plus one rotated indexer key per token:
``2 * H_kv * head_dim + index_head_dim`` values per token and layer. Each new token scores every
cached position with the indexer and attends over the gathered ``top_k`` entries only; a
multi-token prefill chunk uses the training path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig, require

from ._topk_attention import (
    DenseIndexerKL,
    SelectedIndexerKL,
    attention_probabilities,
    select_top_k,
    select_top_k_chunked,
    selected_attention,
)
from .base import AttentionCache, AttentionContext, KVCache, causal_mask, sdpa, sdpa_causal, sdpa_static, softmax_scale
from .gqa import GQAConfig, GroupedQueryAttention
from .kernels import selected_attention_kernel
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
    #: Optimizer steps of the dense warm-up stage: main attention dense, the indexer's KL taken
    #: over all causal positions. After it (and outside training) attention is sparse and the KL
    #: covers each query's selected keys only.
    indexer_warmup_steps: int = 0
    #: Query rows per chunk of the training path (selection, attention, KL): memory holds one
    #: chunk's ``(chunk_size, H_I, S)`` indexer scores at most.
    chunk_size: int = 256

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
        require(isinstance(self.indexer_warmup_steps, int) and self.indexer_warmup_steps >= 0,
                f"{field}.indexer_warmup_steps", self.indexer_warmup_steps, "an integer >= 0")
        require(isinstance(self.chunk_size, int) and self.chunk_size >= 1, f"{field}.chunk_size", self.chunk_size,
                "an integer >= 1")


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


def index_scores_one_query(index_q: Tensor, index_k: Tensor, index_w: Tensor) -> Tensor:
    """:func:`index_scores` of one query per sequence, ``index_q`` ``(B, H_I, 1, D_I)`` -> ``(B, 1, S)``,
    with the keys as the rows of the product, ``(B, S, D_I) @ (B, D_I, H_I)``. Compiled, that
    stays a matrix kernel; the ``(H_I, 1) x S`` form was decomposed into a loop fused with the
    cache write and the key's rotation, recomputed for every cached row (24 instead of ~500
    decoded tokens/s for ``sparse_256`` at 4,096 cached tokens)."""
    B, H_I, _, D_I = index_q.shape
    per_head = torch.relu(index_k @ index_q.view(B, H_I, D_I).transpose(1, 2))  # (B, S, H_I)
    return (per_head @ index_w.transpose(1, 2)).transpose(1, 2)


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
    # causal self-attention only, as designed: the indexer selects among each query's causal keys
    supports_bidirectional = supports_cross_attention = supports_key_padding = False
    unsupported_reasons = {
        "bidirectional": "the indexer selects top-k keys among each query's causal keys (DeepSeek-V3.2's design)",
        "cross_attention": "the indexer scores a sequence's own causal keys, not a memory's",
        "key_padding": "the indexer's top-k selection and its KL loss know no padded keys",
    }

    def __init__(self, cfg: SparseConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.top_k = cfg.top_k
        self.index_n_heads = cfg.index_n_heads
        self.index_head_dim = cfg.index_head_dim
        self.indexer_loss_weight = cfg.indexer_loss_weight
        self.indexer_warmup_steps = cfg.indexer_warmup_steps
        self.chunk_size = cfg.chunk_size
        #: ``"native"``, ``"csr"`` or ``"gathered"`` for the training path; None: by device (see
        #: :func:`~attnlab.attention._topk_attention.selected_attention`). Tests set it.
        self.kernel: str | None = None
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

    def warming_up(self, ctx: AttentionContext) -> bool:
        """Whether this is a training step of the dense warm-up stage."""
        return ctx.training and ctx.step is not None and ctx.step < self.indexer_warmup_steps

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``. Full causal attention while every query may keep all its
        positions (``top_k >= start + T``) and during the warm-up; otherwise a one-token step
        gathers its ``top_k`` keys and a longer block (training, prefill) selects and attends in
        query chunks."""
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
        wants_kl = ctx.recording or (ctx.training and self.indexer_loss_weight > 0)
        scale = softmax_scale(self.head_dim)

        if not sparse or self.warming_up(ctx):
            y = sdpa_causal(q, k, v, start, self.dropout_p)
            if wants_kl:  # every causal position is selected (or the warm-up's dense target)
                kl = DenseIndexerKL.apply(index_q, index_k, index_w, q.detach(), k.detach(), start, scale,
                                          self.chunk_size)
                self.add_indexer_loss(kl, ctx)
        elif T == 1:
            allowed = causal_mask(T, S, start, x.device)
            scores = index_scores(index_q, index_k, index_w)
            y = self.attend_gathered(q, k, v, select_top_k(scores, allowed, self.top_k))
            if wants_kl:  # over the selected keys (warm-up steps take the dense branch above)
                selected = select_top_k(scores, allowed, self.top_k)
                # at least float32: under bf16 autocast the scores' rounding would dominate a small KL
                dtype = torch.promote_types(scores.dtype, torch.float32)
                target = attention_probabilities(q.to(dtype), k.to(dtype), selected, scale)
                self.add_indexer_loss(indexer_kl(target, scores.to(dtype), selected).mean(), ctx)
        else:
            kernel = self.kernel or selected_attention_kernel(x.device, self.dropout_p, q.dtype)
            selection = select_top_k_chunked(index_q, index_k, index_w, start, self.top_k, self.chunk_size,
                                             keep_for_kl=wants_kl, native=kernel == "native")
            y, target = selected_attention(q, k, v, selection, scale, self.chunk_size, self.dropout_p,
                                           want_probs=wants_kl, kernel=kernel)
            if wants_kl:
                kl = SelectedIndexerKL.apply(index_q, index_k, index_w, selection, target, self.chunk_size,
                                             kernel == "native")
                selection.scores = selection.relu = None  # the backward pass needs only the keys
                self.add_indexer_loss(kl, ctx)
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
        index_k = cache.update_index_keys_at(index_k, ctx.start_pos)
        if self.top_k >= cache.max_len:
            y = sdpa_static(q, k, v, ctx)
        else:
            written = ctx.visible(k.shape[2]).view(1, 1, -1)
            selected = select_top_k(index_scores_one_query(index_q, index_k, index_w), written,
                                     self.top_k)  # (B, 1, S_max)
            # exactly min(top_k, position + 1) ones: topk returns them first, then unselected rows
            # (value 0), so the gathered rows' visible slots are those of a buffer of top_k slots
            chosen = selected.to(q.dtype).topk(self.top_k, dim=-1)
            rows = chosen.indices.unsqueeze(-1).expand(-1, self.n_kv_heads, -1, self.head_dim)
            y = sdpa_static(q, k.gather(2, rows), v.gather(2, rows), ctx)
        return self.out_proj(y.transpose(1, 2).reshape(B, 1, -1))

    def add_indexer_loss(self, kl: Tensor, ctx: AttentionContext) -> None:
        """Record the indexer's KL and, in training, add it as an aux loss."""
        ctx.record("indexer_kl", kl)
        if ctx.training and self.indexer_loss_weight > 0:
            ctx.add_aux_loss("indexer_kl", self.indexer_loss_weight * kl)

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> SparseKVCache:
        return SparseKVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, self.index_head_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return batch_size * context_len * (2 * self.n_kv_heads * self.head_dim + self.index_head_dim) * element
