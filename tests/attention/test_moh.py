"""Mixture-of-Head attention against references written here: per-token, per-head loops with
explicit softmax attention and explicit two-stage head weights, and the ``gqa`` mechanism."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention import AttentionContext, _moh_decode, resolve_attention
from attnlab.attention import build as attention_build
from attnlab.attention import moh as moh_module
from attnlab.attention._moh_decode import contiguous_runs, plan_head_calls, strided_slices
from attnlab.attention.moh import MixtureOfHeadsAttention
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from attnlab.lit_module import LitLM
from attnlab.model import GPT
from tests.conftest import TINY_MODEL

C = TINY_MODEL["d_model"]


def build(routing: str = "router", model_overrides: dict | None = None, **options) -> MixtureOfHeadsAttention:
    model = ModelConfig(**{**TINY_MODEL, **(model_overrides or {})})
    attn = resolve_attention({"name": "moh", "routing": routing, **options}, model).build(model, 0)
    return attn.double().eval()


def sharpen_router(attn: MixtureOfHeadsAttention, std: float = 0.2) -> None:
    """Router logits of a few units, so that no softmax is close to uniform."""
    with torch.no_grad():
        attn.router.weight.normal_(0.0, std)


def router_blocks(attn: MixtureOfHeadsAttention):
    """``W_r, W_s, W_h`` (None where the mechanism has none), in the documented row layout."""
    E, n_s = attn.n_routed, attn.n_shared
    rows = attn.router.weight
    w_r = rows[:E] if E > 1 else None
    w_s = rows[E if E > 1 else 0:][:n_s] if n_s > 1 else None
    w_h = rows[-2:] if n_s > 0 else None
    return w_r, w_s, w_h


def explicit_softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def naive_head_weights(x, attn, dense: bool = False) -> torch.Tensor:
    """``(B, T, H)`` head weights ``g``, one token at a time, from the paper's equations (with the
    factors that give weight 1 per head under uniform routing); ``dense``: the router warm-up's,
    every routed head selected."""
    B, T, _ = x.shape
    H, n_s, E, k = attn.n_heads, attn.n_shared, attn.n_routed, attn.top_k
    g = torch.zeros(B, T, H, dtype=x.dtype)
    if attn.routing == "all":
        return g + 1.0
    if attn.routing == "static":
        g[..., :n_s + k] = 1.0
        return g
    w_r, w_s, w_h = router_blocks(attn)
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            scores = (w_r @ xt).tolist() if w_r is not None else [0.0]
            if dense:
                k = E
            chosen = sorted(range(E), key=lambda i: -scores[i])[:k]
            routed = explicit_softmax([scores[i] for i in chosen])
            if n_s == 0:
                a_shared, a_routed, factor = 0.0, 1.0, 1
            else:
                a_shared, a_routed = explicit_softmax((w_h @ xt).tolist())
                factor = 2
                shared = explicit_softmax((w_s @ xt).tolist()) if w_s is not None else [1.0]
                for i in range(n_s):
                    g[b, t, i] = factor * a_shared * n_s * shared[i]
            for j, i in enumerate(chosen):
                g[b, t, n_s + i] = factor * a_routed * k * routed[j]
    return g


def naive_heads(x, attn, rope=None) -> torch.Tensor:
    """``(B, T, H, D)``: each head's causal softmax attention, by loops over heads and positions,
    over keys ``t - window < s <= t`` with a window. Query head ``h`` reads KV head ``h // (H / H_kv)``."""
    B, T, _ = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv_proj.weight.split([H * D, H_kv * D, H_kv * D])
    q = (x @ w_q.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ w_k.T).view(B, T, H_kv, D).transpose(1, 2)
    v = (x @ w_v.T).view(B, T, H_kv, D).transpose(1, 2)
    if rope is not None:
        q, k = rope.rotate(q, 0), rope.rotate(k, 0)
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // H_kv)
            for t in range(T):
                first = 0 if attn.window is None else max(0, t - attn.window + 1)
                scores = torch.stack([q[b, h, t] @ k[b, kv, s] for s in range(first, t + 1)]) / math.sqrt(D)
                weights = torch.softmax(scores, dim=0)
                out[b, t, h] = (weights[:, None] * v[b, kv, first:t + 1]).sum(0)
    return out


