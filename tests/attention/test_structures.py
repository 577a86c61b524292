"""Bidirectional attention, cross-attention and key padding masks, through :func:`attnlab.attention.build`.

Contract tests run for every registered mechanism and preset: each structure a mechanism
declares (``supports_bidirectional``, ``supports_cross_attention``, ``supports_key_padding``) is
checked against an independent reference in float64, and each one it does not declare is refused
with an error naming the argument. Naive loop references check the softmax family's math."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention import STRUCTURES, build, load_preset
from attnlab.config import ConfigError
from tests.attention.test_registry import ALL_SPECS

D_MODEL, N_HEADS = 32, 4
#: Shifted positions: the rotary tables are float32, so a shift moves rotated values by ~1e-8.
SHIFTED = dict(atol=1e-7, rtol=1e-5)


def _layer(spec_id: str, causal: bool = True, **options):
    kind, name = spec_id.split(":")
    spec = load_preset(name) if kind == "preset" else {"name": name}
    if spec["name"] == "moh":  # MoH's own head count must fit the small width's RoPE
        spec = {**spec, "n_kv_heads": 2, "n_shared_heads": 1, "top_k": 2}  # (build's n_heads is MoH's)
    torch.manual_seed(0)
    return build(spec, d_model=D_MODEL, n_heads=N_HEADS, causal=causal, **options).double().eval()


def _supports(spec_id: str, structure: str) -> bool:
    return _layer(spec_id).attention.structure_issue(structure) is None


def _x(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_undeclared_structures_are_refused_naming_the_argument(spec_id):
    layer = _layer(spec_id)
    undeclared = [s for s in STRUCTURES if layer.attention.structure_issue(s) is not None]
    if "bidirectional" in undeclared:
        with pytest.raises(ConfigError, match=r"^causal=False: .*; allowed: True"):
            _layer(spec_id, causal=False)
    x = _x(2, 6)
    if "cross_attention" in undeclared:
        with pytest.raises(ConfigError, match=r"^context="):
            layer(x, context=_x(2, 5))
    if "key_padding" in undeclared:
        with pytest.raises(ConfigError, match=r"^key_padding_mask="):
            layer(x, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_bidirectional_is_reversal_equivariant_and_ends_as_causal(spec_id):
    """Without positions, a bidirectional layer (every query over every key, or a two-sided
    band) commutes with reversing the sequence, which no causal layer does; and its last token,
    which sees the same keys either way, equals the causal layer's."""
    if not _supports(spec_id, "bidirectional"):
        pytest.skip("declares no bidirectional form")
    bidirectional, causal = _layer(spec_id, causal=False, rope=False), _layer(spec_id, rope=False)
    x = _x(2, 40)
    with torch.no_grad():
        y = bidirectional(x)
        torch.testing.assert_close(bidirectional(x.flip(1)), y.flip(1), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(y[:, -1], causal(x)[:, -1], atol=1e-10, rtol=1e-9)


def _padded_batch(T_real: int, left: int, right: int):
    """Row 0: ``left`` pads, ``T_real`` real tokens, ``right`` pads; row 1: all real."""
    T = left + T_real + right
    x = _x(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, :left] = False
    mask[0, T - right:] = False
    return x, mask


@pytest.mark.parametrize("spec_id", ALL_SPECS)
@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_leaves_real_tokens_as_without_padding(spec_id, causal):
    """A padded batch's real tokens equal each row run alone without its padding (rotary
    positions are relative, so left padding shifts nothing), whatever the padding holds."""
    if not _supports(spec_id, "key_padding") or (not causal and not _supports(spec_id, "bidirectional")):
        pytest.skip("declares no key padding (or no bidirectional form)")
    layer = _layer(spec_id, causal=causal)
    x, mask = _padded_batch(T_real=36, left=3, right=2)
    with torch.no_grad():
        y = layer(x, key_padding_mask=mask)
        alone = layer(x[0:1, 3:-2])
        torch.testing.assert_close(y[0:1, 3:-2], alone, **SHIFTED)
        torch.testing.assert_close(y[1:2], layer(x[1:2]), atol=1e-10, rtol=1e-9)
        other_padding = x.clone()
        other_padding[0, :3] = 100.0 * torch.randn(3, D_MODEL, dtype=torch.float64)
        torch.testing.assert_close(layer(other_padding, key_padding_mask=mask)[0, 3:-2], y[0, 3:-2],
                                   atol=1e-10, rtol=1e-9)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_key_padding_in_cached_decoding(spec_id):
    """A left-padded prompt decoded with a cache (prefill, a chunk, then one token at a time),
    the mask covering every cached position, gives each row's unpadded outputs."""
    if not _supports(spec_id, "key_padding"):
        pytest.skip("declares no key padding")
    layer = _layer(spec_id)
    x, mask = _padded_batch(T_real=37, left=3, right=0)
    cache = layer.init_cache(2, 40)
    with torch.no_grad():
        parts = [layer(x[:, :13], key_padding_mask=mask[:, :13], cache=cache),
                 layer(x[:, 13:17], key_padding_mask=mask, cache=cache)]  # a longer mask is cut
        parts += [layer(x[:, t:t + 1], key_padding_mask=mask[:, :t + 1], cache=cache) for t in range(17, 40)]
        y = torch.cat(parts, dim=1)
        torch.testing.assert_close(y[0:1, 3:], layer(x[0:1, 3:]), **SHIFTED)
        torch.testing.assert_close(y[1:2], layer(x[1:2]), **SHIFTED)
    assert cache.pos == 40


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_cross_attention_reads_the_memory_as_a_set(spec_id):
    """Cross-attention: each query on its own (rows of ``x`` do not interact), the memory without
    positions (its rows in any order), and padded memory rows as if cut off."""
    if not _supports(spec_id, "cross_attention"):
        pytest.skip("declares no cross-attention")
    layer = _layer(spec_id)
    x, memory = _x(2, 12), _x(2, 9, seed=2)
    with torch.no_grad():
        y = layer(x, context=memory)
        one_by_one = torch.cat([layer(x[:, t:t + 1], context=memory) for t in range(12)], dim=1)
        torch.testing.assert_close(one_by_one, y, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(layer(x, context=memory[:, torch.randperm(9)]), y, atol=1e-10, rtol=1e-9)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[0, 6:] = False
        padded = layer(x, context=memory, key_padding_mask=mask)
        torch.testing.assert_close(padded[0:1], layer(x[0:1], context=memory[0:1, :6]), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(padded[1:2], y[1:2], atol=1e-10, rtol=1e-9)


def test_a_different_memory_length_per_call():
    layer = _layer("registered:gqa")
    assert layer(_x(2, 5), context=_x(2, 3)).shape == layer(_x(2, 5), context=_x(2, 11)).shape == (2, 5, D_MODEL)


# ----------------------------------------------------------------------------------- naive references


def naive_attention(q, k, v, allowed):
    """Loops: ``q`` ``(B, H, T, D)``, ``k, v`` ``(B, H_kv, S, D)``, ``allowed(b, t, s)`` -> ``(B, T, H * D)``."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    y = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [s for s in range(k.shape[2]) if allowed(b, t, s)]
                scores = torch.stack([q[b, h, t] @ k[b, h // group, s] for s in keys]) / math.sqrt(D)
                weights = torch.softmax(scores, dim=0)
                y[b, t, h] = sum(w * v[b, h // group, s] for w, s in zip(weights, keys))
    return y.reshape(B, T, -1)


def gqa_reference(layer, x, memory, allowed):
    attn = layer.attention
    H, H_kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv_proj.weight.split([H * d, H_kv * d, H_kv * d])
    source = x if memory is None else memory
    q = (x @ w_q.T).view(*x.shape[:2], H, d).transpose(1, 2)
    k = (source @ w_k.T).view(*source.shape[:2], H_kv, d).transpose(1, 2)
    v = (source @ w_v.T).view(*source.shape[:2], H_kv, d).transpose(1, 2)
    return naive_attention(q, k, v, allowed) @ attn.out_proj.weight.T


@pytest.mark.parametrize("name,window", [("mha", None), ("gqa_2", None), ("mqa", None), ("sliding", 5)])
def test_softmax_family_matches_naive_loops(name, window):
    """Bidirectional (for the window, the band ``|t - s| < w``), padded, and cross-attention
    outputs of MHA/GQA/MQA and the sliding window against loops over heads, queries and keys."""
    options = {} if window is None else {"window": window, "block_size": 3}
    x, mask = _padded_batch(T_real=9, left=2, right=1)
    in_band = (lambda t, s: abs(t - s) < window) if window else (lambda t, s: True)
    layer = _layer(f"preset:{name}", causal=False, rope=False, **options)
    with torch.no_grad():
        got = layer(x, key_padding_mask=mask)
        want = gqa_reference(layer, x, None, lambda b, t, s: bool(mask[b, s]) and in_band(t, s))
        real = mask[..., None]
        torch.testing.assert_close(got * real, want * real, atol=1e-12, rtol=1e-10)
        if window is None:
            memory = _x(2, 7, seed=3)
            memory_mask = torch.ones(2, 7, dtype=torch.bool)
            memory_mask[1, :2] = False
            got = layer(x, context=memory, key_padding_mask=memory_mask)
            want = gqa_reference(layer, x, memory, lambda b, t, s: bool(memory_mask[b, s]))
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_mla_matches_naive_loops():
    """MLA bidirectional with padding, and cross-attention: per-head keys ``[W_uk c ; k_rope]``
    and values ``W_uv c`` from the memory's latents, scaled by ``1/sqrt(d_n + d_r)``."""
    layer = _layer("registered:mla", causal=False, rope=False)
    attn = layer.attention
    H, d_n, d_r, d_v, r = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank

    def reference(x, memory, allowed):
        q = attn.q_proj(x).view(*x.shape[:2], H, d_n + d_r).transpose(1, 2)
        latent, k_rope = attn.kv_down(memory).split([r, d_r], dim=-1)
        kv = attn.kv_up(attn.kv_norm(latent)).view(*memory.shape[:2], H, d_n + d_v).transpose(1, 2)
        k_nope, v = kv.split([d_n, d_v], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, H, -1, -1)], dim=-1)
        # naive_attention scales by 1/sqrt(q's width) = 1/sqrt(d_n + d_r); values are d_v wide
        B, T = x.shape[:2]
        y = torch.zeros(B, T, H, d_v, dtype=x.dtype)
        for h in range(H):
            y[:, :, h] = naive_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], allowed)
        return attn.out_proj(y.reshape(B, T, H * d_v))

    x, mask = _padded_batch(T_real=8, left=2, right=1)
    memory = _x(2, 6, seed=4)
    with torch.no_grad():
        real = mask[..., None]
        torch.testing.assert_close(layer(x, key_padding_mask=mask) * real,
                                   reference(x, x, lambda b, t, s: bool(mask[b, s])) * real, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(layer(x, context=memory), reference(x, memory, lambda b, t, s: True),
                                   atol=1e-12, rtol=1e-10)


def test_naive_attention_with_value_width_of_its_own():
    """(The helper above: values may be narrower than queries, as MLA's are.)"""
    q, k, v = torch.randn(1, 1, 2, 4, dtype=torch.float64), torch.randn(1, 1, 3, 4, dtype=torch.float64), \
        torch.randn(1, 1, 3, 2, dtype=torch.float64)
    want = torch.softmax(q[0, 0] @ k[0, 0].T / 2.0, dim=-1) @ v[0, 0]
    torch.testing.assert_close(naive_attention(q, k, v, lambda b, t, s: True)[0], want)


# ----------------------------------------------------------------------------------- the factory


def test_build_validates_like_the_configs():
    with pytest.raises(ConfigError, match=r"^attention\.n_kv_heads=3: must divide model\.n_heads"):
        build("gqa", d_model=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"^attention\.windw=8: unknown option"):
        build("sliding", d_model=64, n_heads=8, windw=8)
    with pytest.raises(ConfigError, match=r"^model\.n_heads=5: must divide model\.d_model"):
        build("mha", d_model=64, n_heads=5)
    with pytest.raises(ConfigError, match=r"^attention='flashy': unknown attention preset or mechanism"):
        build("flashy", d_model=64, n_heads=8)
    with pytest.raises(ConfigError, match=r"^causal=False: a recurrence runs left to right"):
        build("linear", d_model=64, n_heads=8, causal=False)


def test_build_takes_presets_options_and_mappings():
    layer = build("sliding_32", d_model=64, n_heads=8, n_kv_heads=2)
    assert (layer.attention.window, layer.attention.n_kv_heads) == (32, 2)
    assert build({"name": "gqa", "n_kv_heads": 4}, d_model=512, n_heads=8, causal=False).attention.n_kv_heads == 4
    assert layer(torch.randn(2, 5, 64)).shape == (2, 5, 64)


def test_a_cache_is_for_causal_self_attention_only():
    layer = build("gqa", d_model=32, n_heads=4, causal=False)
    with pytest.raises(ConfigError, match=r"^cache=.*every token would see later ones"):
        layer(torch.randn(1, 3, 32), cache=layer.init_cache(1, 8))
    causal = build("gqa", d_model=32, n_heads=4)
    with pytest.raises(ConfigError, match=r"^cache=.*cross-attention keeps no cache"):
        causal(torch.randn(1, 3, 32), context=torch.randn(1, 4, 32), cache=causal.init_cache(1, 8))


def test_training_aux_losses_are_exposed():
    layer = build("moas", d_model=32, n_heads=4).train()
    layer(torch.randn(2, 6, 32))
    assert set(layer.aux_losses) == {"load_balance"}


@pytest.mark.parametrize("name", ["moas", "moas_top1", "moh", "moh_window_256"])
def test_padded_tokens_count_in_no_routing_loss_or_statistic(name):
    """A router's load-balance loss and statistics over a padded batch are those of its real
    tokens alone: the routers score each token by itself, so one unpadded row of the batch's
    real tokens is the reference, whatever the padding holds."""
    from attnlab.attention.base import AttentionContext

    layer = _layer(f"preset:{name}").train()
    x, mask = _padded_batch(T_real=36, left=3, right=2)
    x[~mask] = 100.0 * torch.randn(int((~mask).sum()), D_MODEL, dtype=torch.float64)
    real_only = x[mask].unsqueeze(0)
    contexts = []
    for inputs, padding in ((x, mask), (real_only, None)):
        ctx = AttentionContext(None, record_stats=True, training=True, key_padding_mask=padding)
        layer.attention(inputs, ctx)
        contexts.append(ctx)
    padded, reference = contexts
    torch.testing.assert_close(padded.aux_losses["load_balance"], reference.aux_losses["load_balance"])
    scalars = {key for key, value in reference.stats.items() if value.dim() == 0}
    assert len(scalars) >= 3
    for key in scalars:
        torch.testing.assert_close(padded.stats[key], reference.stats[key], msg=key)
