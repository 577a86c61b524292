"""The sparse mechanism's training path in query chunks: the lightning indexer's top-k selection,
softmax attention over each query's selected keys, and the indexer's two KL objectives.

Nothing here holds a ``T x S`` tensor. Queries are processed ``chunk_size`` rows at a time; a
chunk ending at position ``e`` only looks at keys ``< e`` (its causal end). What survives a chunk is
``O(T * K)``: the selected key positions ``(B, T, K)``, and for the KL the selected indexer scores.

* :func:`select_top_k_chunked`: the indexer scores ``I(t, s)`` of one query chunk at a time (no
  gradient), ``top_k`` of each row with ties at the threshold going to the latest positions,
  exactly as :func:`select_top_k` decides on a whole row.
* :func:`selected_attention`: softmax attention of each query over its ``K`` selected keys.
  On CPU in float32 (:class:`NativeSelectedAttention`) with the C kernels of
  :mod:`~attnlab.attention._native`, which also select (:func:`select_top_k_chunked` with
  ``native``) and compute the sparse stage's KL gradients. Without them
  (:class:`SelectedAttention`) with PyTorch's sparse CSR kernels: one sampled
  matrix product (SDDMM) gives the ``K`` logits of every (query, head), one sparse-dense product
  (SpMM) the output, so no gathered copy of the keys or values is ever written. It is a custom
  autograd function that saves the output and the ``(B, T, H, K)`` probabilities (``O(T * K)``,
  like the selection; recomputing them from a log-sum-exp as flash attention does would cost one
  more SDDMM per chunk in the backward pass, a third of its time on CPU); the key and value
  gradients are sparse-dense products with the transposed selection (built per chunk by one
  stable sort).
  On CUDA, or with attention dropout, each chunk gathers its keys and values and runs
  ``scaled_dot_product_attention`` with one query per (token, head), under activation
  checkpointing so that the gathered copies are not kept for the backward pass
  (:func:`gathered_attention`).
* :class:`DenseIndexerKL` and :class:`SelectedIndexerKL`: the indexer's KL loss over all causal
  positions (warm-up) or over the selected keys only. Both compute the loss and its gradient
  with respect to the indexer's queries, key and head weights in the same chunk pass (the loss is
  a scalar), so the backward pass only scales the stored gradients.

Rows of the CSR matrices are (token, head) pairs, ``r * H + h`` for chunk row ``r = b * n + t``;
columns are (key, KV head) pairs, ``kappa * H_kv + h_kv`` with ``kappa = b * S + s``, which is
the row order of ``k.transpose(1, 2).reshape(-1, D)``. The values of row ``r * H + h`` are its
``K`` selected keys in slot order, so the flat value ``(r * H + h) * K + slot`` belongs to query
row ``r``, head ``h`` and the key in ``keys[r, slot]``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _native
from .base import sdpa
from .kernels import selected_attention_kernel


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


def query_chunks(start: int, end: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(a, b)`` row ranges of at most ``chunk_size`` rows covering ``start..end``."""
    for a in range(start, end, chunk_size):
        yield a, min(a + chunk_size, end)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: under bf16 autocast the softmax statistics would round too coarsely."""
    return torch.promote_types(dtype, torch.float32)


def _without_autocast(method):
    """Run an autograd function's forward or backward with autocast off (the sparse kernels have
    no 16-bit paths; inputs are cast to :func:`_compute_dtype` inside)."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)

    return wrapper


# ----------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """The keys each query of a block attends to.

    ``keys`` ``(B, T, K)`` int32: distinct key positions per query row ``t`` (position ``start + t``).
    The first ``head`` rows are the queries at positions ``< K``: they keep all their positions,
    so their row is ``0..K-1`` and the entries beyond the query's own position are padding
    (:meth:`valid`). For the indexer's KL, ``scores`` ``(B, T, K)`` holds the indexer score at
    each selected key and ``relu`` ``(B, T, H_I, K)`` its heads' ``ReLU(q_j . k)`` terms."""

    keys: Tensor
    start: int
    head: int
    scores: Tensor | None = None
    relu: Tensor | None = None
    #: CSR structures per query chunk ``(a, b)`` (:func:`chunk_patterns`).
    patterns: dict[tuple[int, int], ChunkPattern] | None = None

    def valid(self, a: int = 0, b: int | None = None) -> Tensor | None:
        """``(B, b - a, K)`` boolean: which entries of rows ``a..b`` are real keys; None when all are."""
        b = self.keys.shape[1] if b is None else b
        if a >= self.head:
            return None
        positions = torch.arange(self.start + a, self.start + b, device=self.keys.device)
        return self.keys[:, a:b] <= positions[:, None]


