"""MLA against an explicit per-head computation written here, its two decoding paths against each
other and the full forward, its cache against the closed form, and its config errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention import AttentionContext, resolve_attention
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from attnlab.model import GPT
from tests.conftest import TINY_MODEL
from tests.helpers import largest_intermediate

#: Deliberately unequal widths (none equals model.head_dim = 16) so that mixed-up axes show.
SMALL = dict(kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
EXP10 = dict(n_layers=4, d_model=128, n_heads=4, d_ff=512, max_seq_len=1024, vocab_size=97, loss_chunk_size=0)


def build(options: dict | None = None, **model_overrides):
    model = ModelConfig(**{**TINY_MODEL, **model_overrides})
    attn = resolve_attention({"name": "mla", **(options or {})}, model).build(model, 0)
    return model, attn


# ----------------------------------------------------------------------------- reference
def rms_norm(x, gain, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rotate(x, start, theta=10000.0):
    """RoPE written out: channel i pairs with i + D/2 and turns by (start + t) * theta^(-2i/D)."""
    T, D = x.shape[-2:]
    half = D // 2
    angle = torch.arange(start, start + T, dtype=torch.float64)[:, None] * theta ** (
        -2 * torch.arange(half, dtype=torch.float64) / D)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def affine(linear, x):
    return x @ linear.weight.T + (0 if linear.bias is None else linear.bias)


def reference_mla(x, attn, eps, use_rope):
    """One head at a time, with an explicit softmax(q k^T * scale + causal mask) v."""
    H, r = attn.n_heads, attn.kv_lora_rank
    d_n, d_r, d_v = attn.nope_dim, attn.rope_dim, attn.v_dim
    T = x.shape[1]
    if attn.q_lora:
        q = affine(attn.q_up, rms_norm(affine(attn.q_down, x), attn.q_norm.weight, eps))
    else:
        q = affine(attn.q_proj, x)
    down = affine(attn.kv_down, x)
    c_kv = rms_norm(down[..., :r], attn.kv_norm.weight, eps)
    k_rope = rotate(down[..., r:], 0) if use_rope else down[..., r:]  # (B, T, d_r), one for all heads
    w_up, b_up = attn.kv_up.weight, attn.kv_up.bias
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    heads = []
    for h in range(H):
        q_h = q[..., h * (d_n + d_r):(h + 1) * (d_n + d_r)]
        q_rope_h = rotate(q_h[..., d_n:], 0) if use_rope else q_h[..., d_n:]
        rows = slice(h * (d_n + d_v), (h + 1) * (d_n + d_v))
        kv_h = c_kv @ w_up[rows].T + (0 if b_up is None else b_up[rows])
        k_h = torch.cat([kv_h[..., :d_n], k_rope], dim=-1)
        v_h = kv_h[..., d_n:]
        scores = torch.cat([q_h[..., :d_n], q_rope_h], dim=-1) @ k_h.transpose(1, 2) / math.sqrt(d_n + d_r)
        heads.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v_h)
    return affine(attn.out_proj, torch.cat(heads, dim=-1))


@pytest.mark.parametrize("q_lora_rank", [None, 20])
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_per_head_reference(q_lora_rank, use_rope, bias):
    model, attn = build({**SMALL, "q_lora_rank": q_lora_rank}, bias=bias)
    attn = attn.double().eval()
    with torch.no_grad():  # non-trivial norm gains, so a skipped or misplaced norm shows
        for norm in (attn.kv_norm, getattr(attn, "q_norm", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, model.d_model, dtype=torch.float64)
    got = attn(x, AttentionContext(RotaryEmbedding() if use_rope else None))
    want = reference_mla(x, attn, model.norm_eps, use_rope)
    # the library's rotary tables are float32; without RoPE everything is float64
    tol = dict(atol=1e-6, rtol=1e-5) if use_rope else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, want, **tol)


def test_only_the_rotary_key_carries_position():
    """Written at position 10 instead of 0, the cached latent is unchanged and the rotary key
    turns; with learned positions (no RoPE) nothing changes."""
    _, attn = build(SMALL)
    attn = attn.double().eval()
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    r = attn.kv_lora_rank
    rope = RotaryEmbedding()
    _, _, rows_at_0 = attn.project(x, AttentionContext(rope))
    _, _, rows_at_10 = attn.project(x, AttentionContext(rope, start_pos=10))
    torch.testing.assert_close(rows_at_0[..., :r], rows_at_10[..., :r])
    assert not torch.allclose(rows_at_0[..., r:], rows_at_10[..., r:])
    _, _, plain_at_0 = attn.project(x, AttentionContext(None))
    _, _, plain_at_10 = attn.project(x, AttentionContext(None, start_pos=10))
    torch.testing.assert_close(plain_at_0, plain_at_10, atol=0, rtol=0)


# ----------------------------------------------------------------------------- decoding
def decode(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Prefill 9 tokens, a chunk of 3 (several queries on the absorbed path), then one at a time."""
    cache = model.init_cache(idx.shape[0], idx.shape[1])
    parts = [model(idx[:, :9], cache=cache).logits, model(idx[:, 9:12], cache=cache).logits]
    parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(12, idx.shape[1])]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("q_lora_rank", [None, 20])
