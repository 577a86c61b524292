"""Sliding-window attention against a dense band-masked softmax written here.

Convention under test: token t sees keys s with t - window < s <= t."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import AttentionContext, resolve_attention, sliding
from attnlab.attention.sliding import banded_attention
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from attnlab.model import GPT
from tests.conftest import TINY_MODEL
from tests.helpers import largest_intermediate


def build(spec: dict | str, **model_overrides):
    model = ModelConfig(**{**TINY_MODEL, **model_overrides})
    return model, resolve_attention(spec, model).build(model, 0).double().eval()


def dense_band_reference(attn, x: torch.Tensor, window: int, rope: RotaryEmbedding | None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + band mask) V with an explicit (T, T) mask t - window < s <= t."""
    B, T, C = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w = attn.qkv_proj.weight
    q = (x @ w[:H * D].T).view(B, T, H, D).transpose(1, 2)
    k = (x @ w[H * D:(H + H_kv) * D].T).view(B, T, H_kv, D).transpose(1, 2)
    v = (x @ w[(H + H_kv) * D:].T).view(B, T, H_kv, D).transpose(1, 2)
    if rope is not None:
        q, k = rope.rotate(q, 0), rope.rotate(k, 0)
    k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    visible = (s <= t) & (s > t - window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(B, T, C) @ attn.out_proj.weight.T


@pytest.mark.parametrize("window", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("block_size", [None, 4, 5, 32])
def test_matches_dense_band_reference(window, block_size):
    """T=21 is a multiple of none of the blocks; blocks of 4 and 5 are smaller than most windows."""
    _, attn = build({"name": "sliding", "window": window, "block_size": block_size})
    x = torch.randn(2, 21, 64, dtype=torch.float64, requires_grad=True)
    rope = RotaryEmbedding()
    got = attn(x, AttentionContext(rope))
    want = dense_band_reference(attn, x, window, rope)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    # the backward of the blocked gather (pad / unfold / reshape) is exact too
    grad_out = torch.randn_like(got)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("use_rope", [False, True])
def test_grouped_kv_heads_match_dense_band_reference(n_kv_heads, use_rope):
    _, attn = build({"name": "sliding", "window": 6, "block_size": 4, "n_kv_heads": n_kv_heads})
    assert attn.n_kv_heads == n_kv_heads
    x = torch.randn(2, 19, 64, dtype=torch.float64)
    rope = RotaryEmbedding() if use_rope else None
    torch.testing.assert_close(attn(x, AttentionContext(rope)), dense_band_reference(attn, x, 6, rope),
                               atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("window", [13, 20])
def test_window_covering_the_sequence_is_full_causal_attention(window):
    _, sliding = build({"name": "sliding", "window": window})
    _, mha = build("mha")
    mha.load_state_dict(sliding.state_dict())
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    torch.testing.assert_close(sliding(x, ctx), mha(x, ctx), atol=1e-12, rtol=1e-10)
    # one token shorter than the sequence: the first key drops out of the last query's window
    _, narrower = build({"name": "sliding", "window": 12})
    narrower.load_state_dict(sliding.state_dict())
    assert not torch.allclose(narrower(x, ctx)[:, -1], mha(x, ctx)[:, -1])


@pytest.mark.parametrize("block", [3, 4, 13])
def test_blocked_path_with_a_covering_window_is_causal_sdpa(block):
    """The blocked kernel itself (not the dispatch to SDPA) reduces to causal attention."""
    q, k, v = (torch.randn(2, 4, 13, 8, dtype=torch.float64) for _ in range(3))
    got = banded_attention(q, k, v, window=13, n_prefix=0, block=block)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 13, 32)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("window,block_size", [(1, None), (4, 3), (7, 4), (8, 8)])
def test_window_boundary(window, block_size):
    """Key/value of position t - window do not reach output t; those of t - window + 1 do.

    Changing input s changes only k_s, v_s for every output t != s (q_s feeds output s alone)."""
    _, attn = build({"name": "sliding", "window": window, "block_size": block_size})
    x = torch.randn(1, 24, 64, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    base = attn(x, ctx)
    for t in range(window, 24):
        for s, should_change in ((t - window, False), (t - window + 1, True)):
            perturbed = x.clone()
            perturbed[0, s] += 1.0
            changed = not torch.allclose(attn(perturbed, ctx)[0, t], base[0, t], atol=1e-12, rtol=0)
            assert changed == should_change, f"window={window}: key {s} {'in' if should_change else 'out of'} view of {t}"


def _gpt(window: int, **spec):
    torch.manual_seed(0)
    return GPT.from_config(TINY_MODEL, {"name": "sliding", "window": window, **spec}).eval()


@pytest.mark.parametrize("window,spec", [(1, {}), (5, {}), (8, {"block_size": 3}), (6, {"n_kv_heads": 2})])
def test_token_by_token_decoding_equals_full_forward(window, spec):
    model = _gpt(window, **spec)
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(2, 40)
        steps = []
        for t in range(40):
            steps.append(model(idx[:, t:t + 1], cache=cache).logits)
            # the buffer is allocated at min(window, max_len) slots and never grows
            assert all(layer.k.shape[2] == window for layer in cache.layers)
            assert cache.nbytes() == model.cache_bytes(2, window)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunks", [(3, 1, 2, 9, 1, 11, 13), (17, 5, 1, 1, 16), (2, 2, 2, 30, 4)])
@pytest.mark.parametrize("window,spec", [(5, {}), (7, {"block_size": 2}), (6, {"n_kv_heads": 1})])
def test_chunked_prefill_equals_full_forward(window, spec, chunks):
    """Chunks shorter and longer than the window, starting before and after it has filled."""
    model = _gpt(window, **spec)
    idx = torch.randint(0, 97, (2, sum(chunks)))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(2, idx.shape[1])
        parts, start = [], 0
        for size in chunks:
            parts.append(model(idx[:, start:start + size], cache=cache).logits)
            start += size
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)


def test_cache_holds_at_most_window_positions():
    model = _gpt(8)
    B, el = 3, 4
    per_position = 2 * B * model.cfg.n_layers * model.cfg.n_heads * model.cfg.head_dim * el
    sizes = {}
    for context in (1, 5, 8, 9, 40, 64):
        cache = model.init_cache(B, context)
        with torch.no_grad():
            model(torch.randint(0, 97, (B, context)), cache=cache)
        sizes[context] = cache.nbytes()
        assert sizes[context] == model.cache_bytes(B, context) == per_position * min(8, context)
    assert sizes[8] == sizes[9] == sizes[40] == sizes[64]


def test_memory_grows_linearly_in_sequence_length():
    """O(T * window): doubling T doubles the largest tensor, far below a (T, T) score matrix."""
    model, attn = build({"name": "sliding", "window": 64})
    attn = attn.float()
    ctx = AttentionContext(RotaryEmbedding())
    sizes = {}
    with torch.no_grad():
        for T in (1024, 2048):
            sizes[T], _ = largest_intermediate(attn, torch.randn(1, T, 64), ctx)
    assert 1.8 <= sizes[2048] / sizes[1024] <= 2.2, sizes
    assert sizes[2048] * 16 < 2048 * 2048 * model.n_heads, sizes
    # the attention core alone (its mask and gathered key spans), without the projections
    core = {}
    for T in (1024, 2048):
        q, k, v = (torch.randn(1, 4, T, 16) for _ in range(3))
        core[T], _ = largest_intermediate(banded_attention, q, k, v, window=64, n_prefix=0, block=64)
    assert 1.8 <= core[2048] / core[1024] <= 2.2, core
    assert core[2048] * 8 < 2048 * 2048, core


@pytest.mark.skipif(sliding.flex_attention is None, reason="flex attention not in this torch")
@pytest.mark.parametrize("T,window,n_kv_heads", [(150, 64, 4), (97, 40, 2), (64, 1, 1)])
def test_flex_block_mask_matches_dense_band_reference(T, window, n_kv_heads):
    """The CUDA path's mask_mod, run through eager flex attention on CPU (same semantics, unfused)."""
    q = torch.randn(2, 4, T, 16)
    k, v = (torch.randn(2, n_kv_heads, T, 16) for _ in range(2))
    block_mask = sliding._sliding_block_mask(window, T, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex attention warns that it is not compiled
        got = sliding.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=n_kv_heads != 4)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (s <= t) & (s > t - window)
    k, v = k.repeat_interleave(4 // n_kv_heads, dim=1), v.repeat_interleave(4 // n_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(got, torch.softmax(scores, dim=-1) @ v, atol=1e-5, rtol=1e-4)


def test_presets_set_their_windows(tiny_model_cfg):
    assert resolve_attention("sliding_512", tiny_model_cfg).config.window == 512
    assert resolve_attention("sliding_256", tiny_model_cfg).config.window == 256
    assert resolve_attention("sliding", tiny_model_cfg).config.window == 256


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_a_positive_integer(tiny_model_cfg, window):
    with pytest.raises(ConfigError, match=rf"attention\.window={window}; allowed: an integer >= 1"):
        resolve_attention({"name": "sliding", "window": window}, tiny_model_cfg)


def test_window_must_be_an_integer(tiny_model_cfg):
    with pytest.raises(ConfigError, match=r"attention\.window=2\.5; allowed: an integer"):
        resolve_attention({"name": "sliding", "window": 2.5}, tiny_model_cfg)


def test_block_size_must_be_a_positive_integer(tiny_model_cfg):
    with pytest.raises(ConfigError, match=r"attention\.block_size=0; allowed: an integer >= 1, or null"):
        resolve_attention({"name": "sliding", "block_size": 0}, tiny_model_cfg)


def test_kv_heads_are_validated_as_in_gqa(tiny_model_cfg):
    with pytest.raises(ConfigError, match=r"attention\.n_kv_heads=3: must divide model\.n_heads"):
        resolve_attention({"name": "sliding", "n_kv_heads": 3}, tiny_model_cfg)


@pytest.mark.parametrize("window,length,spec", [(1, 20, {}), (5, 20, {}), (6, 20, {"n_kv_heads": 2}), (32, 20, {})])
def test_static_decoding_step_equals_full_forward(window, length, spec):
    """The compiled path's step over the rolling buffer: slots masked until written, then all of
    them, wrapping around; a window longer than the sequence leaves a buffer of `length` slots."""
    model = _gpt(window, **spec).double()
    idx = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(2, length)
        model(idx[:, :1], cache=cache)
        steps = [model.step(idx[:, t:t + 1], cache) for t in range(1, length)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 1:], atol=1e-10, rtol=1e-9)
    assert all(layer.k.shape[2] == min(window, length) for layer in cache.layers)