def index_head_terms(index_q: Tensor, index_k: Tensor) -> Tensor:
    """``ReLU(q_j(t) . k(s))`` for ``index_q`` ``(B, H_I, n, D_I)`` and ``index_k`` ``(B, e, D_I)``
    -> ``(B, H_I, n, e)``."""
    return torch.relu_(index_q @ index_k.unsqueeze(1).transpose(-1, -2))


def weighted_heads(terms: Tensor, index_w: Tensor) -> Tensor:
    """``I(t, s) = sum_j w_j(t) terms_j(t, s)``: ``terms`` ``(B, H_I, n, e)``, ``index_w`` ``(B, n, H_I)``
    -> ``(B, n, e)``."""
    return torch.einsum("bjts,btj->bts", terms, index_w)


def top_k_latest(scores: Tensor, top_k: int) -> Tensor:
    """Indices ``(..., top_k)`` of the ``top_k`` highest entries of each row of ``scores`` ``(..., e)``,
    ties at the threshold going to the latest positions (``-inf`` marks excluded positions; each row
    needs more than ``top_k`` finite entries).

    One ``topk`` of ``top_k + 1`` entries finds the selection and detects the rows where the
    ``top_k``-th and the next value tie (the only rows where ``topk``'s own choice among equal
    values could differ); those few rows are decided again by the exact rule."""
    values, indices = scores.topk(top_k + 1, dim=-1, sorted=False)
    # drop the lowest of the top_k + 1: move the last column into its slot
    drop = values.argmin(dim=-1, keepdim=True)
    lowest = values.gather(-1, drop)
    values.scatter_(-1, drop, values[..., -1:].clone())
    indices.scatter_(-1, drop, indices[..., -1:].clone())
    values, indices = values[..., :top_k], indices[..., :top_k]
    tied = values.amin(dim=-1, keepdim=True) == lowest
    if tied.any():
        rows = tied.squeeze(-1).nonzero(as_tuple=True)
        row_scores = scores[rows]
        chosen = select_top_k(row_scores, row_scores > float("-inf"), top_k)
        indices[rows] = chosen.nonzero()[:, -1].view(-1, top_k)
    return indices


#: Query rows per product block of the native selection: 4 indexer heads x 32 rows x 4,096 keys
#: of products are 2 MiB, one core's L2 cache.
NATIVE_SELECT_ROWS = 32


@torch.no_grad()
def select_top_k_chunked(index_q: Tensor, index_k: Tensor, index_w: Tensor, start: int, top_k: int,
                         chunk_size: int, keep_for_kl: bool, native: bool = False) -> Selection:
    """The ``top_k`` causal positions of every query, scoring one chunk of queries at a time.

    ``index_q`` ``(B, H_I, T, D_I)`` at positions ``start..start+T``, ``index_k`` ``(B, S, D_I)``
    with ``S = start + T > top_k``, ``index_w`` ``(B, T, H_I)``. A chunk of ``n`` queries ending at
    position ``e`` scores keys ``< e`` only: ``(B, H_I, n, e)`` at most, never ``T x S``.
    ``native``: each chunk's scores and top-k by :func:`~attnlab.attention._native.select_chunk`
    (float32 on CPU), which reads each row's causal positions only, so the future needs no mask."""
    B, H_I, T, _ = index_q.shape
    device = index_q.device
    head = min(T, max(0, top_k - start))  # rows at positions < top_k keep all their positions
    keys = torch.empty(B, T, top_k, dtype=torch.int32, device=device)
    keys[:, :head] = torch.arange(top_k, device=device)
    selection = Selection(keys, start, head)
    if keep_for_kl:
        selection.scores = index_q.new_empty(B, T, top_k)
        selection.relu = index_q.new_empty(B, T, H_I, top_k)
        if head:
            terms = index_head_terms(index_q[:, :, :head], index_k[:, :top_k])
            selection.scores[:, :head] = weighted_heads(terms, index_w[:, :head])
            selection.relu[:, :head] = terms.transpose(1, 2)
    if native:  # one workspace for every block; each block writes its rows of the selection in place
        scratch = torch.empty(_native.select_scratch_size(start + T), dtype=torch.int32)
        into = (keys, selection.scores, selection.relu)
        weights = index_w.float().contiguous()  # read by each block at its rows, like `into`
    # native: blocks of rows whose products stay in the cache between the product and the selection
    for a, b in query_chunks(head, T, min(chunk_size, NATIVE_SELECT_ROWS) if native else chunk_size):
        end = start + b
        if native:  # ReLU, head weights, top-k and the KL's inputs row by row, causal positions only
            products = index_q[:, :, a:b] @ index_k[:, :end].unsqueeze(1).transpose(-1, -2)  # (B, H_I, n, e)
            _native.select_chunk(products, weights, start + a + 1, top_k, keep_for_kl, into, a, scratch)
            continue
        terms = index_head_terms(index_q[:, :, a:b], index_k[:, :end])
        scores = weighted_heads(terms, index_w[:, a:b])
        future = torch.ones(b - a, b - a, dtype=torch.bool, device=device).triu(1)
        scores[:, :, start + a:].masked_fill_(future, float("-inf"))
        chosen = top_k_latest(scores, top_k)
        keys[:, a:b] = chosen
        if keep_for_kl:
            selection.scores[:, a:b] = scores.gather(-1, chosen)
            selection.relu[:, a:b] = terms.gather(-1, chosen.unsqueeze(1).expand(-1, H_I, -1, -1)).transpose(1, 2)
    return selection


