"""Mixture of Attention Schemes against references assembled here from stand-alone branches.

References: the branch modules run on their own (and, independently, MHA/GQA/MQA built through the
registry with the mixture's weights loaded), averaged or weighted by gates computed in the test;
for top-k routing, each row's routed tokens compacted by hand and run through the branch alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention import AttentionContext, registered_names, resolve_attention
from attnlab.attention.moas import RoutedMixtureCache
from attnlab.config import ConfigError, ModelConfig
from attnlab.layers import RotaryEmbedding
from attnlab.model import GPT
from tests.conftest import TINY_MODEL

BRANCH_SPECS = ["mha", {"name": "gqa", "n_kv_heads": 2}, "mqa"]


def build(name: str = "moas", **options):
    model = ModelConfig(**TINY_MODEL)
    attn = resolve_attention({"name": name, **options}, model).build(model, 0)
    if name == "moas":
        attn.reset_mechanism_parameters()
    return model, attn.double().eval()


def decisive_router(attn) -> None:
    """Large random router weights (logits of std ~2 for unit-scale inputs): gates far from
    uniform, routing that varies by token, no near-ties between the largest gates."""
    with torch.no_grad():
        attn.router[0].weight.normal_(0.0, 0.2)
        attn.router[-1].weight.normal_(0.0, 0.5)
        # centre each logit over unit-scale inputs, so no scheme wins every token
        sample = torch.randn(4096, attn.d_model, dtype=attn.router[0].weight.dtype)
        attn.router[-1].bias.sub_(attn.router(sample).mean(dim=0))


def force_branch(attn, index: int) -> None:
    """Router whose logits are +1e4 for branch ``index`` and -1e4 for the others: gates exactly one-hot."""
    with torch.no_grad():
        attn.router[-1].weight.zero_()
        attn.router[-1].bias.fill_(-1e4)
        attn.router[-1].bias[index] = 1e4


def router_probs(attn, x):
    """Softmax of the router logits, computed layer by layer here."""
    w1, w2 = attn.router[0], attn.router[-1]
    return torch.softmax(w2(torch.nn.functional.gelu(w1(x))), dim=-1)


def x_and_ctx(B=2, T=12, training=False):
    return torch.randn(B, T, 64, dtype=torch.float64), AttentionContext(RotaryEmbedding(), training=training)


# ----------------------------------------------------------------------------- gates
@pytest.mark.parametrize("top_k", [None, 1, 2, 3])
def test_gates_sum_to_one_and_unchosen_are_zero(top_k):
    _, attn = build(top_k=top_k)
    decisive_router(attn)
    x, _ = x_and_ctx(3, 20)
    probs, gates, chosen = attn.route(x)
    k = top_k or 3
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 20, dtype=probs.dtype))
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 20, dtype=gates.dtype))
    assert (chosen.sum(-1) == k).all()
    assert (gates[~chosen] == 0).all()
    assert (gates[chosen] > 0).all()
    # the chosen branches are those with the k largest probabilities, renormalised
    top = probs.topk(k, dim=-1)
    torch.testing.assert_close(gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))


def test_initial_gates_are_near_uniform():
    _, attn = build()
    x, _ = x_and_ctx(2, 16)
    probs, _, _ = attn.route(x)
    assert (probs - 1 / 3).abs().max() < 1e-2


# ----------------------------------------------------------------------------- static mixture
def test_static_moas_is_the_mean_of_its_branches():
    model, attn = build("static_moas")
    assert attn.branch_names == ["mha", "gqa", "mqa"]
    assert [b.n_kv_heads for b in attn.branches] == [4, 2, 1]
    x, ctx = x_and_ctx()
    got = attn(x, ctx)
    # the branch modules themselves
    mean_of_branches = sum(branch(x, ctx) for branch in attn.branches) / 3
    torch.testing.assert_close(got, mean_of_branches, atol=1e-12, rtol=1e-10)
    # stand-alone mechanisms built through the registry, with the branches' weights loaded
    outputs = []
    for spec, branch in zip(BRANCH_SPECS, attn.branches):
        alone = resolve_attention(spec, model).build(model, 0).double().eval()
        alone.load_state_dict(branch.state_dict())
        outputs.append(alone(x, AttentionContext(RotaryEmbedding())))
    torch.testing.assert_close(got, sum(outputs) / 3, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- routed mixture
@pytest.mark.parametrize("top_k", [None, 1])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_router_equals_that_branch_alone(index, top_k):
    model, attn = build(top_k=top_k)
    force_branch(attn, index)
    x, ctx = x_and_ctx()
    alone = resolve_attention(BRANCH_SPECS[index], model).build(model, 0).double().eval()
    alone.load_state_dict(attn.branches[index].state_dict())
    torch.testing.assert_close(attn(x, ctx), alone(x, AttentionContext(RotaryEmbedding())), atol=1e-12, rtol=1e-10)


def test_dense_moas_is_the_gate_weighted_sum_of_branches():
    _, attn = build()
    decisive_router(attn)
    x, ctx = x_and_ctx()
    g = router_probs(attn, x)
    want = sum(g[..., i:i + 1] * branch(x, ctx) for i, branch in enumerate(attn.branches))
    torch.testing.assert_close(attn(x, ctx), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_runs_each_branch_on_its_routed_subsequence(top_k):
    """Token t's output: sum over its k chosen branches of the renormalised gate times the branch's
    output at t's index in the row's subsequence of tokens routed to that branch."""
    _, attn = build(top_k=top_k)
    decisive_router(attn)
    B, T = 3, 20
    x, ctx = x_and_ctx(B, T)
    probs = router_probs(attn, x)
    top = probs.topk(top_k, dim=-1)
    want = torch.zeros_like(x)
    for b in range(B):
        for i, branch in enumerate(attn.branches):
            routed = (top.indices[b] == i).any(-1)
            positions = routed.nonzero().squeeze(1).tolist()
            assert 0 < len(positions) < T, "the test needs every branch to get some, not all, tokens"
            out = branch(x[b:b + 1, positions], AttentionContext(RotaryEmbedding()))[0]
            for j, t in enumerate(positions):
                gate = probs[b, t, i] / top.values[b, t].sum()
                want[b, t] += gate * out[j]
    torch.testing.assert_close(attn(x, ctx), want, atol=1e-12, rtol=1e-10)


def test_top_k_router_learns_through_renormalised_gates():
    """With k=2 the task output's gradient reaches every router parameter (no straight-through)."""
    _, attn = build(top_k=2)
    decisive_router(attn)
    x, ctx = x_and_ctx()
    grads = torch.autograd.grad(attn(x, ctx).pow(2).sum(), list(attn.router.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_top_1_router_gets_the_task_gradient_straight_through():
    """With k=1 the forward gate is exactly 1, yet (with no load-balance loss) the task loss's
    gradient reaches every router parameter."""
    _, attn = build(top_k=1, load_balance_weight=0.0)
    decisive_router(attn)
    x, ctx = x_and_ctx()
    probs, gates, chosen = attn.route(x)
    assert torch.equal(gates.detach(), chosen.to(gates.dtype))
    grads = torch.autograd.grad(attn(x, ctx).pow(2).sum(), list(attn.router.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- load balance
@pytest.mark.parametrize("top_k", [None, 1])
def test_load_balance_loss_is_weighted_mse_of_mean_gate(top_k):
    _, attn = build(top_k=top_k, load_balance_weight=0.3)
    decisive_router(attn)
    x, ctx = x_and_ctx(training=True)
    attn(x, ctx)
    mean_gate = router_probs(attn, x).mean(dim=(0, 1))
    want = 0.3 * ((mean_gate - 1 / 3) ** 2).mean()
    torch.testing.assert_close(ctx.aux_losses["load_balance"].double(), want, atol=1e-9, rtol=1e-6)


def test_load_balance_loss_is_zero_for_uniform_gates_and_largest_when_collapsed():
    _, attn = build(load_balance_weight=0.5)
    x, _ = x_and_ctx(training=True)
    with torch.no_grad():
        attn.router[-1].weight.zero_()  # every token's gates exactly 1/3
    ctx = AttentionContext(RotaryEmbedding(), training=True)
    attn(x, ctx)
    assert ctx.aux_losses["load_balance"].item() == pytest.approx(0.0, abs=1e-12)
    force_branch(attn, 1)  # every token to branch 1: mean gate (0, 1, 0)
    ctx = AttentionContext(RotaryEmbedding(), training=True)
    attn(x, ctx)
    assert ctx.aux_losses["load_balance"].item() == pytest.approx(0.5 * ((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)


def test_load_balance_loss_only_in_training():
    _, attn = build()
    x, ctx = x_and_ctx(training=False)
    attn(x, ctx)
    assert "load_balance" not in ctx.aux_losses


def test_load_balance_loss_reaches_the_total_loss():
    torch.manual_seed(0)
    model = GPT.from_config(TINY_MODEL, "moas_top1").train()
    idx = torch.randint(0, 97, (2, 24))
    out = model(idx, targets=torch.roll(idx, -1, dims=1))
    assert set(out.aux_losses) == {"load_balance"}
    # summed over the two layers, each lambda * MSE(mean gate, uniform) with its own router
    assert out.aux_losses["load_balance"].item() > 0
    router = [p for n, p in model.named_parameters() if ".router." in n]
    grads = torch.autograd.grad(out.loss + out.aux_losses["load_balance"], router)
    assert len(router) == 2 * 3 and all(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- decoding
def _decode_matches_full(attention, B: int = 3, T: int = 40, decisive: bool = True):
    torch.manual_seed(0)
    model = GPT.from_config(TINY_MODEL, attention).double().eval()
    if decisive:
        for block in model.blocks:
            decisive_router(block.attn)
    idx = torch.randint(0, 97, (B, T))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(B, T)
        parts = [model(idx[:, :13], cache=cache).logits, model(idx[:, 13:19], cache=cache).logits]
        parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(19, T)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=1e-8)
    for layer in cache.layers:
        if isinstance(layer, RoutedMixtureCache):  # every row used every branch, none took all tokens
            assert all(0 < n < T for row in layer.lengths for n in row)
    return model, cache


@pytest.mark.parametrize("attention", [
    "static_moas",
    {"name": "moas"},
    {"name": "moas", "top_k": 1},
    {"name": "moas", "top_k": 2},
], ids=["static", "dense", "top1", "top2"])
def test_cached_decoding_equals_full_forward(attention):
    decisive = attention != "static_moas"
    _decode_matches_full(attention, decisive=decisive)


@pytest.mark.parametrize("top_k", [None, 1])
def test_cached_decoding_with_a_sliding_window_branch(top_k):
    if "sliding" not in registered_names():
        pytest.skip("the sliding mechanism is not registered")
    attention = {"name": "moas", "branches": ["mha", {"name": "sliding", "window": 8}], "top_k": top_k}
    model, _ = _decode_matches_full(attention)
    assert model.blocks[0].attn.branch_names == ["mha", "sliding"]


def test_routed_cache_holds_only_routed_tokens():
    """k=1: each token lands in exactly one branch's cache, so far fewer bytes are in use than the
    dense mixture's cache (all branches, every token), though the allocation reserves all."""
    B, T = 3, 40
    model, cache = _decode_matches_full({"name": "moas", "top_k": 1}, B, T)
    for layer in cache.layers:
        assert sum(map(sum, layer.lengths)) == B * T
        # closed form: MHA/GQA/MQA keep 2 * (4 | 2 | 1) * head_dim float64 values per routed token
        per_token = [2 * kv * 16 * 8 for kv in (4, 2, 1)]
        assert layer.used_nbytes() == sum(n * per_token[i] for row in layer.lengths for i, n in enumerate(row))
    dense_bytes = GPT.from_config(TINY_MODEL, "moas").cache_bytes(B, T, torch.float64)
    used = sum(layer.used_nbytes() for layer in cache.layers)
    assert used < dense_bytes
    # allocated: every (row, branch) cache can take the whole context, as much as the dense mixture
    assert cache.nbytes() == model.cache_bytes(B, T) == dense_bytes


def test_dense_cache_is_the_sum_of_branch_caches():
    model, attn = build("static_moas")
    assert attn.cache_bytes(2, 10, torch.float32) == 2 * 2 * (4 + 2 + 1) * 16 * 10 * 4


# ----------------------------------------------------------------------------- branches, stats
def test_repeated_branch_names_get_their_index():
    _, attn = build(branches=["mha", "mha", "gqa_2"])
    assert attn.branch_names == ["mha_0", "mha_1", "gqa_2"]
    _, attn = build(branches=["gqa_1", "gqa", "gqa"])
    assert len(set(attn.branch_names)) == 3


def test_routing_statistics():
    _, attn = build(top_k=1)
    decisive_router(attn)
    x, _ = x_and_ctx(2, 16)
    ctx = AttentionContext(RotaryEmbedding(), record_stats=True)
    attn(x, ctx)
    gates = ctx.stats["gates"]
    assert gates.shape == (2, 16, 3)
    assert sum(ctx.stats[f"top1_share/{n}"] for n in attn.branch_names).item() == pytest.approx(1.0)
    for i, name in enumerate(attn.branch_names):
        assert ctx.stats[f"gate_mean/{name}"].item() == pytest.approx(gates[..., i].mean().item())
        assert ctx.stats[f"top1_share/{name}"].item() == pytest.approx((gates.argmax(-1) == i).double().mean().item())
    assert ctx.stats["gate_entropy"].item() == 0.0  # one-hot gates
    # nothing is recorded unless asked for
    plain = AttentionContext(RotaryEmbedding())
    attn(x, plain)
    assert plain.stats is None


def test_uniform_gates_have_entropy_log_n():
    _, attn = build()
    with torch.no_grad():
        attn.router[-1].weight.zero_()
    x, _ = x_and_ctx()
    ctx = AttentionContext(RotaryEmbedding(), record_stats=True)
    attn(x, ctx)
    assert ctx.stats["gate_entropy"].item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("top_k", [None, 1])
def test_branch_aux_losses_and_statistics_flow_namespaced(top_k):
    """A sparse-attention branch's indexer loss reaches the shared aux losses; its statistics are
    stored under the branch's scope."""
    if "sparse" not in registered_names():
        pytest.skip("the sparse mechanism is not registered")
    _, attn = build(branches=["mha", {"name": "sparse", "top_k": 4}], top_k=top_k)
    x, _ = x_and_ctx(2, 16)
    ctx = AttentionContext(RotaryEmbedding(), record_stats=True, training=True).scope("layer0")
    attn.train()(x, ctx)
    assert {"load_balance", "indexer_kl"} <= set(ctx.aux_losses)
    assert "layer0/branch1_sparse/indexer_kl" in ctx.stats
    assert "layer0/gates" in ctx.stats


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("top_k", [0, 4, -1])
def test_top_k_must_be_within_the_branch_count(top_k):
    with pytest.raises(ConfigError, match=rf"attention\.top_k={top_k}; allowed: an integer in 1\.\.3"):
        build(top_k=top_k)


def test_unknown_branch_is_named():
    with pytest.raises(ConfigError, match=r"attention\.branches\[1\]='flashy': unknown attention preset"):
        build(branches=["mha", "flashy"])
    with pytest.raises(ConfigError, match=r"attention\.branches\[0\]\.name='flashy': unknown attention mechanism"):
        build(branches=[{"name": "flashy"}])


def test_invalid_branch_option_is_named():
    with pytest.raises(ConfigError, match=r"attention\.branches\[1\]\.n_kv_heads=3: must divide"):
        build("static_moas", branches=["mha", {"name": "gqa", "n_kv_heads": 3}])


@pytest.mark.parametrize("nested", ["moas", "static_moas", {"name": "moas", "top_k": 1}])
def test_nested_mixture_is_rejected(nested):
    with pytest.raises(ConfigError, match=r"attention\.branches\[1\]\.name='(static_)?moas': nested mixtures"):
        build(branches=["mha", nested])


@pytest.mark.parametrize("branches", [[], "mha"])
def test_branches_must_be_a_non_empty_list(branches):
    with pytest.raises(ConfigError, match=r"attention\.branches="):
        build(branches=branches)


def test_load_balance_weight_must_be_non_negative():
    with pytest.raises(ConfigError, match=r"attention\.load_balance_weight=-0\.1; allowed: a number >= 0"):
        build(load_balance_weight=-0.1)


def test_router_hidden_must_be_positive():
    with pytest.raises(ConfigError, match=r"attention\.router_hidden=0; allowed: an integer >= 1"):
        build(router_hidden=0)


def test_static_moas_has_no_routing_options():
    with pytest.raises(ConfigError, match=r"attention\.top_k=1: unknown option"):
        build("static_moas", top_k=1)