@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
@pytest.mark.parametrize("bias", [False, True])
def test_absorbed_decoding_equals_unabsorbed_and_full_forward(q_lora_rank, pos_encoding, bias):
    cfg = {**TINY_MODEL, "pos_encoding": pos_encoding, "bias": bias}
    options = {"name": "mla", **SMALL, "q_lora_rank": q_lora_rank}
    absorbed = GPT.from_config(cfg, {**options, "absorb": True}).double().eval()
    unabsorbed = GPT.from_config(cfg, {**options, "absorb": False}).double().eval()
    with torch.no_grad():
        for p in absorbed.parameters():  # larger than GPT-2 init so attention is far from uniform
            p.normal_(0, 0.3)
        unabsorbed.load_state_dict(absorbed.state_dict())
        idx = torch.randint(0, 97, (2, 24))
        full = absorbed(idx).logits
        via_absorbed, via_unabsorbed = decode(absorbed, idx), decode(unabsorbed, idx)
    torch.testing.assert_close(via_absorbed, via_unabsorbed, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(via_absorbed, full, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("absorb", [True, False])
@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_static_decoding_step_equals_full_forward(absorb, pos_encoding):
    """The compiled path's step (every cached row under a mask of the written ones), both ways."""
    model = GPT.from_config({**TINY_MODEL, "pos_encoding": pos_encoding, "bias": True},
                            {"name": "mla", **SMALL, "q_lora_rank": 20, "absorb": absorb}).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        idx = torch.randint(0, 97, (2, 24))
        full = model(idx).logits
        cache = model.init_cache(2, 24)
        model(idx[:, :5], cache=cache)
        steps = [model.step(idx[:, t:t + 1], cache) for t in range(5, 24)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-10, rtol=1e-9)


def test_absorbed_decoding_never_materialises_per_head_keys():
    """One decoded token over S cached positions: the absorbed path touches O(S (r + d_r)) values,
    the unabsorbed one up-projects S * H * (d_n + d_v). (S large enough that the cache, not the
    weights, is the largest thing either path touches.)"""
    B, S = 4, 200
    sizes = {}
    for absorb in (True, False):
        torch.manual_seed(0)
        _, attn = build({**SMALL, "absorb": absorb})
        attn.eval()
        rope = RotaryEmbedding()
        cache = attn.init_cache(B, S, None, torch.float32)
        x = torch.randn(B, S, 64)
        with torch.no_grad():
            attn(x[:, :-1], AttentionContext(rope), cache)
            sizes[absorb], _ = largest_intermediate(attn, x[:, -1:], AttentionContext(rope, start_pos=S - 1), cache)
    per_head_kv = B * S * 4 * (SMALL["qk_nope_head_dim"] + SMALL["v_head_dim"])
    assert sizes[False] >= per_head_kv
    assert sizes[True] <= B * S * (SMALL["kv_lora_rank"] + SMALL["qk_rope_head_dim"]) < per_head_kv


# ----------------------------------------------------------------------------- cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_only_latent_and_rotary_key(dtype):
    B, context, max_len = 3, 7, 10
    model, attn = build(SMALL)
    attn = attn.to(dtype).eval()
    rope = RotaryEmbedding()
    cache = attn.init_cache(B, max_len, None, dtype)
    x = torch.randn(B, context, 64, dtype=dtype)
    with torch.no_grad():
        attn(x, AttentionContext(rope), cache)
    width = SMALL["kv_lora_rank"] + SMALL["qk_rope_head_dim"]
    [held] = cache.tensors()
    assert held.shape == (B, max_len, width)  # exactly max_len positions
    element = torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes() == B * max_len * width * element
    assert attn.cache_bytes(B, max_len, dtype) == cache.nbytes()
    # what is held is c_kv = RMSNorm(W_dkv x) and the rotated k_rope = RoPE(W_kr x), nothing else
    with torch.no_grad():
        x64 = x.double()
        down = x64 @ attn.kv_down.weight.double().T
        r = SMALL["kv_lora_rank"]
        c_kv = rms_norm(down[..., :r], attn.kv_norm.weight.double(), model.norm_eps)
        k_rope = rotate(down[..., r:], 0)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(held[:, :context].double(), torch.cat([c_kv, k_rope], -1), **tol)
    assert held[:, context:].abs().sum() == 0


def test_cache_bytes_against_mha_on_exp10():
    """exp10: MHA caches 2*4*32 = 256 values per token and layer, MLA's defaults 64 + 32 = 96."""
    B, context = 2, 16
    models = {}
    for name in ("mla", "mha"):
        torch.manual_seed(0)
        models[name] = GPT.from_config(EXP10, name).eval()
    per_value = 4 * 4 * B * context  # float32 bytes * layers * batch * tokens
    assert models["mha"].cache_bytes(B, context) == 256 * per_value
    assert models["mla"].cache_bytes(B, context) == 96 * per_value
    cache = models["mla"].init_cache(B, context)
    with torch.no_grad():
        models["mla"](torch.randint(0, 97, (B, context)), cache=cache)
    assert cache.nbytes() == 96 * per_value


# ----------------------------------------------------------------------------- parameters
def expected_parameters(C, H, r, d_n, d_r, d_v, q_rank, bias):
    def linear(n_in, n_out):
        return n_in * n_out + (n_out if bias else 0)

    queries = linear(C, H * (d_n + d_r)) if not q_rank else linear(C, q_rank) + q_rank + linear(q_rank, H * (d_n + d_r))
    return queries + linear(C, r + d_r) + r + linear(r, H * (d_n + d_v)) + linear(H * d_v, C)


@pytest.mark.parametrize("q_lora_rank", [None, 0, 20])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_closed_form(q_lora_rank, bias):
    model, attn = build({**SMALL, "q_lora_rank": q_lora_rank}, bias=bias)
    expected = expected_parameters(model.d_model, model.n_heads, SMALL["kv_lora_rank"], SMALL["qk_nope_head_dim"],
                                   SMALL["qk_rope_head_dim"], SMALL["v_head_dim"], q_lora_rank, bias)
    assert sum(p.numel() for p in attn.parameters()) == expected
    assert attn.q_lora == bool(q_lora_rank)


def test_parameter_count_on_exp10():
    model = ModelConfig(**EXP10)
    attn = resolve_attention("mla", model).build(model, 0)
    assert sum(p.numel() for p in attn.parameters()) == 32768 + 12288 + 64 + 16384 + 16384 == 77888


# ----------------------------------------------------------------------------- training details
def test_attention_dropout_only_in_training():
    _, attn = build(SMALL, attn_dropout=0.5)
    x = torch.randn(1, 12, 64)
    ctx = AttentionContext(RotaryEmbedding())
    attn.eval()
    torch.testing.assert_close(attn(x, ctx), attn(x, ctx))
    attn.train()
    assert not torch.allclose(attn(x, ctx), attn(x, ctx))


def test_output_projection_is_marked_residual():
    _, attn = build()
    assert getattr(attn.out_proj, "is_residual_projection", False)
    assert not any(getattr(m, "is_residual_projection", False) for m in (attn.q_proj, attn.kv_down, attn.kv_up))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("option,value,message", [
    ("kv_lora_rank", 0, r"attention\.kv_lora_rank=0; allowed: integers >= 1"),
    ("q_lora_rank", -1, r"attention\.q_lora_rank=-1; allowed: null or 0 \(a plain W_q\), or integers >= 1"),
    ("qk_nope_head_dim", 0, r"attention\.qk_nope_head_dim=0; allowed: integers >= 1"),
    ("v_head_dim", -2, r"attention\.v_head_dim=-2; allowed: integers >= 1"),
    ("qk_rope_head_dim", 0, r"attention\.qk_rope_head_dim=0; allowed: even integers >= 2"),
    ("qk_rope_head_dim", 7,
     r"attention\.qk_rope_head_dim=7: RoPE rotates channels in pairs; allowed: even integers >= 2"),
])
def test_invalid_options_are_named(option, value, message):
    with pytest.raises(ConfigError, match=message):
        build({option: value})


def test_preset_matches_defaults():
    model = ModelConfig(**TINY_MODEL)
    assert resolve_attention("mla", model).config == resolve_attention({"name": "mla"}, model).config
