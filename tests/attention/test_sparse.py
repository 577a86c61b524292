"""DeepSeek-V3.2-style sparse attention against references written here: the indexer formula
``I(t,s) = sum_j w_j(t) ReLU(q_j(t).k(s))`` as an explicit loop, top-k chosen per row by sorting,
and an explicit masked softmax(QK^T/sqrt(d)) V in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import AttentionContext, resolve_attention
from attnlab.attention.sparse import indexer_kl
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from attnlab.model import GPT
from tests.conftest import TINY_MODEL


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


@pytest.mark.parametrize("n_kv_heads,dense_name", [(None, "mha"), (2, "gqa")])
def test_top_k_covering_the_sequence_is_full_causal_attention(n_kv_heads, dense_name):
    model, sparse = build(top_k=12, n_kv_heads=n_kv_heads)
    dense = resolve_attention({"name": dense_name, "n_kv_heads": n_kv_heads}, model).build(model, 0).double()
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all(key.startswith("index_proj") for key in unexpected)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    torch.testing.assert_close(sparse(x, ctx), dense(x, ctx), atol=0, rtol=0)


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_attends_over_exactly_the_indexer_choice(use_rope, n_kv_heads, top_k):
    _, attn = build(top_k=top_k, n_kv_heads=n_kv_heads, index_n_heads=3, index_head_dim=8)
    rope = RotaryEmbedding() if use_rope else None
    x = torch.randn(2, 16, 64, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x, AttentionContext(rope))
        mask = reference_selection(reference_index_scores(x, attn, rope), top_k)
        want = reference_attention(x, attn, rope, mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("top_k", [1, 5, 16])
def test_each_query_sees_min_of_t_plus_1_and_top_k_earlier_positions(monkeypatch, top_k):
    _, attn = build(top_k=top_k)
    spy = SdpaSpy()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    T = 20
    with torch.no_grad():
        attn(torch.randn(3, T, 64, dtype=torch.float64), AttentionContext(RotaryEmbedding()))
    (mask,) = spy.masks
    mask = mask.squeeze(1)  # (B, T, T), shared by all heads
    t = torch.arange(T)
    assert torch.equal(mask.sum(-1), torch.minimum(t + 1, torch.tensor(top_k)).expand(3, T))
    assert not mask[:, t[:, None] < t[None, :]].any()


def test_flat_indexer_breaks_ties_towards_recent_positions(monkeypatch):
    """All scores equal (zero head weights): the choice is the top_k latest positions, a sliding window."""
    _, attn = build(top_k=4)
    with torch.no_grad():
        attn.index_proj.weight[-attn.index_n_heads:] = 0
    spy = SdpaSpy()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    T = 12
    with torch.no_grad():
        attn(torch.randn(2, T, 64, dtype=torch.float64), AttentionContext(RotaryEmbedding()))
    t = torch.arange(T)
    window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 4)
    assert torch.equal(spy.masks[0].squeeze(1), window.expand(2, T, T))


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("top_k", [3, 64])
def test_indexer_kl_matches_reference_in_training(n_kv_heads, top_k):
    _, attn = build(top_k=top_k, n_kv_heads=n_kv_heads, index_head_dim=8, indexer_loss_weight=0.5)
    attn.train()
    rope = RotaryEmbedding()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    ctx = AttentionContext(rope, record_stats=True, training=True)
    attn(x, ctx)
    with torch.no_grad():
        want = reference_indexer_kl(x, attn, rope, reference_index_scores(x, attn, rope))
    assert want > 0
    torch.testing.assert_close(ctx.stats["indexer_kl"], want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ctx.aux_losses["indexer_kl"], 0.5 * want, atol=1e-10, rtol=1e-9)


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


def test_kl_trains_only_the_indexer_and_the_lm_loss_only_the_main_model():
    _, attn = build(top_k=4)
    attn.train()
    x = torch.randn(2, 12, 64, dtype=torch.float64, requires_grad=True)
    ctx = AttentionContext(RotaryEmbedding(), training=True)
    y = attn(x, ctx)
    ctx.aux_losses["indexer_kl"].backward(retain_graph=True)
    assert attn.index_proj.weight.grad is not None and attn.index_proj.weight.grad.abs().sum() > 0
    assert attn.qkv_proj.weight.grad is None and attn.out_proj.weight.grad is None
    assert x.grad is None  # the indexer reads a detached input
    attn.index_proj.weight.grad = None
    y.square().sum().backward()
    assert attn.index_proj.weight.grad is None  # selection passes no gradient
    assert attn.qkv_proj.weight.grad.abs().sum() > 0 and attn.out_proj.weight.grad.abs().sum() > 0


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
    assert spy.key_lengths == [3, 9] + [top_k] * (T - 9)  # single steps read only the gathered entries


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
    assert defaults.n_kv_heads is None
    assert resolve_attention("sparse_512", model).config.top_k == 512
    assert resolve_attention("sparse_256", model).config.top_k == 256


@pytest.mark.parametrize("option,value,message", [
    ("top_k", 0, r"attention\.top_k=0; allowed: an integer >= 1"),
    ("index_n_heads", 0, r"attention\.index_n_heads=0; allowed: an integer >= 1"),
    ("index_head_dim", 0, r"attention\.index_head_dim=0; allowed: an integer >= 1"),
    ("index_head_dim", 7, r"attention\.index_head_dim=7: RoPE rotates channel pairs; allowed: an even integer >= 2"),
    ("indexer_loss_weight", -0.1, r"attention\.indexer_loss_weight=-0\.1; allowed: a number >= 0"),
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
