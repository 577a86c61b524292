"""DeepSeek-V3.2-style sparse attention against references written here: the indexer formula
``I(t,s) = sum_j w_j(t) ReLU(q_j(t).k(s))`` as an explicit loop, top-k chosen per row by sorting,
an explicit masked softmax(QK^T/sqrt(d)) V and the KL objectives of both training stages as
explicit sums, in float64. The chunked training path (selection, attention over the selected
keys with either kernel, KL) is also checked against the dense masked computation it replaces,
outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import AttentionContext, causal_mask, resolve_attention, sdpa
from attnlab.attention import _topk_attention as topk_attention
from attnlab.attention.sparse import index_scores, index_scores_one_query, indexer_kl, select_top_k
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from attnlab.model import GPT
from tests.conftest import TINY_MODEL
from tests.helpers import largest_intermediate

KERNELS = ["csr", "gathered"]


def build(model_overrides: dict | None = None, **options):
    model = ModelConfig(**{**TINY_MODEL, **(model_overrides or {})})
    attn = resolve_attention({"name": "sparse", **options}, model).build(model, 0).double().eval()
    return model, attn


def main_weights(attn):
    q_dim, kv_dim, _ = attn.split
    w = attn.qkv_proj.weight
    return w[:q_dim], w[q_dim:q_dim + kv_dim], w[q_dim + kv_dim:]


def rotate(rope, t, start=0):
    """Rotate ``t`` ``(B, T, ..., D)`` along its time axis 1."""
    if rope is None:
        return t
    return rope.rotate(t.movedim(1, -2), start).movedim(-2, 1)


def reference_index_scores(x, attn, rope):
    """``I[b, t, s]`` for ``s <= t`` by the explicit formula (``-inf`` for ``s > t``)."""
    H_I, D_I = attn.index_n_heads, attn.index_head_dim
    w = attn.index_proj.weight
    w_q, w_k, w_w = w[:H_I * D_I], w[H_I * D_I:H_I * D_I + D_I], w[H_I * D_I + D_I:]
    B, T, _ = x.shape
    q = rotate(rope, (x @ w_q.T).view(B, T, H_I, D_I))
    k = rotate(rope, x @ w_k.T)
    head_weights = x @ w_w.T
    scores = torch.full((B, T, T), float("-inf"), dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                scores[b, t, s] = sum(head_weights[b, t, j] * torch.relu(q[b, t, j] @ k[b, s]) for j in range(H_I))
    return scores


def reference_selection(scores, top_k):
    """Per row, the ``top_k`` best causal positions, ties to the latest: ``(B, T, T)`` bool."""
    B, T, _ = scores.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            ranked = sorted(range(t + 1), key=lambda s: (scores[b, t, s].item(), s), reverse=True)
            mask[b, t, ranked[:top_k]] = True
    return mask


def reference_attention(x, attn, rope, mask):
    """Explicit softmax over the positions in ``mask`` ``(B, T, T)`` per head, then ``out_proj``."""
    w_q, w_k, w_v = main_weights(attn)
    B, T, C = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = rotate(rope, (x @ w_q.T).view(B, T, H, D))
    k = rotate(rope, (x @ w_k.T).view(B, T, H_kv, D))
    v = (x @ w_v.T).view(B, T, H_kv, D)
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // H_kv)
            for t in range(T):
                positions = mask[b, t].nonzero().flatten()
                logits = torch.stack([q[b, t, h] @ k[b, s, kv] for s in positions]) / math.sqrt(D)
                out[b, t, h] = (torch.softmax(logits, 0)[:, None] * v[b, positions, kv]).sum(0)
    return out.reshape(B, T, C) @ attn.out_proj.weight.T


def reference_indexer_kl(x, attn, rope, scores):
    """Mean over queries of KL(mean-over-heads causal attention || softmax of the indexer scores)."""
    w_q, w_k, _ = main_weights(attn)
    B, T, _ = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = rotate(rope, (x @ w_q.T).view(B, T, H, D))
    k = rotate(rope, (x @ w_k.T).view(B, T, H_kv, D))
    total = 0.0
    for b in range(B):
        for t in range(T):
            target = sum(torch.softmax(torch.stack([q[b, t, h] @ k[b, s, h // (H // H_kv)] for s in range(t + 1)])
                                       / math.sqrt(D), 0) for h in range(H)) / H
            indexer = torch.softmax(scores[b, t, :t + 1], 0)
            total = total + (target * (target.log() - indexer.log())).sum()
    return total / (B * T)


def reference_selected_kl(x, attn, rope, scores, mask, rows=None):
    """Mean over queries (``rows``: those positions only) of KL(p || softmax(I)) over each query's
    selected keys: p the mean over heads of the softmax over those keys, I the indexer scores there."""
    w_q, w_k, _ = main_weights(attn)
    B, T, _ = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = rotate(rope, (x @ w_q.T).view(B, T, H, D)).detach()
    k = rotate(rope, (x @ w_k.T).view(B, T, H_kv, D)).detach()
    total = 0.0
    rows = range(T) if rows is None else rows
    for b in range(B):
        for t in rows:
            positions = mask[b, t].nonzero().flatten()
            target = sum(torch.softmax(torch.stack([q[b, t, h] @ k[b, s, h // (H // H_kv)] for s in positions])
                                       / math.sqrt(D), 0) for h in range(H)) / H
            indexer = torch.softmax(scores[b, t, positions], 0)
            total = total + (target * (target.log() - indexer.log())).sum()
    return total / (B * len(rows))


class SdpaSpy:
    """Records the key length and mask of every ``scaled_dot_product_attention`` call."""

    def __init__(self):
        self.key_lengths: list[int] = []
        self.masks: list[torch.Tensor | None] = []
        self._sdpa = F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, **kwargs):
        self.key_lengths.append(k.shape[2])
        self.masks.append(attn_mask)
        return self._sdpa(q, k, v, attn_mask=attn_mask, **kwargs)


def selection_mask(selection, n_keys):
    """``(B, T, n_keys)`` boolean: the real keys of a :class:`Selection`."""
    keys = selection.keys.long()
    valid = selection.valid()
    mask = torch.zeros(*keys.shape[:2], n_keys, dtype=torch.bool)
    return mask.scatter_(2, keys, True if valid is None else valid)


def dense_masked_reference(attn, x, ctx):
    """The computation the chunked path replaces: the whole ``(B, T, T)`` score matrix of the
    indexer, its top-k per row, and a dense softmax masked to them."""
    B, T, _ = x.shape
    q, k, v = attn.project(x, ctx)
    with torch.no_grad():
        index_q, index_k, index_w = attn.project_index(x, ctx)
        selected = select_top_k(index_scores(index_q, index_k, index_w), causal_mask(T, T, 0, x.device), attn.top_k)
    y = sdpa(q, k, v, attn_mask=selected.unsqueeze(1))
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_heads,dense_name", [(None, "mha"), (2, "gqa")])
def test_top_k_covering_the_sequence_is_full_causal_attention(n_kv_heads, dense_name):
    model, sparse = build(top_k=12, n_kv_heads=n_kv_heads)
    dense = resolve_attention({"name": dense_name, "n_kv_heads": n_kv_heads}, model).build(model, 0).double()
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all(key.startswith("index_proj") for key in unexpected)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    torch.testing.assert_close(sparse(x, ctx), dense(x, ctx), atol=0, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_attends_over_exactly_the_indexer_choice(kernel, use_rope, n_kv_heads, top_k):
    _, attn = build(top_k=top_k, n_kv_heads=n_kv_heads, index_n_heads=3, index_head_dim=8, chunk_size=5)
    attn.kernel = kernel
    rope = RotaryEmbedding() if use_rope else None
    x = torch.randn(2, 16, 64, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x, AttentionContext(rope))
        mask = reference_selection(reference_index_scores(x, attn, rope), top_k)
        want = reference_attention(x, attn, rope, mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("chunk_size", [4, 7, 64])
@pytest.mark.parametrize("use_rope", [False, True])
def test_chunked_training_path_equals_dense_masked_path_with_gradients(kernel, n_kv_heads, chunk_size, use_rope):
    """Outputs and the gradients of the input and of every main-path weight, in float64: chunk
    sizes that divide T=21 or not (and exceed it), MHA/GQA/MQA heads, RoPE on or off."""
    _, attn = build(None if use_rope else {"pos_encoding": "learned"}, top_k=6, n_kv_heads=n_kv_heads,
                    index_head_dim=8, chunk_size=chunk_size, indexer_loss_weight=0.0)
    attn.train()
    attn.kernel = kernel
    ctx = AttentionContext(RotaryEmbedding() if use_rope else None, training=True)
    x = torch.randn(2, 21, 64, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 21, 64, dtype=torch.float64)
    weights = [attn.qkv_proj.weight, attn.out_proj.weight]
    got = attn(x, ctx)
    got_grads = torch.autograd.grad(got, [x, *weights], grad_y)
    want = dense_masked_reference(attn, x, ctx)
    want_grads = torch.autograd.grad(want, [x, *weights], grad_y)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 50])
@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("values", ["continuous", "ties", "flat"])
def test_chunked_selection_equals_the_selection_over_whole_rows(chunk_size, start, values):
    """The top-k of every query from chunk-wise scores equals :func:`select_top_k` on the whole
    ``(T, S)`` score matrix, ties included (small integer indexer weights make many scores equal;
    flat scores make every position tie). ``start > 0``: a prefill chunk after cached tokens."""
    B, T, H_I, D_I, top_k = 2, 23, 3, 4, 6
    S = start + T
    if values == "continuous":
        index_q, index_k, index_w = torch.randn(B, H_I, T, D_I), torch.randn(B, S, D_I), torch.randn(B, T, H_I)
    else:
        index_q = torch.randint(-2, 3, (B, H_I, T, D_I)).float()
        index_k = torch.randint(-2, 3, (B, S, D_I)).float()
        index_w = torch.randint(-1, 2, (B, T, H_I)).float() * (values == "ties")
    selection = topk_attention.select_top_k_chunked(index_q, index_k, index_w, start, top_k, chunk_size,
                                                     keep_for_kl=True)
    scores = index_scores(index_q, index_k, index_w)
    allowed = causal_mask(T, S, start, "cpu")
    assert torch.equal(selection_mask(selection, S), select_top_k(scores, allowed, top_k))
    # the kept scores are the indexer's at the selected keys
    torch.testing.assert_close(selection.scores, scores.gather(2, selection.keys.long()))


def test_one_query_scores_equal_the_general_form():
    """The decoding step's key-major product is the same ``I(t, s)`` as :func:`index_scores`."""
    torch.manual_seed(0)
    index_q, index_k, index_w = torch.randn(3, 4, 1, 16, dtype=torch.float64), \
        torch.randn(3, 37, 16, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64)
    torch.testing.assert_close(index_scores_one_query(index_q, index_k, index_w),
                               index_scores(index_q, index_k, index_w))


