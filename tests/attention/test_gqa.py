"""MHA / GQA / MQA against an explicit softmax(QK^T/sqrt(d) + causal mask) V written here."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention import AttentionContext, resolve_attention
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from tests.conftest import TINY_MODEL


def naive_attention(x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, rope=None):
    """Loops over heads and query positions; K/V head of query head h is h // (H / H_kv)."""
    B, T, C = x.shape
    D = C // n_heads
    q = (x @ w_q.T).view(B, T, n_heads, D)
    k = (x @ w_k.T).view(B, T, n_kv_heads, D)
    v = (x @ w_v.T).view(B, T, n_kv_heads, D)
    if rope is not None:
        q = rope(q.transpose(1, 2)).transpose(1, 2)
        k = rope(k.transpose(1, 2)).transpose(1, 2)
    group = n_heads // n_kv_heads
    out = torch.zeros(B, T, n_heads, D, dtype=x.dtype)
    for b in range(B):
        for h in range(n_heads):
            kv = h // group
            for t in range(T):
                scores = torch.stack([q[b, t, h] @ k[b, s, kv] for s in range(t + 1)]) / math.sqrt(D)
                weights = torch.softmax(scores, dim=0)
                out[b, t, h] = (weights[:, None] * v[b, : t + 1, kv]).sum(0)
    return out.reshape(B, T, C) @ w_o.T


def build(name, n_kv_heads=None, **model_overrides):
    model = ModelConfig(**{**TINY_MODEL, **model_overrides})
    spec = {"name": name} if n_kv_heads is None else {"name": name, "n_kv_heads": n_kv_heads}
    attn = resolve_attention(spec, model).build(model, 0).double().eval()
    return model, attn


def weights(attn):
    q_dim, kv_dim, _ = attn.split
    w = attn.qkv_proj.weight
    return w[:q_dim], w[q_dim:q_dim + kv_dim], w[q_dim + kv_dim:], attn.out_proj.weight


@pytest.mark.parametrize("name,n_kv,expected_kv", [("mha", None, 4), ("gqa", 2, 2), ("mqa", None, 1), ("gqa", 1, 1)])
@pytest.mark.parametrize("use_rope", [False, True])
def test_matches_naive_reference(name, n_kv, expected_kv, use_rope):
    model, attn = build(name, n_kv)
    assert attn.n_kv_heads == expected_kv
    x = torch.randn(2, 9, model.d_model, dtype=torch.float64)
    rope = RotaryEmbedding() if use_rope else None
    got = attn(x, AttentionContext(rope))
    ref_rope = (lambda t: rope.rotate(t, 0)) if use_rope else None
    want = naive_attention(x, *weights(attn), model.n_heads, expected_kv, ref_rope)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_gqa_with_all_kv_heads_is_mha_and_with_one_is_mqa():
    """Same weights, different registered names: identical outputs."""
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    for gqa_heads, other in ((4, "mha"), (1, "mqa")):
        _, gqa = build("gqa", gqa_heads)
        _, ref = build(other)
        ref.load_state_dict(gqa.state_dict())
        torch.testing.assert_close(gqa(x, ctx), ref(x, ctx), atol=0, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """GQA is MHA whose K/V projections repeat within each query group."""
    _, gqa = build("gqa", 2)
    _, mha = build("mha")
    w_q, w_k, w_v, w_o = weights(gqa)
    D = 16
    rep = lambda w: w.view(2, D, -1).repeat_interleave(2, dim=0).reshape(4 * D, -1)  # noqa: E731
    with torch.no_grad():
        mha.qkv_proj.weight.copy_(torch.cat([w_q, rep(w_k), rep(w_v)]))
        mha.out_proj.weight.copy_(w_o)
    x = torch.randn(1, 10, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    torch.testing.assert_close(gqa(x, ctx), mha(x, ctx), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name,n_kv", [("mha", None), ("gqa", 2), ("mqa", None)])
def test_parameter_count_closed_form(name, n_kv):
    """MHA 4*D^2; GQA 2*D^2 + 2*D*H_kv*d_head; MQA 2*D^2 + 2*D*d_head (no biases)."""
    model, attn = build(name, n_kv)
    D, d_head = model.d_model, model.head_dim
    kv = {"mha": model.n_heads, "gqa": n_kv, "mqa": 1}[name]
    expected = 2 * D * D + 2 * D * kv * d_head
    assert sum(p.numel() for p in attn.parameters()) == expected
    if name == "mha":
        assert expected == 4 * D * D


def test_kv_cache_bytes_scale_with_kv_heads():
    """MQA caches 1/H of MHA's bytes, GQA H_kv/H."""
    sizes = {n: build(n, k)[1].cache_bytes(1, 100, torch.float32) for n, k in (("mha", None), ("gqa", 2), ("mqa", None))}
    assert sizes["mha"] == 2 * 4 * 16 * 100 * 4
    assert sizes["mqa"] * 4 == sizes["mha"]
    assert sizes["gqa"] * 2 == sizes["mha"]


@pytest.mark.parametrize("n_kv", [0, 3, 5, 8])
def test_kv_heads_must_divide_heads(n_kv):
    with pytest.raises(ConfigError, match=rf"attention\.n_kv_heads={n_kv}: must divide model\.n_heads; allowed: divisors of model\.n_heads=4: \[1, 2, 4\]"):
        build("gqa", n_kv)


def test_dropout_on_attention_probabilities_only_in_training():
    model, attn = build("mha", attn_dropout=0.5)
    x = torch.randn(1, 8, 64, dtype=torch.float64)
    ctx = AttentionContext(None)
    torch.testing.assert_close(attn(x, ctx), attn(x, ctx))  # eval: deterministic
    attn.train()
    assert not torch.allclose(attn(x, ctx), attn(x, ctx))