# ----------------------------------------------------------------------------------- CSR patterns


class ChunkPattern:
    """CSR structure of one query chunk's selection, for ``n_heads`` query heads reading
    ``n_groups`` key groups (head ``h`` reads group ``h // (n_heads / n_groups)``).

    Rows are (query, head) pairs ``(b * n + t) * n_heads + h``; columns are (key, group) pairs
    ``(b * S + s) * n_groups + g``, the row order of ``k.transpose(1, 2).reshape(-1, D)``. Row
    ``r`` holds its ``K`` selected keys in slot order, so value ``r * K + slot`` is the entry of
    ``keys[b, t, slot]``. Heads are folded into the rows so that each product is one kernel call
    for the whole chunk (each call is a parallel region: on a shared CPU their count matters).

    The transpose (:meth:`transposed`) covers the keys before ``e`` only, rows
    ``(g * B + b) * e + s``, ``e`` the chunk's causal end (or ``K`` for rows padded past it); its structure comes from one stable sort of the chunk's keys,
    built once by whichever pass needs it first and kept (``n * K`` int32) for the others. Indices
    are int32: half the memory of int64, and the CPU kernels run faster with them."""

    def __init__(self, keys: Tensor, n_keys: int, end: int):
        self.keys = keys  # (B, n, K) int32
        self.shape = tuple(keys.shape)
        self.n_keys, self.end = n_keys, end
        self._order: tuple[Tensor, Tensor] | None = None

    def _batch_offsets(self, stride: int) -> Tensor:
        B = self.shape[0]
        return torch.arange(0, B * stride, stride, device=self.keys.device, dtype=torch.int32).view(B, 1, 1)

    def structure(self, n_heads: int, n_groups: int) -> tuple[Tensor, Tensor]:
        """``crow, col`` of the ``(B * n * n_heads, B * S * n_groups)`` matrix."""
        B, n, K = self.shape
        device = self.keys.device
        group = torch.arange(n_heads, device=device, dtype=torch.int32) // (n_heads // n_groups)
        col = (self.keys + self._batch_offsets(self.n_keys)).unsqueeze(2) * n_groups + group.view(1, 1, -1, 1)
        crow = torch.arange(0, B * n * n_heads * K + 1, K, device=device, dtype=torch.int32)
        return crow, col.view(-1)

    def transposed(self, n_heads: int, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
        """``crow, col, value_index`` of the transpose restricted to the keys before the causal end,
        ``(n_groups * B * e, B * n * n_heads)``; ``value_index``: each entry's position among the
        forward matrix's values."""
        B, n, K = self.shape
        device = self.keys.device
        if self._order is None:
            local = (self.keys + self._batch_offsets(self.end)).view(-1)
            order = torch.sort(local, stable=True).indices.int()  # entries by key, rows ascending within a key
            self._order = (order, torch.bincount(local, minlength=B * self.end).int())
        order, counts = self._order
        per_group = n_heads // n_groups
        row, slot = order.div(K, rounding_mode="floor"), order.remainder(K)
        heads = torch.arange(n_heads, device=device, dtype=torch.int32).view(n_groups, 1, per_group)
        col = row.view(1, -1, 1) * n_heads + heads  # (n_groups, n * K, per_group)
        value_index = col * K + slot.view(1, -1, 1)
        crow = F.pad((counts * per_group).repeat(n_groups).cumsum(0, dtype=torch.int32), (1, 0))
        return crow, col.view(-1), value_index.view(-1)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _sampled(crow: Tensor, col: Tensor, a_rows: Tensor, b_rows: Tensor, zeros: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * a_rows[r] . b_rows[c]`` at every stored entry ``(r, c)`` (SDDMM): flat values.
    ``zeros``: as many zeros as entries (the kernel reads the pattern's values even with ``beta=0``).
    The CPU kernel converts int32 indices to int64 on every call: pass int64 ones (SpMM, by
    contrast, runs faster with int32: 1.2 vs 1.6 ms for 262,144 entries of width 32)."""
    pattern = _csr(crow, col, zeros, (a_rows.shape[0], b_rows.shape[0]))
    return torch.sparse.sampled_addmm(pattern, a_rows, b_rows.T, beta=0.0, alpha=scale).values()


def _times(crow: Tensor, col: Tensor, values: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """``M @ dense`` (SpMM) for the ``(n_rows, dense.shape[0])`` CSR matrix ``M``."""
    return torch.sparse.mm(_csr(crow, col, values, (n_rows, dense.shape[0])), dense)


def chunk_patterns(selection: Selection, n_keys: int, chunk_size: int) -> dict[tuple[int, int], ChunkPattern]:
    """The :class:`ChunkPattern` of every query chunk, built once per selection and shared by the
    attention's backward pass and the KL."""
    if selection.patterns is None:
        top_k = selection.keys.shape[-1]
        # keys after the causal end appear only as the padding of rows at positions < top_k
        selection.patterns = {(a, b): ChunkPattern(selection.keys[:, a:b], n_keys,
                                                   min(n_keys, max(selection.start + b, top_k)))
                              for a, b in query_chunks(0, selection.keys.shape[1], chunk_size)}
    return selection.patterns


def _token_rows(t: Tensor) -> Tensor:
    """``(B, G, S, D)`` -> ``(B * S * G, D)`` contiguous: row ``(b * S + s) * G + g``."""
    return t.transpose(1, 2).reshape(-1, t.shape[-1]).contiguous()


# ----------------------------------------------------------------------------------- attention


class SelectedAttention(torch.autograd.Function):
    """Softmax attention of ``q`` ``(B, H, T, D)`` over the selected rows of ``k, v`` ``(B, H_kv, S, D)``
    with sparse CSR kernels (see the module docstring): per chunk one SDDMM and one SpMM forward;
    backward reads the saved probabilities and runs one SDDMM, one SpMM and two transposed SpMMs.

    Returns the output ``(B, H, T, D)`` and, when ``want_probs``, the attention probabilities
    averaged over heads ``(B, T, K)`` (the indexer's KL target; no gradient)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float, chunk_size: int,
                want_probs: bool):
        B, H, T, D = q.shape
        H_kv, S = k.shape[1], k.shape[2]
        K = selection.keys.shape[-1]
        dtype = _compute_dtype(q.dtype)
        q_rows = q.to(dtype).transpose(1, 2)  # (B, T, H, D)
        k_rows, v_rows = _token_rows(k.to(dtype)), _token_rows(v.to(dtype))
        out = q_rows.new_empty(B, T, H, D)
        # for the backward pass only (prefill and evaluation do not keep them)
        saved_probs = q_rows.new_empty(B, T, H, K) if any(ctx.needs_input_grad[:3]) else None
        probs = q_rows.new_empty(B, T, K) if want_probs else None
        zeros = q_rows.new_zeros(B * min(chunk_size, T) * H * K)
        for (a, b), pattern in chunk_patterns(selection, S, chunk_size).items():
            crow, col = pattern.structure(H, H_kv)
            q_chunk = q_rows[:, a:b].reshape(-1, D)
            logits = _sampled(crow.long(), col.long(), q_chunk, k_rows, zeros[:col.numel()], scale)
            logits = logits.view(B, b - a, H, K)
            valid = selection.valid(a, b)
            if valid is not None:
                logits.masked_fill_(~valid.unsqueeze(2), float("-inf"))
            p = logits.softmax(dim=-1)
            if saved_probs is not None:
                saved_probs[:, a:b] = p
            out[:, a:b] = _times(crow, col, p.view(-1), v_rows, q_chunk.shape[0]).view(B, b - a, H, D)
            if want_probs:
                probs[:, a:b] = p.mean(dim=2)
        if want_probs:
            ctx.mark_non_differentiable(probs)
        ctx.save_for_backward(q, k, v, out, saved_probs)
        ctx.selection, ctx.scale = selection, scale
        return out.transpose(1, 2).to(q.dtype), probs

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_y: Tensor, grad_probs: Tensor | None):
        q, k, v, out, saved_probs = ctx.saved_tensors
        selection, scale = ctx.selection, ctx.scale
        B, H, T, D = q.shape
        H_kv, S = k.shape[1], k.shape[2]
        K = selection.keys.shape[-1]
        dtype = out.dtype
        q_rows = q.to(dtype).transpose(1, 2)
        k_rows, v_rows = _token_rows(k.to(dtype)), _token_rows(v.to(dtype))
        grad_out = grad_y.to(dtype).transpose(1, 2)  # (B, T, H, D)
        delta = (grad_out * out).sum(-1)  # (B, T, H): sum_s p_s dp_s of each row
        grad_q = q_rows.new_empty(B, T, H, D)
        grad_k = q_rows.new_zeros(H_kv, B, S, D)
        grad_v = q_rows.new_zeros(H_kv, B, S, D)
        patterns = selection.patterns
        zeros = q_rows.new_zeros(B * max(b - a for a, b in patterns) * H * K)
        for (a, b), pattern in patterns.items():
            crow, col = pattern.structure(H, H_kv)
            crow64, col64 = crow.long(), col.long()
            q_chunk = q_rows[:, a:b].reshape(-1, D)
            grad_chunk = grad_out[:, a:b].reshape(-1, D)
            p = saved_probs[:, a:b]
            grad_p = _sampled(crow64, col64, grad_chunk, v_rows, zeros[:col.numel()]).view(B, b - a, H, K)
            grad_logits = grad_p.sub_(delta[:, a:b, :, None]).mul_(p).mul_(scale).view(-1)
            grad_q[:, a:b] = _times(crow, col, grad_logits, k_rows, q_chunk.shape[0]).view(B, b - a, H, D)
            crow_t, col_t, value_index = pattern.transposed(H, H_kv)
            end, n_rows = pattern.end, H_kv * B * pattern.end
            grad_k[:, :, :end] += _times(crow_t, col_t, grad_logits.index_select(0, value_index), q_chunk,
                                         n_rows).view(H_kv, B, end, D)
            grad_v[:, :, :end] += _times(crow_t, col_t, p.reshape(-1).index_select(0, value_index), grad_chunk,
                                         n_rows).view(H_kv, B, end, D)
        return (grad_q.transpose(1, 2).to(q.dtype), grad_k.transpose(0, 1).to(k.dtype),
                grad_v.transpose(0, 1).to(v.dtype), None, None, None, None)


class NativeSelectedAttention(torch.autograd.Function):
    """:class:`SelectedAttention` through the C kernels of :mod:`~attnlab.attention._native`
    (float32 on CPU), all rows in one call each: forward one pass over each query's keys for the
    logits, their softmax and the weighted sum of the values; backward one pass over them for all
    three gradients (the key and value gradients scattered per KV group, or per thread for MQA),
    with no transposed selection to build. Keeps the output and the ``(B, T, H, K)`` probabilities."""

    @staticmethod
    @_without_autocast
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float, want_probs: bool):
        f32 = torch.float32
        q_rows = q.to(f32).transpose(1, 2).contiguous()  # (B, T, H, D)
        k_rows = k.to(f32).transpose(1, 2).contiguous()  # (B, S, H_kv, D)
        v_rows = v.to(f32).transpose(1, 2).contiguous()
        keys = selection.keys
        # p (B, T, H, K), out (B, T, H, D), probs (B, T, K)
        p, out, probs = _native.attention_forward(q_rows, k_rows, v_rows, keys, selection.start, scale, want_probs)
        if want_probs:
            ctx.mark_non_differentiable(probs)
        ctx.save_for_backward(q_rows, k_rows, v_rows, out, p if any(ctx.needs_input_grad[:3]) else None)
        ctx.selection, ctx.scale, ctx.dtypes = selection, scale, (q.dtype, k.dtype, v.dtype)
        return out.transpose(1, 2).to(q.dtype), probs

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_y: Tensor, grad_probs: Tensor | None):
        q_rows, k_rows, v_rows, out, p = ctx.saved_tensors
        keys, start, scale = ctx.selection.keys, ctx.selection.start, ctx.scale
        grad_out = grad_y.to(torch.float32).transpose(1, 2).contiguous()  # (B, T, H, D)
        delta = (grad_out * out).sum(-1)  # (B, T, H): sum_s p_s dp_s of each row
        grad_q, grad_k, grad_v = _native.attention_backward(q_rows, k_rows, v_rows, keys, start, p, grad_out,
                                                            delta, scale)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return (grad_q.transpose(1, 2).to(q_dtype), grad_k.transpose(1, 2).to(k_dtype),
                grad_v.transpose(1, 2).to(v_dtype), None, None, None)


def _gathered_chunk(q: Tensor, k_rows: Tensor, v_rows: Tensor, keys: Tensor, valid: Tensor | None,
                    dropout_p: float) -> Tensor:
    """One chunk of :func:`gathered_attention`: ``q`` ``(B, H, n, D)``, ``k_rows, v_rows``
    ``(B, S, H_kv, D)``, ``keys`` ``(B, n, K)`` -> ``(B, H, n, D)``."""
    B, H, n, D = q.shape
    K = keys.shape[-1]
    batch = torch.arange(B, device=q.device).view(B, 1)
    flat = keys.reshape(B, n * K)
    k_selected = k_rows[batch, flat].view(B * n, K, -1, D).transpose(1, 2)  # (B * n, H_kv, K, D)
    v_selected = v_rows[batch, flat].view(B * n, K, -1, D).transpose(1, 2)
    mask = None if valid is None else valid.reshape(B * n, 1, 1, K)
    y = sdpa(q.transpose(1, 2).reshape(B * n, H, 1, D), k_selected, v_selected, attn_mask=mask, dropout_p=dropout_p)
    return y.view(B, n, H, D).transpose(1, 2)


@torch.no_grad()
def _gathered_probs(q: Tensor, k_rows: Tensor, keys: Tensor, valid: Tensor | None, scale: float) -> Tensor:
    """Attention probabilities of ``q`` ``(B, H, n, D)`` over its selected keys, averaged over heads: ``(B, n, K)``."""
    B, H, n, D = q.shape
    K = keys.shape[-1]
    batch = torch.arange(B, device=q.device).view(B, 1)
    k_selected = k_rows[batch, keys.reshape(B, n * K)].view(B, n, K, -1, D)
    k_selected = k_selected.repeat_interleave(H // k_selected.shape[3], dim=3)  # (B, n, K, H, D)
    logits = torch.einsum("bhtd,btshd->bths", q.to(_compute_dtype(q.dtype)), k_selected.to(_compute_dtype(q.dtype)))
    if valid is not None:
        logits.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    return (logits * scale).softmax(dim=-1).mean(dim=2)


def gathered_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float, chunk_size: int,
                       dropout_p: float, want_probs: bool) -> tuple[Tensor, Tensor | None]:
    """The same attention as :class:`SelectedAttention` through ``scaled_dot_product_attention``:
    each chunk gathers its ``(n, K)`` keys and values and attends with one query per (token,
    head). Chunks run under activation checkpointing, so the backward pass gathers again instead
    of keeping every chunk's copies (``O(T * K * H_kv * D)`` in all)."""
    B, H, T, D = q.shape
    k_rows, v_rows = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, H_kv, D) views
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, probs = [], []
    for a, b in query_chunks(0, T, chunk_size):
        keys, valid = selection.keys[:, a:b], selection.valid(a, b)
        q_chunk = q[:, :, a:b]
        if track:
            outs.append(checkpoint(_gathered_chunk, q_chunk, k_rows, v_rows, keys, valid, dropout_p,
                                   use_reentrant=False))
        else:
            outs.append(_gathered_chunk(q_chunk, k_rows, v_rows, keys, valid, dropout_p))
        if want_probs:
            probs.append(_gathered_probs(q_chunk, k_rows, keys, valid, scale))
    return torch.cat(outs, dim=2), torch.cat(probs, dim=1) if want_probs else None


def selected_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection, scale: float, chunk_size: int,
                       dropout_p: float = 0.0, want_probs: bool = False, kernel: str | None = None
                       ) -> tuple[Tensor, Tensor | None]:
    """Attention of ``q`` ``(B, H, T, D)`` over each query's selected keys of ``k, v``
    ``(B, H_kv, S, D)``: ``(B, H, T, D)`` and, when ``want_probs``, the probabilities averaged over
    heads ``(B, T, K)``.

    ``kernel``: ``"native"`` (:class:`NativeSelectedAttention`), ``"csr"`` (:class:`SelectedAttention`)
    or ``"gathered"`` (:func:`gathered_attention`); None: as
    :func:`~attnlab.attention.kernels.selected_attention_kernel` chooses."""
    kernel = kernel or selected_attention_kernel(q.device, dropout_p, q.dtype)
    if kernel == "native":
        if dropout_p:
            raise ValueError("the native kernels have no attention dropout; use kernel='gathered'")
        return NativeSelectedAttention.apply(q, k, v, selection, scale, want_probs)
    if kernel == "csr":
        if dropout_p:
            raise ValueError("the CSR kernel has no attention dropout; use kernel='gathered'")
        return SelectedAttention.apply(q, k, v, selection, scale, chunk_size, want_probs)
    return gathered_attention(q, k, v, selection, scale, chunk_size, dropout_p, want_probs)


# ----------------------------------------------------------------------------------- indexer KL


@torch.no_grad()
def attention_probabilities(q: Tensor, k: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Softmax attention probabilities of ``q`` ``(B, H, n, D)`` over ``k`` ``(B, H_kv, e, D)`` where
    ``allowed`` (broadcastable to ``(B, n, e)``), averaged over heads: ``(B, n, e)``. Query heads
    of one KV group are stacked along time so each KV head is used once, without repeating it."""
    B, H, n, D = q.shape
    H_kv, e = k.shape[1], k.shape[2]
    grouped = q.reshape(B, H_kv, (H // H_kv) * n, D)
    logits = (grouped @ k.transpose(-1, -2)).view(B, H, n, e) * scale
    return logits.masked_fill(~allowed.unsqueeze(-3), float("-inf")).softmax(dim=-1).mean(dim=1)


def _kl_rows(target: Tensor, log_q: Tensor, allowed: Tensor) -> Tensor:
    """``sum_s p log(p / q)`` over the allowed entries of each row."""
    return (torch.special.xlogy(target, target) - target * log_q.masked_fill(~allowed, 0.0)).sum(-1)


class DenseIndexerKL(torch.autograd.Function):
    """Mean over queries of ``KL(p || softmax(I))`` over all causal positions (the warm-up stage),
    ``p`` the main attention's probabilities averaged over heads (no gradient).

    Inputs: ``index_q`` ``(B, H_I, T, D_I)``, ``index_k`` ``(B, S, D_I)``, ``index_w`` ``(B, T, H_I)``
    (the differentiable ones), the main ``q`` ``(B, H, T, D)`` and ``k`` ``(B, H_kv, S, D)``, the
    queries' first position ``start``, the softmax ``scale`` and ``chunk_size``. Each chunk of
    queries scores its causal keys once and yields its share of the loss and of the gradients."""

    @staticmethod
    @_without_autocast
    def forward(ctx, index_q: Tensor, index_k: Tensor, index_w: Tensor, q: Tensor, k: Tensor, start: int,
                scale: float, chunk_size: int) -> Tensor:
        B, H_I, T, D_I = index_q.shape
        dtype = _compute_dtype(index_q.dtype)
        wants_grad = any(ctx.needs_input_grad[:3])
        index_q, index_k, index_w = index_q.to(dtype), index_k.to(dtype), index_w.to(dtype)
        q, k = q.to(dtype), k.to(dtype)
        total = index_q.new_zeros(())
        if wants_grad:
            grad_q, grad_k, grad_w = torch.zeros_like(index_q), torch.zeros_like(index_k), torch.zeros_like(index_w)
        for a, b in query_chunks(0, T, chunk_size):
            end = start + b
            allowed = torch.arange(end, device=q.device) <= torch.arange(start + a, end, device=q.device)[:, None]
            target = attention_probabilities(q[:, :, a:b], k[:, :, :end], allowed, scale)
            products = index_q[:, :, a:b] @ index_k[:, :end].unsqueeze(1).transpose(-1, -2)  # (B, H_I, n, e)
            terms = products.relu()
            scores = weighted_heads(terms, index_w[:, a:b]).masked_fill_(~allowed, float("-inf"))
            log_q = scores.log_softmax(dim=-1)
            total += _kl_rows(target, log_q, allowed).sum()
            if wants_grad:
                grad_scores = log_q.exp_().sub_(target)  # (B, n, e), zero where not allowed
                grad_w[:, a:b] = torch.einsum("bts,bjts->btj", grad_scores, terms)
                grad_products = grad_scores.unsqueeze(1) * index_w[:, a:b].transpose(1, 2).unsqueeze(-1)
                grad_products.mul_(terms.sign())  # ReLU: terms >= 0; a product by 0/1 vectorises, a random mask does not
                grad_q[:, :, a:b] = grad_products @ index_k[:, :end].unsqueeze(1)
                grad_k[:, :end] += (grad_products.flatten(1, 2).transpose(1, 2)
                                    @ index_q[:, :, a:b].flatten(1, 2))
        n_queries = B * T
        if wants_grad:
            ctx.save_for_backward(grad_q / n_queries, grad_k / n_queries, grad_w / n_queries)
        return total / n_queries

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_q, grad_k, grad_w = (g * grad_loss for g in ctx.saved_tensors)
        return grad_q, grad_k, grad_w, None, None, None, None, None


class SelectedIndexerKL(torch.autograd.Function):
    """Mean over queries of ``KL(p || softmax(I))`` over each query's selected keys only (the
    sparse stage): ``p`` the sparse attention's probabilities averaged over heads (``(B, T, K)``,
    from :func:`selected_attention`), ``I`` the indexer scores at the selected keys, kept by the
    selection together with the heads' ReLU terms, so that nothing is scored again.

    The gradient with respect to ``index_q`` ``(B, H_I, T, D_I)`` and ``index_k`` ``(B, S, D_I)``
    is a sparse-dense product over the selected entries (and its transpose), computed chunk by
    chunk in the forward pass; ``index_w`` ``(B, T, H_I)`` gets ``sum_s g_s ReLU(q_j . k_s)``.
    ``native``: the loss and all three gradients in one pass over the rows
    (:func:`~attnlab.attention._native.indexer_kl`, float32), no ``(B, T, K)`` intermediates."""

    @staticmethod
    @_without_autocast
    def forward(ctx, index_q: Tensor, index_k: Tensor, index_w: Tensor, selection: Selection, target: Tensor,
                chunk_size: int, native: bool = False) -> Tensor:
        B, H_I, T, D_I = index_q.shape
        S = index_k.shape[1]
        dtype = _compute_dtype(index_q.dtype)
        wants_grad = any(ctx.needs_input_grad[:3])
        if native:  # the loss and its gradients in one C pass over the rows (float32)
            f32 = torch.float32
            loss, grads = _native.indexer_kl(
                selection.scores.to(f32).contiguous(), target.to(f32).contiguous(), index_w.to(f32).contiguous(),
                selection.relu.to(f32).contiguous(), index_k.to(f32).contiguous(),
                index_q.to(f32).transpose(1, 2).contiguous(), selection.keys, selection.start, wants_grad)
            if wants_grad:
                grad_q, grad_k, grad_w = grads
                ctx.save_for_backward(grad_q.transpose(1, 2).to(dtype), grad_k.to(dtype), grad_w.to(dtype))
            return loss.to(dtype)
        target = target.to(dtype)
        scores = selection.scores.to(dtype)
        valid = selection.valid()
        allowed = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        log_q = scores.log_softmax(dim=-1)
        n_queries = B * T
        loss = _kl_rows(target, log_q, allowed).sum() / n_queries
        if wants_grad:
            grad_scores = log_q.exp_().sub_(target).div_(n_queries)  # (B, T, K), zero on padding
            relu = selection.relu.to(dtype)  # (B, T, H_I, K)
            index_w = index_w.to(dtype)
            grad_w = torch.einsum("bts,btjs->btj", grad_scores, relu)
            q_rows = index_q.to(dtype).transpose(1, 2)  # (B, T, H_I, D_I)
            k_rows = index_k.to(dtype).reshape(B * S, D_I)
            grad_q = q_rows.new_empty(B, T, H_I, D_I)
            grad_k = q_rows.new_zeros(B, S, D_I)
            for (a, b), pattern in chunk_patterns(selection, S, chunk_size).items():
                # d KL / d (q_j . k_s) = g_s w_j where the ReLU passes: (B, n, H_I, K)
                grad_products = (grad_scores[:, a:b].unsqueeze(2) * index_w[:, a:b].unsqueeze(-1)
                                 ).mul_(relu[:, a:b].sign()).view(-1)  # ReLU, as in DenseIndexerKL
                crow, col = pattern.structure(H_I, 1)
                q_chunk = q_rows[:, a:b].reshape(-1, D_I)
                grad_q[:, a:b] = _times(crow, col, grad_products, k_rows, q_chunk.shape[0]).view(B, b - a, H_I, D_I)
                crow_t, col_t, value_index = pattern.transposed(H_I, 1)
                end = pattern.end
                grad_k[:, :end] += _times(crow_t, col_t, grad_products.index_select(0, value_index), q_chunk,
                                          B * end).view(B, end, D_I)
            grad_q = grad_q.transpose(1, 2)
            ctx.save_for_backward(grad_q, grad_k, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_q, grad_k, grad_w = (g * grad_loss for g in ctx.saved_tensors)
        return grad_q, grad_k, grad_w, None, None, None, None