def naive_moh(x, attn, rope=None, dense: bool = False) -> torch.Tensor:
    """``y_t = sum_i g_i(x_t) head_i(t) W_O^i``, ``W_O^i`` the columns of head ``i``."""
    heads, g = naive_heads(x, attn, rope), naive_head_weights(x, attn, dense)
    B, T, H, D = heads.shape
    w_o = attn.out_proj.weight
    y = torch.zeros(B, T, w_o.shape[0], dtype=x.dtype)
    for i in range(H):
        y += g[..., i:i + 1] * (heads[:, :, i] @ w_o[:, i * D:(i + 1) * D].T)
    return y


ROUTER_CONFIGS = [
    dict(),  # defaults: 8 heads on 4 KV heads, 2 shared + top 4 of 6 routed
    dict(n_kv_heads=2, n_shared_heads=0, top_k=3),
    dict(n_kv_heads=8, n_shared_heads=1, top_k=2),
    dict(n_kv_heads=1, n_shared_heads=3, top_k=5),  # every routed head selected
    dict(n_heads=4, n_kv_heads=2, n_shared_heads=3, top_k=1),  # a single routed head
]


# ----------------------------------------------------------------------------- head selection
@pytest.mark.parametrize("options", ROUTER_CONFIGS)
def test_shared_heads_always_active_and_exactly_top_k_routed(options):
    attn = build(**options)
    if attn.router is not None:
        sharpen_router(attn)
    x = torch.randn(3, 20, C, dtype=torch.float64)
    ctx = AttentionContext(None, record_stats=True)
    gates, selected = attn.route(x, ctx)
    active = ctx.stats["head_active"]
    assert active.shape == (3, 20, attn.n_routed)
    torch.testing.assert_close(active.sum(-1), torch.full((3, 20), float(attn.top_k), dtype=active.dtype))
    assert (gates[..., :attn.n_shared] > 0).all()
    assert torch.equal(gates[..., attn.n_shared:] > 0, active.bool())
    for j in range(attn.n_routed):
        torch.testing.assert_close(ctx.stats[f"head_frequency/{j}"], active[..., j].mean())
    torch.testing.assert_close(ctx.stats["shared_weight"] + ctx.stats["routed_weight"],
                               torch.ones((), dtype=torch.float64))


