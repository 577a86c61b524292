"""The C kernels of the sparse mechanism's CPU training path (``attnlab.attention._native``) against
naive loops in float64 written here and against :func:`select_top_k`'s rule on whole rows; the
mechanism's training path through them against the CSR path and the dense masked reference."""

from __future__ import annotations

import logging
import math
import multiprocessing

import pytest
import torch

from attnlab.attention import AttentionContext, _native, causal_mask, resolve_attention
from attnlab.attention import _topk_attention as topk_attention
from attnlab.attention.kernels import selected_attention_kernel
from attnlab.attention.sparse import index_scores, select_top_k
from attnlab.config import ModelConfig
from attnlab.layers import RotaryEmbedding
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.skipif(not _native.available(), reason="no C compiler: the native kernels did not build")


def random_keys(B, T, K, start, generator):
    """Each row's ``K`` distinct causal positions in random order; rows at positions ``< K`` keep
    ``0..K-1`` (the entries after the row's position are padding)."""
    rows = [torch.randperm(start + t + 1, generator=generator)[:K] if start + t + 1 > K else torch.arange(K)
            for _ in range(B) for t in range(T)]
    return torch.stack(rows).view(B, T, K).int()


def naive_entries(B, T, H, G, K, keys, start):
    """``(b, t, h, slot, key, group)`` for every non-padding entry."""
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for slot in range(K):
                    key = int(keys[b, t, slot])
                    if key <= start + t:
                        yield b, t, h, slot, key, h // (H // G)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("G", [4, 2, 1])