@pytest.mark.parametrize("top_k", [1, 5, 16])
def test_each_query_sees_min_of_t_plus_1_and_top_k_distinct_earlier_positions(top_k):
    _, attn = build(top_k=top_k, chunk_size=7)
    T = 20
    ctx = AttentionContext(RotaryEmbedding())
    with torch.no_grad():
        index_q, index_k, index_w = attn.project_index(torch.randn(3, T, 64, dtype=torch.float64), ctx)
    selection = topk_attention.select_top_k_chunked(index_q, index_k, index_w, 0, top_k, 7, keep_for_kl=False)
    mask = selection_mask(selection, T)
    t = torch.arange(T)
    assert torch.equal(mask.sum(-1), torch.minimum(t + 1, torch.tensor(top_k)).expand(3, T))
    assert not mask[:, t[:, None] < t[None, :]].any()
    # each row's keys are distinct
    assert all(len(set(row.tolist())) == top_k for row in selection.keys.reshape(-1, top_k))


@pytest.mark.parametrize("kernel", KERNELS)
def test_flat_indexer_breaks_ties_towards_recent_positions(kernel):
    """All scores equal (zero head weights): the choice is the top_k latest positions, so the
    output is sliding-window attention over the top_k latest positions."""
    model, attn = build(top_k=4, chunk_size=5)
    attn.kernel = kernel
    with torch.no_grad():
        attn.index_proj.weight[-attn.index_n_heads:] = 0
    window = resolve_attention({"name": "sliding", "window": 4}, model).build(model, 0).double()
    window.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    with torch.no_grad():
        torch.testing.assert_close(attn(x, ctx), window(x, ctx), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("top_k", [3, 64])
def test_warmup_kl_is_the_dense_kl_over_every_causal_position(n_kv_heads, top_k):
    """During the warm-up steps the target is the dense causal attention of every query."""
    _, attn = build(top_k=top_k, n_kv_heads=n_kv_heads, index_head_dim=8, indexer_loss_weight=0.5,
                    indexer_warmup_steps=5, chunk_size=4)
    attn.train()
    rope = RotaryEmbedding()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    ctx = AttentionContext(rope, record_stats=True, training=True, step=4)
    attn(x, ctx)
    with torch.no_grad():
        want = reference_indexer_kl(x, attn, rope, reference_index_scores(x, attn, rope))
    assert want > 0
    torch.testing.assert_close(ctx.stats["indexer_kl"], want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ctx.aux_losses["indexer_kl"], 0.5 * want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("step", [5, None])
def test_sparse_stage_kl_covers_only_the_selected_keys(kernel, n_kv_heads, step):
    """After the warm-up (or without a step) the target is the sparse attention over each query's
    selected keys, and the indexer distribution is renormalised over the same keys."""
    _, attn = build(top_k=3, n_kv_heads=n_kv_heads, index_head_dim=8, indexer_loss_weight=0.5,
                    indexer_warmup_steps=5, chunk_size=4)
    attn.train()
    attn.kernel = kernel
    rope = RotaryEmbedding()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    ctx = AttentionContext(rope, record_stats=True, training=True, step=step)
    attn(x, ctx)
    with torch.no_grad():
        scores = reference_index_scores(x, attn, rope)
        want = reference_selected_kl(x, attn, rope, scores, reference_selection(scores, 3))
        dense = reference_indexer_kl(x, attn, rope, scores)
    assert want > 0 and not torch.isclose(want, dense)
    torch.testing.assert_close(ctx.stats["indexer_kl"], want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ctx.aux_losses["indexer_kl"], 0.5 * want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("step", [0, 2])
def test_kl_gradient_equals_autograd_of_the_reference(step):
    """The gradient each KL computes in its forward pass (warm-up at step 0, selected keys at step
    2) equals autograd through the explicit formula, for the indexer's whole projection."""
    _, attn = build(top_k=3, index_n_heads=2, index_head_dim=6, indexer_warmup_steps=1, chunk_size=3)
    attn.train()
    rope = RotaryEmbedding()
    x = torch.randn(1, 8, 64, dtype=torch.float64)
    ctx = AttentionContext(rope, training=True, step=step)
    attn(x, ctx)
    (got,) = torch.autograd.grad(ctx.aux_losses["indexer_kl"], attn.index_proj.weight)
    scores = reference_index_scores(x, attn, rope)
    if step == 0:
        want_kl = reference_indexer_kl(x, attn, rope, scores)
    else:
        want_kl = reference_selected_kl(x, attn, rope, scores, reference_selection(scores.detach(), 3))
    (want,) = torch.autograd.grad(attn.indexer_loss_weight * want_kl, attn.index_proj.weight)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


def test_warmup_trains_dense_attention_then_the_sparse_path_takes_over():
    model, attn = build(top_k=3, indexer_warmup_steps=2, chunk_size=4)
    attn.train()
    dense = resolve_attention("mha", model).build(model, 0).double().train()
    dense.load_state_dict(attn.state_dict(), strict=False)
    rope = RotaryEmbedding()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    with torch.no_grad():
        sparse_reference = reference_attention(x, attn, rope, reference_selection(reference_index_scores(x, attn, rope), 3))
        dense_out = dense(x, AttentionContext(rope))
        for step in (0, 1):
            torch.testing.assert_close(attn(x, AttentionContext(rope, training=True, step=step)), dense_out,
                                       atol=0, rtol=0)
        for ctx in (AttentionContext(rope, training=True, step=2), AttentionContext(rope, training=True),
                    AttentionContext(rope)):
            torch.testing.assert_close(attn(x, ctx), sparse_reference, atol=1e-10, rtol=1e-9)


def test_a_decoding_step_records_the_kl_over_its_selected_keys():
    _, attn = build(top_k=3, index_head_dim=8)
    rope = RotaryEmbedding()
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    with torch.no_grad():
        cache = attn.init_cache(2, 9, None, torch.float64)
        attn(x[:, :8], AttentionContext(rope, 0), cache)
        ctx = AttentionContext(rope, 8, record_stats=True)
        attn(x[:, 8:], ctx, cache)
        scores = reference_index_scores(x, attn, rope)
        want = reference_selected_kl(x, attn, rope, scores, reference_selection(scores, 3), rows=[8])
    torch.testing.assert_close(ctx.stats["indexer_kl"], want, atol=1e-10, rtol=1e-9)


def test_indexer_kl_is_recorded_but_not_added_outside_training():
    _, attn = build(top_k=3)
    ctx = AttentionContext(RotaryEmbedding(), record_stats=True, training=False)
    with torch.no_grad():
        attn(torch.randn(1, 8, 64, dtype=torch.float64), ctx)
    assert ctx.aux_losses == {}
    assert ctx.stats["indexer_kl"] > 0


def test_zero_loss_weight_adds_no_aux_loss():
    _, attn = build(top_k=3, indexer_loss_weight=0.0)
    ctx = AttentionContext(RotaryEmbedding(), training=True)
    attn.train()(torch.randn(1, 8, 64, dtype=torch.float64), ctx)
    assert ctx.aux_losses == {}


def test_indexer_kl_is_zero_only_when_the_indexer_matches_the_target():
    T = 6
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    target = torch.randn(2, T, T, dtype=torch.float64).masked_fill(~allowed, float("-inf")).softmax(-1)
    matching_scores = target.log().masked_fill(~allowed, 123.0)  # masked entries must be ignored
    torch.testing.assert_close(indexer_kl(target, matching_scores, allowed), torch.zeros(2, T, dtype=torch.float64))
    # shifting all scores of a row leaves the indexer distribution unchanged
    shifted = indexer_kl(target, matching_scores + 5.0, allowed)
    torch.testing.assert_close(shifted, torch.zeros(2, T, dtype=torch.float64))
    other = indexer_kl(target, torch.randn(2, T, T, dtype=torch.float64), allowed)
    assert (other[:, 1:] > 0).all()  # row 0 has one position: both distributions are [1]
    torch.testing.assert_close(other[:, 0], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("step", [0, None])
def test_kl_trains_only_the_indexer_and_the_lm_loss_only_the_main_model(step):
    _, attn = build(top_k=4, indexer_warmup_steps=1)
    attn.train()
    x = torch.randn(2, 12, 64, dtype=torch.float64, requires_grad=True)
    ctx = AttentionContext(RotaryEmbedding(), training=True, step=step)
    y = attn(x, ctx)
    ctx.aux_losses["indexer_kl"].backward(retain_graph=True)
    assert attn.index_proj.weight.grad is not None and attn.index_proj.weight.grad.abs().sum() > 0
    assert attn.qkv_proj.weight.grad is None and attn.out_proj.weight.grad is None
    assert x.grad is None  # the indexer reads a detached input
    attn.index_proj.weight.grad = None
    y.square().sum().backward()
    assert attn.index_proj.weight.grad is None  # selection passes no gradient
    assert attn.qkv_proj.weight.grad.abs().sum() > 0 and attn.out_proj.weight.grad.abs().sum() > 0


def test_training_step_holds_no_sequence_by_sequence_tensor():
    """Forward and backward of a training step at T=512 (top_k 32, chunks of 64 queries, the
    KL included): no intermediate has T*T elements, and the largest grows linearly with T."""
    _, attn = build({"max_seq_len": 1024}, top_k=32, chunk_size=64)
    attn = attn.float().train()
    sizes = {}
    for T in (512, 1024):
        x = torch.randn(1, T, 64, requires_grad=True)

        def step():
            ctx = AttentionContext(RotaryEmbedding(), training=True)
            (attn(x, ctx).square().sum() + ctx.aux_losses["indexer_kl"]).backward()

        sizes[T], op = largest_intermediate(step)
        assert sizes[T] < T * T, (T, sizes[T], op)
    assert sizes[1024] <= 2.2 * sizes[512], sizes


def test_gathered_kernel_replays_its_dropout_mask_in_the_backward_pass():
    """Attention dropout runs on the gathered kernel, whose chunks recompute in backward: the
    gradients equal those of the same computation kept whole (same seed, same masks)."""
    B, H, T, D, K = 1, 4, 12, 8, 4
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    index = [torch.randn(B, 2, T, 4, dtype=torch.float64), torch.randn(B, T, 4, dtype=torch.float64),
             torch.randn(B, T, 2, dtype=torch.float64)]
    selection = topk_attention.select_top_k_chunked(*index, 0, K, 5, keep_for_kl=False)
    torch.manual_seed(3)
    y, _ = topk_attention.selected_attention(q, k, v, selection, 0.3, 5, dropout_p=0.5)
    grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
    torch.manual_seed(3)
    k_rows, v_rows = k.transpose(1, 2), v.transpose(1, 2)
    whole = torch.cat([topk_attention._gathered_chunk(q[:, :, a:b], k_rows, v_rows, selection.keys[:, a:b],
                                                      selection.valid(a, b), 0.5)
                       for a, b in topk_attention.query_chunks(0, T, 5)], dim=2)
    torch.testing.assert_close(y, whole, atol=0, rtol=0)
    for got, want in zip(grads, torch.autograd.grad(whole, (q, k, v), torch.ones_like(whole))):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-12)
    assert not torch.equal(y, topk_attention.selected_attention(q, k, v, selection, 0.3, 5)[0])  # dropout acted


def test_csr_kernel_refuses_attention_dropout():
    q = torch.randn(1, 2, 6, 4)
    selection = topk_attention.select_top_k_chunked(torch.randn(1, 1, 6, 4), torch.randn(1, 6, 4),
                                                    torch.randn(1, 6, 1), 0, 2, 4, keep_for_kl=False)
    with pytest.raises(ValueError, match="dropout"):
        topk_attention.selected_attention(q, q, q, selection, 0.5, 4, dropout_p=0.1, kernel="csr")


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_decoding_gathers_top_k_entries_and_equals_full_forward(monkeypatch, n_kv_heads):
    top_k, T = 5, 24
    _, attn = build(top_k=top_k, n_kv_heads=n_kv_heads)
    rope = RotaryEmbedding()
    x = torch.randn(2, T, 64, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x, AttentionContext(rope))
        cache = attn.init_cache(2, T, None, torch.float64)
        spy = SdpaSpy()
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        # a prefill shorter than top_k, a chunk crossing it, then one token at a time
        parts = [attn(x[:, :3], AttentionContext(rope, 0), cache), attn(x[:, 3:9], AttentionContext(rope, 3), cache)]
        parts += [attn(x[:, t:t + 1], AttentionContext(rope, t), cache) for t in range(9, T)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=1e-9)
    # single steps read only the gathered entries; the chunk crossing top_k runs the selected-keys
    # kernel on CPU (no SDPA call)
    assert spy.key_lengths == [3] + [top_k] * (T - 9)


def test_model_decoding_with_small_top_k_equals_full_forward_and_is_causal():
    torch.manual_seed(0)
    model = GPT.from_config(TINY_MODEL, {"name": "sparse", "top_k": 6, "index_head_dim": 16}).double().eval()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(2, 40)
        parts = [model(idx[:, :17], cache=cache).logits, model(idx[:, 17:22], cache=cache).logits]
        parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(22, 40)]
        changed = idx.clone()
        changed[:, 30:] = (changed[:, 30:] + 1) % 97
        perturbed = model(changed).logits
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(perturbed[:, :30], full[:, :30], atol=0, rtol=0)
    assert cache.nbytes() == model.cache_bytes(2, 40)


def test_cache_bytes_closed_form():
    """Per token and layer: K and V of the KV heads plus one indexer key."""
    _, mha = build(index_head_dim=64)
    _, gqa = build(n_kv_heads=2, index_head_dim=32)
    assert mha.cache_bytes(3, 100, torch.float32) == 3 * 100 * (2 * 4 * 16 + 64) * 4
    assert gqa.cache_bytes(3, 100, torch.bfloat16) == 3 * 100 * (2 * 2 * 16 + 32) * 2


def test_presets_and_defaults():
    model = ModelConfig(**TINY_MODEL)
    defaults = resolve_attention("sparse", model).config
    assert (defaults.index_n_heads, defaults.index_head_dim, defaults.indexer_loss_weight) == (4, 64, 0.01)
    assert (defaults.indexer_warmup_steps, defaults.chunk_size) == (0, 256)
    assert defaults.n_kv_heads is None
    assert resolve_attention("sparse_512", model).config.top_k == 512
    assert resolve_attention("sparse_256", model).config.top_k == 256


@pytest.mark.parametrize("option,value,message", [
    ("top_k", 0, r"attention\.top_k=0; allowed: an integer >= 1"),
    ("index_n_heads", 0, r"attention\.index_n_heads=0; allowed: an integer >= 1"),
    ("index_head_dim", 0, r"attention\.index_head_dim=0; allowed: an integer >= 1"),
    ("index_head_dim", 7, r"attention\.index_head_dim=7: RoPE rotates channel pairs; allowed: an even integer >= 2"),
    ("indexer_loss_weight", -0.1, r"attention\.indexer_loss_weight=-0\.1; allowed: a number >= 0"),
    ("indexer_warmup_steps", -1, r"attention\.indexer_warmup_steps=-1; allowed: an integer >= 0"),
    ("chunk_size", 0, r"attention\.chunk_size=0; allowed: an integer >= 1"),
    ("n_kv_heads", 3, r"attention\.n_kv_heads=3: must divide model\.n_heads"),
])
def test_invalid_options_are_named(option, value, message):
    with pytest.raises(ConfigError, match=message):
        build(**{option: value})


def test_odd_index_head_dim_is_allowed_without_rope():
    _, attn = build({"pos_encoding": "learned"}, index_head_dim=7, top_k=2)
    assert attn(torch.randn(1, 5, 64, dtype=torch.float64), AttentionContext(None)).shape == (1, 5, 64)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_static_decoding_step_equals_full_forward(flat, n_kv_heads):
    """The compiled path's step: the indexer over every cached row (unwritten ones excluded) and
    exactly top_k gathered rows, the padding picks of early positions masked. A flat indexer
    (all scores tied) must pick the latest positions there too."""
    torch.manual_seed(0)
    model = GPT.from_config(TINY_MODEL, {"name": "sparse", "top_k": 6, "index_head_dim": 16,
                                         "n_kv_heads": n_kv_heads}).double().eval()
    with torch.no_grad():
        if flat:
            for block in model.blocks:
                block.attn.index_proj.weight[-block.attn.index_n_heads:] = 0
        idx = torch.randint(0, 97, (2, 30))
        full = model(idx).logits
        cache = model.init_cache(2, 30)
        model(idx[:, :2], cache=cache)
        steps = [model.step(idx[:, t:t + 1], cache) for t in range(2, 30)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 2:], atol=1e-10, rtol=1e-9)
    assert cache.nbytes() == model.cache_bytes(2, 30)