def test_routing_statistics_match_the_router():
    attn = build()
    sharpen_router(attn)
    x = torch.randn(2, 12, C, dtype=torch.float64)
    ctx = AttentionContext(None, record_stats=True)
    attn(x, ctx)
    w_r, _, w_h = router_blocks(attn)
    p = torch.softmax(x @ w_r.T, dim=-1)
    torch.testing.assert_close(ctx.stats["routing_entropy"], -(p * p.log()).sum(-1).mean())
    a = torch.softmax(x @ w_h.T, dim=-1)
    torch.testing.assert_close(ctx.stats["shared_weight"], a[..., 0].mean())
    torch.testing.assert_close(ctx.stats["routed_weight"], a[..., 1].mean())
    # the model scopes them per layer, only when asked
    model = GPT.from_config(TINY_MODEL, "moh").eval()
    idx = torch.randint(0, 97, (2, 10))
    assert model(idx).stats is None
    stats = model(idx, record_stats=True).stats
    assert stats["layer1/head_active"].shape == (2, 10, 6)
    assert {f"layer0/head_frequency/{j}" for j in range(6)} <= set(stats)


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("options", ROUTER_CONFIGS)
@pytest.mark.parametrize("use_rope", [False, True])
def test_router_matches_naive_reference(options, use_rope):
    attn = build(**options)
    if attn.router is not None:
        sharpen_router(attn)
    x = torch.randn(2, 9, C, dtype=torch.float64)
    rope = RotaryEmbedding() if use_rope else None
    got = attn(x, AttentionContext(rope))
    torch.testing.assert_close(got, naive_moh(x, attn, rope), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("routing", ["static", "all"])
def test_static_and_all_match_naive_reference(routing):
    attn = build(routing, n_shared_heads=1, top_k=2)  # static: heads 0..2, a partially active group
    x = torch.randn(2, 9, C, dtype=torch.float64)
    rope = RotaryEmbedding()
    got = attn(x, AttentionContext(rope))
    torch.testing.assert_close(got, naive_moh(x, attn, rope), atol=1e-10, rtol=1e-9)


def test_all_heads_is_gqa_with_the_same_weights():
    attn = build("all")
    gqa_model = ModelConfig(**{**TINY_MODEL, "n_heads": 8})
    gqa = resolve_attention({"name": "gqa", "n_kv_heads": 4}, gqa_model).build(gqa_model, 0).double().eval()
    gqa.load_state_dict(attn.state_dict())
    x = torch.randn(2, 13, C, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    torch.testing.assert_close(attn(x, ctx), gqa(x, ctx), atol=1e-12, rtol=1e-10)
    # and through a cache, one token at a time
    cache, ref_cache = attn.init_cache(2, 13, None, torch.float64), gqa.init_cache(2, 13, None, torch.float64)
    for t in range(13):
        step = AttentionContext(RotaryEmbedding(), start_pos=t)
        torch.testing.assert_close(attn(x[:, t:t + 1], step, cache), gqa(x[:, t:t + 1], step, ref_cache),
                                   atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("routing", ["static", "all"])
def test_static_and_all_have_no_router_and_no_aux_loss(routing):
    attn = build(routing).train()
    D, H, H_kv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    assert attn.router is None
    assert sum(p.numel() for p in attn.parameters()) == C * H * D + 2 * C * H_kv * D + H * D * C
    ctx = AttentionContext(None, training=True)
    attn(torch.randn(2, 8, C, dtype=torch.float64), ctx)
    assert not ctx.aux_losses


def test_router_parameters_are_one_row_per_router_output():
    """``[W_r; W_s; W_h]``: 6 + 2 + 2 rows with the defaults."""
    attn = build()
    assert attn.router.weight.shape == (attn.n_heads + 2, C)


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("routing", ["router", "static", "all"])
@pytest.mark.parametrize("batch_size,skip_heads_from", [(1, 0), (1, 16384), (3, 0)])
@pytest.mark.parametrize("window", [None, 4])
def test_cached_decoding_equals_full_forward(routing, batch_size, skip_heads_from, window):
    """One sequence computes only its active heads from ``skip_heads_from`` cached tokens on;
    below, and for a batch, the KV groups its tokens need. With a window of 4 the rolling buffer
    wraps and holds the window's tokens only. The static step too."""
    attn = build(routing, skip_heads_from=skip_heads_from, window=window)
    if attn.router is not None:
        sharpen_router(attn)
    x = torch.randn(batch_size, 16, C, dtype=torch.float64)
    rope = RotaryEmbedding()
    full = attn(x, AttentionContext(rope))
    cache = attn.init_cache(batch_size, 16, None, torch.float64)
    parts, start = [], 0
    for length in (5, 3) + (1,) * 8:  # prefill, a chunk, then one token at a time
        parts.append(attn(x[:, start:start + length], AttentionContext(rope, start_pos=start), cache))
        start += length
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-12, rtol=1e-10)
    held = 16 if window is None else window
    assert cache.nbytes() == attn.cache_bytes(batch_size, 16, torch.float64) == 2 * batch_size * 4 * 8 * held * 8
    static_cache = attn.init_cache(batch_size, 16, None, torch.float64)
    steps = [attn.decode_step(x[:, t:t + 1], AttentionContext(rope, start_pos=torch.tensor(t)), static_cache)
             for t in range(16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-10)


def spy_on_groups(attn, monkeypatch) -> set[int]:
    """The KV groups whose attention is computed from now on."""
    computed: set[int] = set()
    original = attn.attend_groups

    def spy(q, k, v, ctx, n_prefix, first, end):
        computed.update(range(first, end))
        return original(q, k, v, ctx, n_prefix, first, end)

    monkeypatch.setattr(attn, "attend_groups", spy)
    return computed


def route_by_first_channel(attn, x_last, routed_logits_per_row):
    """Make the routed scores of the last token of row ``b`` equal ``routed_logits_per_row[b]``:
    ``W_r`` reads only channel ``b + 1``, which is one-hot for that token."""
    B = len(routed_logits_per_row)
    with torch.no_grad():
        w_r = attn.router.weight[:attn.n_routed]
        w_r.zero_()
        for b, logits in enumerate(routed_logits_per_row):
            w_r[:, b + 1] = torch.tensor(logits, dtype=w_r.dtype)
            x_last[b, 1:B + 1] = 0.0
            x_last[b, b + 1] = 1.0


@pytest.mark.parametrize("routed_logits,expected_groups", [
    # heads 6, 7 (group 3) inactive in both rows: skipped
    ([[1.0, 2.0, 3.0, 4.0, -5.0, -5.0], [4.0, 3.0, 2.0, 1.0, -5.0, -6.0]], {0, 1, 2}),
    # row 0 leaves group 1 out, row 1 group 3: each group is needed by one row
    ([[-5.0, -5.0, 1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, -5.0, -5.0]], {0, 1, 2, 3}),
])
def test_batch_decoding_skips_a_kv_group_only_when_its_whole_query_group_is_inactive(routed_logits,
                                                                                   expected_groups, monkeypatch):
    attn = build()
    B = len(routed_logits)
    x = torch.randn(B, 11, C, dtype=torch.float64)
    route_by_first_channel(attn, x[:, -1], routed_logits)
    rope = RotaryEmbedding()
    full = attn(x, AttentionContext(rope))
    cache = attn.init_cache(B, 11, None, torch.float64)
    attn(x[:, :10], AttentionContext(rope), cache)
    computed = spy_on_groups(attn, monkeypatch)
    last = attn(x[:, 10:], AttentionContext(rope, start_pos=10), cache)
    assert computed == expected_groups
    torch.testing.assert_close(last, full[:, 10:], atol=1e-12, rtol=1e-10)


def spy_on_kernel_calls(cache, monkeypatch) -> list[tuple[int, list[int]]]:
    """``(query heads, KV groups read)`` of each attention call MoH makes from now on; the groups
    are found from where the K view starts in the cache and its stride between heads."""
    calls: list[tuple[int, list[int]]] = []
    head_stride = cache.k.stride(1)

    def spy_on(module, name):
        original = getattr(module, name)

        def spy(q, k, v, *args, **kwargs):
            first = (k.data_ptr() - cache.k.data_ptr()) // (k.element_size() * head_stride)
            step = k.stride(1) // head_stride
            calls.append((q.shape[1], [first + i * step for i in range(k.shape[1])]))
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    spy_on(moh_module, "sdpa_in_context")  # the KV-group path
    spy_on(_moh_decode, "sdpa")  # the active-head path
    return calls


def active_heads(attn, x) -> list[int]:
    """The query heads the single-sequence path computes for the token ``x`` ``(1, 1, C)``."""
    return attn.head_gates(x, AttentionContext(None))[1].view(-1).nonzero().flatten().tolist()


def decode_eleventh_token(attn, routed_logits, monkeypatch):
    """Prefill 10 tokens of one sequence, then decode an 11th whose routed scores are
    ``routed_logits``, spying on the kernel calls; the decoded output must equal the full forward.
    Returns the calls and the input ``(1, 11, C)``."""
    x = torch.randn(1, 11, C, dtype=torch.float64)
    route_by_first_channel(attn, x[:, -1], [routed_logits])
    rope = RotaryEmbedding()
    full = attn(x, AttentionContext(rope))
    cache = attn.init_cache(1, 11, None, torch.float64)
    attn(x[:, :10], AttentionContext(rope), cache)
    calls = spy_on_kernel_calls(cache, monkeypatch)
    last = attn(x[:, 10:], AttentionContext(rope, start_pos=10), cache)
    torch.testing.assert_close(last, full[:, 10:], atol=1e-12, rtol=1e-10)
    return calls, x


@pytest.mark.parametrize("routed_logits,expected_heads", [
    # routed heads 0, 1 (heads 2, 3 = group 1) inactive: group 1 is not read
    ([-5.0, -5.0, 1.0, 2.0, 3.0, 4.0], [0, 1, 4, 5, 6, 7]),
    # heads 2 and 4 inactive: groups 1 and 2 are read for their other head only
    ([-5.0, 1.0, -5.0, 2.0, 3.0, 4.0], [0, 1, 3, 5, 6, 7]),
    # heads 3 and 7 inactive
    ([2.0, -5.0, 1.0, 3.0, 4.0, -5.0], [0, 1, 2, 4, 5, 6]),
    # heads 6, 7 inactive: groups 0..2 fully active
    ([1.0, 2.0, 3.0, 4.0, -5.0, -6.0], [0, 1, 2, 3, 4, 5]),
])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_single_sequence_decoding_computes_exactly_the_active_heads(routed_logits, expected_heads, threads,
                                                                    monkeypatch):
    """Every active query head is computed once, no inactive one is, and each KV group with an
    active head is read by exactly one call (whatever the thread count the calls are planned for)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    attn = build(skip_heads_from=0)
    calls, x = decode_eleventh_token(attn, routed_logits, monkeypatch)
    assert sum(n_heads for n_heads, _ in calls) == len(expected_heads)
    groups_read = [g for _, groups in calls for g in groups]
    assert sorted(groups_read) == sorted({h // attn.group_size for h in expected_heads})
    assert active_heads(attn, x[:, 10:]) == expected_heads


@pytest.mark.parametrize("skip_heads_from,computed_heads", [(11, 6), (12, 8)])
def test_heads_are_skipped_from_the_configured_cache_length(skip_heads_from, computed_heads, monkeypatch):
    """The last token sees 11 cached positions; heads 2 and 4 (groups 1, 2) are inactive, so the
    group path computes all 8 query heads and the head path 6."""
    calls, _ = decode_eleventh_token(build(skip_heads_from=skip_heads_from), [-5.0, 1.0, -5.0, 2.0, 3.0, 4.0],
                                     monkeypatch)
    assert sum(n_heads for n_heads, _ in calls) == computed_heads


def test_decode_plan():
    """Groups batched by active heads per group, as slices where possible; with 2 threads a third
    group of 2 active heads runs in a call of its own."""

    def plan(heads, threads):
        return [(groups, select if isinstance(select, slice) else select.tolist())
                for groups, select in plan_head_calls(tuple(heads), 2, threads, torch.device("cpu"))]

    assert plan([0, 1, 2, 3, 4, 5], 2) == [(slice(0, 2, 1), slice(0, 4, 1)), (slice(2, 3, 1), slice(4, 6, 1))]
    assert plan([0, 1, 2, 3, 4, 5], 1) == [(slice(0, 3, 1), slice(0, 6, 1))]
    # groups 1, 2 have one active head (3 and 5), groups 0 and 3 two
    assert plan([0, 1, 3, 5, 6, 7], 2) == [(slice(1, 3, 1), slice(3, 6, 2)), (slice(0, 4, 3), [0, 1, 6, 7])]
    # groups 0, 1, 3: not evenly spaced, two runs
    assert plan([0, 1, 2, 3, 6, 7], 2) == [(slice(0, 2, 1), slice(0, 4, 1)), (slice(3, 4, 1), slice(6, 8, 1))]


@pytest.mark.parametrize("indices,expected", [
    ([2], [slice(2, 3, 1)]),
    ([0, 1, 2], [slice(0, 3, 1)]),
    ([1, 3], [slice(1, 4, 2)]),
    ([0, 3, 6], [slice(0, 7, 3)]),
    ([0, 1, 3], [slice(0, 2, 1), slice(3, 4, 1)]),
    ([0, 2, 3, 7], [slice(0, 1, 1), slice(2, 4, 1), slice(7, 8, 1)]),
])
def test_strided_slices_select_exactly_the_indices(indices, expected):
    slices = strided_slices(indices)
    assert slices == expected
    assert [i for part in slices for i in range(part.start, part.stop, part.step)] == indices


@pytest.mark.parametrize("options", ROUTER_CONFIGS + [dict(routing="static"), dict(routing="all")])
def test_active_heads_are_the_weighted_ones_in_any_call(options):
    """The heads a call computes are exactly those with a weight, ``n_shared + top_k`` per token
    (every head with ``all``), and one token routed alone (decoding) gets the weights and heads it
    gets inside a batch."""
    attn = build(**options)
    if attn.router is not None:
        sharpen_router(attn)
    x = torch.randn(2, 7, C, dtype=torch.float64)
    gates, active = attn.head_gates(x, AttentionContext(None))
    weights = torch.ones(2, 7, attn.n_heads, dtype=torch.float64) if gates is None else gates.expand(2, 7, -1)
    assert torch.equal(active, weights > 0)
    n_active = attn.n_heads if attn.routing == "all" else attn.n_shared + attn.top_k
    assert active.sum(-1).eq(n_active).all()
    for b, t in [(0, 0), (1, 3), (1, 6)]:
        one_gates, one_active = attn.head_gates(x[b:b + 1, t:t + 1], AttentionContext(None))
        if gates is not None:
            torch.testing.assert_close(one_gates.expand(1, 1, -1)[0, 0], weights[b, t], atol=1e-12, rtol=1e-10)
        assert torch.equal(one_active[0, 0], active[b, t])


def test_static_never_computes_the_pruned_group_and_training_computes_all(monkeypatch):
    x = torch.randn(2, 8, C, dtype=torch.float64)
    static = build("static")  # heads 0..5 active: group 3 (heads 6, 7) never needed
    computed = spy_on_groups(static, monkeypatch)
    static.train()(x, AttentionContext(None, training=True))
    assert computed == {0, 1, 2}
    router = build().train()
    route_by_first_channel(router, x[:, -1], [[-5.0, -5.0, 1.0, 2.0, 3.0, 4.0]] * 2)
    computed = spy_on_groups(router, monkeypatch)
    router(x[:, -1:], AttentionContext(None, training=True))
    assert computed == {0, 1, 2, 3}  # no device sync in training: every group, inactive heads weighted 0


def test_contiguous_runs():
    assert contiguous_runs([True, True, False, True]) == [(0, 2), (3, 4)]
    assert contiguous_runs([False, False]) == []
    assert contiguous_runs([True] * 4) == [(0, 4)]


# ----------------------------------------------------------------------------- load balance
def load_balance(attn, x) -> torch.Tensor:
    ctx = AttentionContext(None, training=True)
    attn.route(x, ctx)
    return ctx.aux_losses["load_balance"] / attn.load_balance_weight


def test_load_balance_is_minimal_for_uniform_routing_and_larger_when_collapsed():
    attn = build(load_balance_weight=0.5)
    x = torch.randn(4, 32, C, dtype=torch.float64)
    E, k = attn.n_routed, attn.top_k
    with torch.no_grad():
        attn.router.weight[:E].zero_()  # uniform routing probabilities
    uniform = load_balance(attn, x)
    torch.testing.assert_close(uniform, torch.ones((), dtype=torch.float64))
    x[..., 0] = 1.0
    with torch.no_grad():  # every token puts its probability on routed heads 0..3
        attn.router.weight[:E, 0] = torch.tensor([20.0, 20.0, 20.0, 20.0, -20.0, -20.0])
    collapsed = load_balance(attn, x)
    torch.testing.assert_close(collapsed, torch.tensor(E / k, dtype=torch.float64))
    assert collapsed > uniform
    # a random router: E/k * sum_i f_i P_i from the selection and probabilities computed here
    sharpen_router(attn)
    w_r = attn.router.weight[:E]
    p = torch.softmax(x @ w_r.T, dim=-1).reshape(-1, E)
    f = torch.zeros(E, dtype=torch.float64)
    for row in p:
        for i in sorted(range(E), key=lambda i: -row[i])[:k]:
            f[i] += 1.0 / len(p)
    torch.testing.assert_close(load_balance(attn, x), E / k * (f * p.mean(0)).sum())


def test_load_balance_only_in_training_and_only_with_a_weight():
    x = torch.randn(2, 8, C, dtype=torch.float64)
    ctx = AttentionContext(None)
    build()(x, ctx)
    assert not ctx.aux_losses
    ctx = AttentionContext(None, training=True)
    build(load_balance_weight=0.0).train()(x, ctx)
    assert not ctx.aux_losses


def test_aux_loss_reaches_the_total_loss_and_every_router_gets_gradients():
    module = LitLM(TINY_MODEL, "moh", {})
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module._trainer = type("T", (), {"log_every_n_steps": 1, "global_step": 0})()  # noqa: SLF001
    idx = torch.randint(0, 97, (2, 24))
    targets = idx.roll(-1, 1)
    total = module.training_step((idx, targets), 0)
    out = module.model(idx, targets)
    aux = out.aux_losses["load_balance"]
    assert aux.item() > 0
    torch.testing.assert_close(total, out.loss + aux)
    # the load-balance loss alone trains W_r (of the last layer: an earlier layer's W_s, W_h
    # change the input of later routers); the whole loss trains W_r, W_s and W_h
    attn = module.model.blocks[-1].attn
    E, n_s = attn.n_routed, attn.n_shared
    (grad_aux,) = torch.autograd.grad(aux, attn.router.weight, retain_graph=True)
    assert grad_aux[:E].abs().sum() > 0 and grad_aux[E:].abs().sum() == 0
    total.backward()
    grad = attn.router.weight.grad
    for block in (grad[:E], grad[E:E + n_s], grad[E + n_s:]):
        assert block.abs().sum() > 0


# ----------------------------------------------------------------------------- training options
def test_router_warm_up_activates_every_head_with_dense_weights_then_routes_top_k():
    attn = build(router_warmup_steps=3).train()
    sharpen_router(attn)
    x = torch.randn(2, 9, C, dtype=torch.float64)
    rope = RotaryEmbedding()
    losses = {}
    for step, dense in [(0, True), (2, True), (3, False), (10, False)]:
        ctx = AttentionContext(rope, record_stats=True, training=True, step=step)
        got = attn(x, ctx)
        torch.testing.assert_close(got, naive_moh(x, attn, rope, dense=dense), atol=1e-10, rtol=1e-9)
        frequencies = torch.stack([ctx.stats[f"head_frequency/{j}"] for j in range(attn.n_routed)])
        if dense:  # the switch shows in the statistics
            assert frequencies.eq(1.0).all() and ctx.stats["dense_routing"] == 1.0
        else:
            torch.testing.assert_close(frequencies.sum(), torch.tensor(float(attn.top_k)))
            assert ctx.stats["dense_routing"] == 0.0
        losses[step] = ctx.aux_losses["load_balance"]
    # the load-balance loss balances the top-k choice the router makes, warm-up or not
    torch.testing.assert_close(losses[0], losses[3], atol=0, rtol=0)
    # evaluation (and decoding) route top-k from the first step; so does training without a step
    torch.testing.assert_close(attn.eval()(x, AttentionContext(rope, step=0)), naive_moh(x, attn, rope),
                               atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(attn.train()(x, AttentionContext(rope, training=True)), naive_moh(x, attn, rope),
                               atol=1e-10, rtol=1e-9)


def test_router_warm_up_switch_is_in_the_model_statistics():
    model = GPT.from_config(TINY_MODEL, {"name": "moh", "router_warmup_steps": 2}).train()
    idx = torch.randint(0, 97, (2, 10))
    for step, dense in [(1, 1.0), (2, 0.0)]:
        stats = model(idx, record_stats=True, step=step).stats
        assert stats["layer0/dense_routing"] == dense
        assert (stats["layer1/head_active"].mean() == 1.0) == bool(dense)


def test_straight_through_gates_keep_the_forward_and_take_the_dense_softmax_gradient():
    torch.manual_seed(0)
    E, k = 6, 4
    logits = torch.randn(3, 5, E, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(3, 5, E, dtype=torch.float64)
    plain, selected = moh_module.top_k_gates(logits, k)
    straight, st_selected = moh_module.top_k_gates(logits, k, straight_through=True)
    assert torch.equal(straight, plain) and torch.equal(st_selected, selected)
    (grad,) = torch.autograd.grad(straight, logits, cotangent)
    # closed form of the dense weights' vector-Jacobian product: d(E p)/dz^T c = E p (c - <p, c>)
    p = torch.softmax(logits.detach(), dim=-1)
    torch.testing.assert_close(grad, E * p * (cotangent - (p * cotangent).sum(-1, keepdim=True)),
                               atol=1e-13, rtol=1e-12)
    (plain_grad,) = torch.autograd.grad(plain, logits, cotangent)
    assert plain_grad[~selected].abs().max() == 0 and grad[~selected].abs().min() > 0


def test_straight_through_layer_has_the_same_output_and_trains_unselected_heads_logits():
    x = torch.randn(2, 9, C, dtype=torch.float64)
    outputs, grads = {}, {}
    for straight_through in (False, True):
        torch.manual_seed(0)
        attn = build(straight_through=straight_through).train()
        sharpen_router(attn)
        outputs[straight_through] = attn(x, AttentionContext(None, training=True))
        (grads[straight_through],) = torch.autograd.grad(outputs[straight_through].square().sum(), attn.router.weight)
    assert torch.equal(outputs[True], outputs[False])
    E = attn.n_routed
    assert not torch.allclose(grads[True][:E], grads[False][:E])
    torch.testing.assert_close(grads[True][E:], grads[False][E:], atol=1e-12, rtol=1e-10)  # W_s, W_h as before


def test_router_lr_multiplier_is_a_parameter_group_hint_only_with_a_router():
    attn = build(router_lr_multiplier=3.0)
    (hint,) = attn.parameter_group_hints()
    assert hint.name == "router" and hint.lr_multiplier == 3.0 and hint.params == (attn.router.weight,)
    assert build("all", router_lr_multiplier=3.0).parameter_group_hints() == []


# ----------------------------------------------------------------------------- window
@pytest.mark.parametrize("routing", ["router", "static", "all"])
@pytest.mark.parametrize("window", [1, 4, 7, 40])
def test_windowed_heads_match_naive_reference(routing, window):
    """T=21 over windows of 1, 4 and 7 (the sliding mechanism's blocked band) and 40 (causal)."""
    attn = build(routing, window=window)
    if attn.router is not None:
        sharpen_router(attn)
    x = torch.randn(2, 21, C, dtype=torch.float64)
    rope = RotaryEmbedding()
    torch.testing.assert_close(attn(x, AttentionContext(rope)), naive_moh(x, attn, rope), atol=1e-10, rtol=1e-9)


def test_all_heads_with_a_window_is_sliding_with_the_same_weights():
    attn = build("all", window=5)
    model = ModelConfig(**{**TINY_MODEL, "n_heads": 8})
    sliding = resolve_attention({"name": "sliding", "n_kv_heads": 4, "window": 5}, model).build(model, 0).double().eval()
    sliding.load_state_dict(attn.state_dict())
    x = torch.randn(2, 19, C, dtype=torch.float64)
    ctx = AttentionContext(RotaryEmbedding())
    torch.testing.assert_close(attn(x, ctx), sliding(x, ctx), atol=1e-12, rtol=1e-10)


def windowed_layer(causal: bool = True, rope: bool = True):
    torch.manual_seed(0)
    spec = {"name": "moh", "window": 5, "n_kv_heads": 2, "n_shared_heads": 1, "top_k": 2}
    return attention_build(spec, d_model=32, n_heads=4, causal=causal, rope=rope).double().eval()


@pytest.mark.parametrize("causal", [True, False])
def test_windowed_heads_under_key_padding_give_each_row_its_unpadded_output(causal):
    """Window 5 over 40 tokens (the band, not plain attention): a padded row's real tokens equal
    the row alone, without a cache and (causal) through the rolling cache, where a single token's
    keys come in slot order."""
    layer = windowed_layer(causal)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        alone = layer(x[0:1, 3:])
        torch.testing.assert_close(layer(x, key_padding_mask=mask)[0:1, 3:], alone, atol=1e-7, rtol=1e-5)
        if causal:
            cache = layer.init_cache(2, 40)
            # single tokens from position 5 on, while padded positions are still inside the window
            parts = [layer(x[:, :2], key_padding_mask=mask[:, :2], cache=cache),
                     layer(x[:, 2:5], key_padding_mask=mask[:, :5], cache=cache)]
            parts += [layer(x[:, t:t + 1], key_padding_mask=mask[:, :t + 1], cache=cache) for t in range(5, 40)]
            torch.testing.assert_close(torch.cat(parts, dim=1)[0:1, 3:], alone, atol=1e-7, rtol=1e-5)


def test_windowed_heads_are_a_two_sided_band_bidirectional_and_refuse_cross_attention():
    layer, causal = windowed_layer(causal=False, rope=False), windowed_layer(rope=False)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(layer(x.flip(1)), y.flip(1), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(y[:, -1], causal(x)[:, -1], atol=1e-10, rtol=1e-9)
    assert "relates a sequence to itself" in layer.attention.structure_issue("cross_attention")
    assert build(window=None).structure_issue("cross_attention") is None
    with pytest.raises(ConfigError, match=r"^context="):
        causal(x, context=x[:, :7])


def test_window_presets_are_moh_with_a_256_token_window():
    model = ModelConfig(**TINY_MODEL)
    routed = resolve_attention("moh_window_256", model).build(model, 0)
    every = resolve_attention("moh_all_window_256", model).build(model, 0)
    assert (routed.routing, routed.window, every.routing, every.window) == ("router", 256, "all", 256)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("options,message", [
    (dict(n_heads=6), r"attention\.n_heads=6: must divide model\.d_model"),
    (dict(n_heads=64, n_kv_heads=8), r"attention\.n_heads=64: RoPE needs an even head dimension"),
    (dict(n_kv_heads=3),
     r"attention\.n_kv_heads=3: must divide attention\.n_heads; allowed: divisors of attention\.n_heads=8: \[1, 2, 4, 8\]"),
    (dict(n_kv_heads=0), r"attention\.n_kv_heads=0: must divide attention\.n_heads"),
    (dict(n_shared_heads=8), r"attention\.n_shared_heads=8: at least one head must be routed"),
    (dict(n_shared_heads=-1), r"attention\.n_shared_heads=-1:"),
    (dict(top_k=0), r"attention\.top_k=0; allowed: an integer in \[1, n_heads - n_shared_heads = 6\]"),
    (dict(top_k=7), r"attention\.top_k=7; allowed: an integer in \[1, n_heads - n_shared_heads = 6\]"),
    (dict(routing="dense"), r"attention\.routing='dense'; allowed: router \| static \| all"),
    (dict(load_balance_weight=-0.1), r"attention\.load_balance_weight=-0\.1; allowed: a number >= 0"),
    (dict(skip_heads_from=-1), r"attention\.skip_heads_from=-1; allowed: a number of cached tokens >= 0"),
    (dict(router_warmup_steps=-1), r"attention\.router_warmup_steps=-1; allowed: an integer >= 0"),
    (dict(router_lr_multiplier=0.0), r"attention\.router_lr_multiplier=0\.0; allowed: a number > 0"),
    (dict(straight_through="yes"), r"attention\.straight_through='yes'; allowed: true \| false"),
    (dict(window=0), r"attention\.window=0; allowed: an integer >= 1, or null for the whole causal context"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        build(**options)


def test_odd_head_dim_is_fine_without_rope():
    attn = build(model_overrides={"pos_encoding": "learned"}, n_heads=64, n_kv_heads=8, top_k=4)
    assert attn.head_dim == 1