@pytest.mark.parametrize("D", [32, 12])
@pytest.mark.parametrize("start", [0, 3])
def test_forward_and_backward_equal_naive_loops(threads, G, D, start):
    """Softmax attention over the selected keys (probabilities, output, their head average) and the
    fused backward pass, for MHA/GQA/MQA groups, a head width the kernels specialise (32) and one
    they do not (12), padding rows; on one thread and on two (which split the KV groups where there
    are enough, else the rows). Logits of up to +-100: the softmax must not overflow."""
    gen = torch.Generator().manual_seed(D + G + start)
    B, T, H, K = 2, 9, 4, 5
    S = start + T
    q, grad_out = 3 * torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, D, generator=gen)
    k, v = torch.randn(B, S, G, D, generator=gen), torch.randn(B, S, G, D, generator=gen)
    weights, delta = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, generator=gen)
    keys = random_keys(B, T, K, start, gen)
    q64, k64, v64, w64, g64 = (t.double() for t in (q, k, v, weights, grad_out))

    logits = torch.full((B, T, H, K), float("-inf"), dtype=torch.float64)
    for b, t, h, slot, key, g in naive_entries(B, T, H, G, K, keys, start):
        logits[b, t, h, slot] = 0.5 * (q64[b, t, h] @ k64[b, key, g])
    probs = torch.zeros(B, T, H, K, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                e = [math.exp(x - float(logits[b, t, h].max())) for x in logits[b, t, h].tolist()]
                probs[b, t, h] = torch.tensor(e, dtype=torch.float64) / sum(e)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    grad_q = torch.zeros(B, T, H, D, dtype=torch.float64)
    grad_k, grad_v = torch.zeros(B, S, G, D, dtype=torch.float64), torch.zeros(B, S, G, D, dtype=torch.float64)
    for b, t, h, slot, key, g in naive_entries(B, T, H, G, K, keys, start):
        out[b, t, h] += probs[b, t, h, slot] * v64[b, key, g]
        ds = 0.5 * w64[b, t, h, slot] * (g64[b, t, h] @ v64[b, key, g] - delta[b, t, h].double())
        grad_q[b, t, h] += ds * k64[b, key, g]
        grad_k[b, key, g] += ds * q64[b, t, h]
        grad_v[b, key, g] += w64[b, t, h, slot] * g64[b, t, h]

    tol = dict(atol=1e-5, rtol=1e-5)
    got_probs, got_out, got_mean = _native.attention_forward(q, k, v, keys, start, 0.5, want_mean=True)
    assert torch.equal(got_probs == 0, probs == 0)  # padding exactly zero
    torch.testing.assert_close(got_probs.double(), probs, **tol)
    torch.testing.assert_close(got_out.double(), out, **tol)
    torch.testing.assert_close(got_mean.double(), probs.mean(dim=2), **tol)
    again_probs, again_out, no_mean = _native.attention_forward(q, k, v, keys, start, 0.5)
    assert no_mean is None and torch.equal(again_probs, got_probs) and torch.equal(again_out, got_out)
    got = _native.attention_backward(q, k, v, keys, start, weights, grad_out, delta, 0.5)
    for got_grad, want_grad in zip(got, (grad_q, grad_k, grad_v)):
        torch.testing.assert_close(got_grad.double(), want_grad, **tol)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("D", [16, 12])
@pytest.mark.parametrize("start", [0, 4])
def test_indexer_kl_and_its_gradients_equal_naive_loops(threads, D, start):
    """Per row, over its real slots: ``log q = log_softmax(scores)``, ``KL = sum p log(p / q)``
    (terms with ``p = 0`` vanish), ``g = (q - p) / R``; ``grad_w[j] = sum g ReLU_j``, and with
    ``c = g * w_j`` where ``ReLU(q_j . k) > 0``: ``grad_q[j] = sum c k[key]``, ``grad_k[key] += c q_j``.
    Padding slots (rows at positions < K when ``start = 0``) carry garbage scores; a head width the
    kernels specialise (16) and one they do not (12); one thread and two."""
    gen = torch.Generator().manual_seed(start + D)
    B, T, J, K = 2, 7, 3, 4
    S = start + T
    scores = 3 * torch.randn(B, T, K, generator=gen)
    w = torch.randn(B, T, J, generator=gen)
    index_q, index_k = torch.randn(B, T, J, D, generator=gen), torch.randn(B, S, D, generator=gen)
    keys = random_keys(B, T, K, start, gen)
    real = keys <= (start + torch.arange(T)).view(1, T, 1)
    target = torch.rand(B, T, K, generator=gen) * real
    target[0, -1, 0] = 0.0  # a real slot the target does not reach
    target /= target.sum(-1, keepdim=True)
    terms = torch.zeros(B, T, J, K)
    for b, t, j, slot, key, _ in naive_entries(B, T, J, 1, K, keys, start):
        terms[b, t, j, slot] = torch.relu(index_q[b, t, j] @ index_k[b, key])

    R = B * T
    kl = torch.zeros((), dtype=torch.float64)
    g = torch.zeros(B, T, K, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            s = scores[b, t].double()[real[b, t]]
            log_q = s - torch.log(torch.exp(s - s.max()).sum()) - s.max()
            p = target[b, t].double()[real[b, t]]
            kl += sum(float(pi * (math.log(pi) - lq)) for pi, lq in zip(p, log_q) if pi > 0)
            g[b, t, real[b, t]] = (log_q.exp() - p) / R
    grad_w = torch.einsum("bts,btjs->btj", g, terms.double())
    grad_q, grad_k = torch.zeros(B, T, J, D, dtype=torch.float64), torch.zeros(B, S, D, dtype=torch.float64)
    for b, t, j, slot, key, _ in naive_entries(B, T, J, 1, K, keys, start):
        if terms[b, t, j, slot] > 0:
            c = g[b, t, slot] * w[b, t, j].double()
            grad_q[b, t, j] += c * index_k[b, key].double()
            grad_k[b, key] += c * index_q[b, t, j].double()

    loss, grads = _native.indexer_kl(scores, target, w, terms, index_k, index_q, keys, start)
    torch.testing.assert_close(loss.double(), kl / R, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, (grad_q, grad_k, grad_w)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    alone, none = _native.indexer_kl(scores, target, w, terms, index_k, index_q, keys, start, with_grad=False)
    assert none is None and torch.equal(alone, loss)


@pytest.mark.parametrize("values", ["continuous", "ties", "flat", "misleading_sample"])
@pytest.mark.parametrize("first_count,top_k", [(7, 6), (40, 8), (300, 100)])
def test_top_k_equals_the_exact_rule_on_whole_rows(values, first_count, top_k):
    """The top-k of each row's causal positions, ties at the threshold to the latest positions,
    in ascending order: the same set as :func:`select_top_k`, including rows where the sampled
    bound keeps too few candidates (the largest values sit on the sampled positions). One head of
    weight 1 and non-negative products, so that the scores are the products themselves."""
    gen = torch.Generator().manual_seed(first_count)
    B, n = 2, 12
    E = first_count + n - 1
    if values == "continuous":
        scores = torch.rand(B, n, E, generator=gen)
    elif values == "ties":
        scores = torch.randint(0, 3, (B, n, E), generator=gen).float()
    elif values == "flat":
        scores = torch.zeros(B, n, E)
    else:
        scores = torch.rand(B, n, E, generator=gen)
        scores[..., ::8] += 100.0
    got, _, _ = _native.select_chunk(scores.unsqueeze(1), torch.ones(B, n, 1), first_count, top_k, False)
    assert got.dtype == torch.int32 and got.shape == (B, n, top_k)
    assert (got[..., 1:] > got[..., :-1]).all()
    allowed = causal_mask(n, E, first_count - 1, "cpu")
    mask = torch.zeros(B, n, E, dtype=torch.bool).scatter_(-1, got.long(), True)
    assert torch.equal(mask, select_top_k(scores, allowed, top_k))


def test_chunk_selection_scores_heads_and_keeps_the_kl_inputs():
    """Scores ``sum_j w_j ReLU(products_j)`` (negative head weights too), their top-k, and the
    scores and ReLU terms at the chosen keys."""
    gen = torch.Generator().manual_seed(0)
    B, J, n, first, top_k = 2, 3, 6, 9, 4
    E = first + n - 1
    products, weights = torch.randn(B, J, n, E, generator=gen), torch.randn(B, n, J, generator=gen)
    keys, scores, terms = _native.select_chunk(products, weights, first, top_k, True)
    want_scores = torch.einsum("bjts,btj->bts", products.double().relu(), weights.double())
    causal = causal_mask(n, E, first - 1, "cpu")
    mask = torch.zeros(B, n, E, dtype=torch.bool).scatter_(-1, keys.long(), True)
    assert torch.equal(mask, select_top_k(want_scores.float(), causal, top_k))
    torch.testing.assert_close(scores.double(), want_scores.gather(-1, keys.long()))
    want_terms = products.relu().gather(-1, keys.long().unsqueeze(1).expand(-1, J, -1, -1)).transpose(1, 2)
    assert torch.equal(terms, want_terms)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_chunk_selection_writes_its_rows_of_a_whole_selection(threads):
    """With ``into``, the chunk's rows land at ``row..row+n`` of the sequence-long outputs (both
    sequences), the same values as a chunk on its own, on any number of OpenMP threads; the other
    rows stay as they were. The head weights are then the sequence's, read at the same rows."""
    gen = torch.Generator().manual_seed(1)
    B, J, n, first, top_k, T, row = 2, 4, 7, 30, 8, 20, 9
    E = first + n - 1
    products, weights = torch.randn(B, J, n, E, generator=gen), torch.randn(B, n, J, generator=gen)
    alone = _native.select_chunk(products, weights, first, top_k, True)
    into = (torch.full((B, T, top_k), -1, dtype=torch.int32), torch.full((B, T, top_k), -1.0),
            torch.full((B, T, J, top_k), -1.0))
    scratch = torch.empty(_native.select_scratch_size(E, threads), dtype=torch.int32)
    sequence_weights = torch.randn(B, T, J, generator=gen)  # other rows: weights that would change the choice
    sequence_weights[:, row:row + n] = weights
    got = _native.select_chunk(products, sequence_weights, first, top_k, True, into, row, scratch)
    for whole, part in zip(got, alone):
        assert torch.equal(whole[:, row:row + n], part)
        outside = torch.cat([whole[:, :row], whole[:, row + n:]], dim=1)
        assert (outside == -1).all()


def test_kernels_refuse_other_dtypes_and_layouts():
    keys = torch.zeros(1, 2, 1, dtype=torch.int32)
    table = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="float64"):
        _native.attention_forward(torch.zeros(1, 2, 1, 4, dtype=torch.float64), table, table, keys, 0, 1.0)
    with pytest.raises(ValueError, match="contiguous: False"):
        _native.attention_forward(torch.zeros(1, 2, 1, 8)[..., ::2], table, table, keys, 0, 1.0)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("start,T", [(0, 23), (6, 17)])
def test_training_path_equals_the_csr_path_in_float64(n_kv_heads, start, T):
    """Output, indexer KL and the gradients of the input and of every weight (the indexer's through
    its KL) of the float32 native path against the CSR path in float64, B=2, chunks of 5; with
    ``start > 0`` a prefill block after cached keys (no gradients there)."""
    model = ModelConfig(**TINY_MODEL)
    attn = resolve_attention({"name": "sparse", "top_k": 6, "n_kv_heads": n_kv_heads, "index_head_dim": 8,
                              "chunk_size": 5, "indexer_loss_weight": 0.5}, model).build(model, 0).train()
    x = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(T))
    prefix = torch.randn(2, start, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for kernel, dtype in (("native", torch.float32), ("csr", torch.float64)):
        attn.to(dtype).kernel = kernel
        xk = x.to(dtype).requires_grad_()
        ctx = AttentionContext(RotaryEmbedding(), training=True, step=1, record_stats=True)
        if start:
            cache = attn.init_cache(2, start + T, "cpu", dtype)
            with torch.no_grad():
                attn(prefix.to(dtype), AttentionContext(RotaryEmbedding()), cache)
            ctx = AttentionContext(RotaryEmbedding(), start_pos=start, record_stats=True)
            with torch.no_grad():
                results[kernel] = (attn(xk, ctx, cache), ctx.stats["indexer_kl"])
            continue
        y = attn(xk, ctx)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum() + ctx.aux_losses["indexer_kl"]
        results[kernel] = (y, ctx.stats["indexer_kl"], *torch.autograd.grad(loss, [xk, *attn.parameters()]))
    for got, want in zip(results["native"], results["csr"]):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_chosen_for_float32_on_cpu_only():
    cpu = torch.device("cpu")
    assert selected_attention_kernel(cpu, 0.0, torch.float32) == "native"
    assert selected_attention_kernel(cpu, 0.0, torch.bfloat16) == "native"  # computed in float32
    assert selected_attention_kernel(cpu, 0.0, torch.float64) == "csr"
    assert selected_attention_kernel(cpu, 0.1, torch.float32) == "gathered"


@pytest.mark.parametrize("chunk_size", [7, 64])  # 64: blocks of NATIVE_SELECT_ROWS inside a chunk
def test_selection_through_the_kernels_equals_the_pytorch_selection(chunk_size):
    gen = torch.Generator().manual_seed(3)
    B, H_I, T, D_I, start = 2, 3, 70, 4, 5
    index_q, index_k = torch.randn(B, H_I, T, D_I, generator=gen), torch.randn(B, start + T, D_I, generator=gen)
    index_w = torch.randint(-1, 2, (B, T, H_I), generator=gen).float()  # exact zeros: ties
    got = topk_attention.select_top_k_chunked(index_q, index_k, index_w, start, 9, chunk_size, True, native=True)
    want = topk_attention.select_top_k_chunked(index_q, index_k, index_w, start, 9, chunk_size, True)
    scores = index_scores(index_q, index_k, index_w)
    for selection in (got, want):
        mask = torch.zeros(B, T, start + T, dtype=torch.bool).scatter_(-1, selection.keys.long(), True)
        assert torch.equal(mask & causal_mask(T, start + T, start, "cpu"),
                           select_top_k(scores, causal_mask(T, start + T, start, "cpu"), 9))
    order_got, order_want = got.keys.long().sort(-1), want.keys.long().sort(-1)
    torch.testing.assert_close(got.scores.gather(-1, order_got.indices), want.scores.gather(-1, order_want.indices))
    torch.testing.assert_close(got.relu.gather(-1, order_got.indices.unsqueeze(2).expand(-1, -1, H_I, -1)),
                               want.relu.gather(-1, order_want.indices.unsqueeze(2).expand(-1, -1, H_I, -1)))


@pytest.fixture
def fresh_library():
    _native.library.cache_clear()
    yield
    _native.library.cache_clear()


def test_disabled_or_unbuildable_falls_back_to_pytorch(monkeypatch, fresh_library, caplog, tmp_path):
    monkeypatch.setenv("ATTNLAB_NATIVE", "0")
    assert not _native.available()
    assert selected_attention_kernel(torch.device("cpu"), 0.0, torch.float32) == "csr"
    _native.library.cache_clear()
    monkeypatch.delenv("ATTNLAB_NATIVE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with caplog.at_level(logging.WARNING, logger="attnlab.attention._native"):
        assert not _native.available()
    assert "uses PyTorch operations" in caplog.text
    assert not list(tmp_path.rglob("*.so*"))  # no partial library left behind


def _output_in_child(keys):
    table = torch.ones(1, 2, 1, 8)
    return _native.attention_forward(torch.ones(1, 2, 1, 8), table, table, keys, 0, 1.0)[1].sum().item()


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_kernels_run_in_a_forked_child(threads):
    """A child forked after the parent used the thread pool gets a pool of its own (the parent's
    threads do not exist there: submitting to the inherited pool would wait forever)."""
    keys = torch.tensor([[[0], [1]]], dtype=torch.int32)
    want = _output_in_child(keys)  # the parent's pool now exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_output_in_child, (keys,)).get(timeout=60) == want == 16.0
