"""Gated DeltaNet (``attention=linear``) against the update rule written out with explicit matrices."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention import AttentionContext, resolve_attention
from attnlab.attention._gated_delta import (
    FLA_AVAILABLE,
    chunk_gated_delta_rule,
    fla_backward_is_reliable,
    fla_chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from attnlab.attention.linear import GatedDeltaCache
from attnlab.config import ConfigError, ModelConfig
from attnlab.model import GPT
from tests.conftest import TINY_MODEL
from tests.helpers import largest_intermediate


def naive_gated_delta(q, k, v, g, beta, scale, initial_state=None):
    """The paper's update taken literally, one head and one token at a time:
    ``S = alpha S (I - beta k k^T) + beta v k^T``, ``o = S (scale q)``."""
    B, H, T, d_k = k.shape
    d_v = v.shape[-1]
    out = torch.zeros(B, H, T, d_v, dtype=torch.float64)
    final = torch.zeros(B, H, d_v, d_k, dtype=torch.float64)
    eye = torch.eye(d_k, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = (torch.zeros(d_v, d_k, dtype=torch.float64) if initial_state is None
                 else initial_state[b, h].double())
            for t in range(T):
                k_t, v_t, b_t = k[b, h, t].double(), v[b, h, t].double(), beta[b, h, t].double()
                alpha = math.exp(g[b, h, t].item())
                S = alpha * S @ (eye - b_t * torch.outer(k_t, k_t)) + b_t * torch.outer(v_t, k_t)
                out[b, h, t] = S @ (scale * q[b, h, t].double())
            final[b, h] = S
    return out, final


def random_inputs(B=2, H=3, T=37, d_k=8, d_v=12, dtype=torch.float64, with_state=False):
    q = torch.randn(B, H, T, d_k, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, d_k, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, d_v, dtype=dtype)
    g = -2 * torch.rand(B, H, T, dtype=dtype)  # alpha in (e^-2, 1)
    beta = torch.rand(B, H, T, dtype=dtype)
    state = torch.randn(B, H, d_v, d_k, dtype=dtype) if with_state else None
    return q, k, v, g, beta, state


# ----------------------------------------------------------------------------- the algorithm
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive_recurrence(chunk_size, with_state):
    """T = 37 is a multiple of none of the chunk sizes > 1: the padding must not change anything."""
    q, k, v, g, beta, state = random_inputs(with_state=with_state)
    want, want_final = naive_gated_delta(q, k, v, g, beta, 0.3, state)
    got, got_final = chunk_gated_delta_rule(q, k, v, g, beta, 0.3, chunk_size, state)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_final, want_final, atol=1e-10, rtol=1e-9)


def test_recurrent_step_equals_naive_recurrence():
    q, k, v, g, beta, state = random_inputs(T=9, with_state=True)
    want, want_final = naive_gated_delta(q, k, v, g, beta, 0.5, state)
    got, got_final = recurrent_gated_delta_rule(q, k, v, g, beta, 0.5, state)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_final, want_final, atol=1e-10, rtol=1e-9)


def test_chunked_survives_strong_decay():
    """Cumulative log decays of -1000 within a chunk: every exponent is a difference <= 0."""
    q, k, v, g, beta, state = random_inputs(T=40, with_state=True)
    g = g * 25  # alpha down to e^-50
    want, want_final = naive_gated_delta(q, k, v, g, beta, 0.3, state)
    got, got_final = chunk_gated_delta_rule(q, k, v, g, beta, 0.3, 32, state)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_final, want_final, atol=1e-10, rtol=1e-9)


def test_chunked_gradients_equal_recurrence_gradients():
    """Training differentiates the chunked form: its gradients must be the recurrence's."""
    inputs = [t.requires_grad_() for t in random_inputs(T=11, with_state=True)]
    weights = torch.randn(2, 3, 11, 12, dtype=torch.float64), torch.randn(2, 3, 12, 8, dtype=torch.float64)

    def loss(fn, *args):
        o, final = fn(*inputs[:5], 0.3, *args, initial_state=inputs[5])
        return (o * weights[0]).sum() + (final * weights[1]).sum()

    want = torch.autograd.grad(loss(recurrent_gated_delta_rule), inputs)
    got = torch.autograd.grad(loss(chunk_gated_delta_rule, 4), inputs)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")


needs_fla = pytest.mark.skipif(not (torch.cuda.is_available() and FLA_AVAILABLE),
                               reason="needs CUDA and flash-linear-attention >= 0.2")


@needs_fla
def test_fla_kernel_equals_naive_recurrence():
    """fla's kernel (bf16 inputs, (B, T, H, D) layout, (D_k, D_v) states) behind our interface."""
    q, k, v, g, beta, state = random_inputs(T=100, d_k=32, d_v=64, with_state=True)
    q, k, v, beta = (t.bfloat16().double() for t in (q, k, v, beta))  # the values the kernel sees
    want, want_final = naive_gated_delta(q, k, v, g, beta, 32 ** -0.5, state)
    cuda = lambda t: t.cuda().bfloat16()  # noqa: E731
    got, got_final = fla_chunk_gated_delta_rule(cuda(q), cuda(k), cuda(v), g.cuda().float(), cuda(beta),
                                                32 ** -0.5, state.cuda().float(), output_final_state=True)
    assert got.shape == want.shape and got_final.shape == want_final.shape
    torch.testing.assert_close(got.double().cpu(), want, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got_final.double().cpu(), want_final, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("capability,triton_version,reliable", [
    ((9, 0), "3.6.0", False), ((9, 0), "3.4.0", False), ((9, 0), "3.7.0+git1a2b", False),
    ((9, 0), "3.7.1", True), ((9, 0), "3.3.1", True), ((8, 0), "3.6.0", True), ((10, 0), "3.6.0", True)])
def test_fla_backward_is_not_trusted_where_triton_miscompiles_it(capability, triton_version, reliable):
    """fla #640: Hopper with Triton in [3.4.0, 3.7.1) computes wrong gated-chunk gradients."""
    assert fla_backward_is_reliable(capability, triton_version) is reliable


@needs_fla
def test_bf16_training_through_the_module_matches_float32_gradients():
    """A grad-requiring bf16 call takes fla where its backward is reliable and the PyTorch chunked
    path where it is not (fla #640); either way the gradients agree with float32."""
    _, attn = build(chunk_size=16)
    attn = attn.float().cuda()
    x = torch.randn(2, 80, 64, device="cuda", requires_grad=True)
    want = torch.autograd.grad(attn(x, AttentionContext(None)).square().sum(), x)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = torch.autograd.grad(attn(x, AttentionContext(None)).float().square().sum(), x)[0]
    assert (got - want).norm() / want.norm() < 3e-2


# ----------------------------------------------------------------------------- the module
def build(**options):
    model = ModelConfig(**TINY_MODEL)
    spec = resolve_attention({"name": "linear", **options}, model)
    return model, spec.build(model, 0).double().eval()


@needs_fla
def test_module_takes_fla_kernel_under_bf16_autocast(monkeypatch):
    """bf16 autocast on CUDA goes through fla (full sequence, and prefill continuing a cached
    state); it agrees with the float32 pure-PyTorch path up to bf16 precision."""
    import attnlab.attention.linear as linear_module

    calls = []
    kernel = linear_module.fla_chunk_gated_delta_rule
    monkeypatch.setattr(linear_module, "fla_chunk_gated_delta_rule",
                        lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    _, attn = build(chunk_size=16)
    attn = attn.float().cuda()
    x = torch.randn(2, 80, 64, device="cuda")
    with torch.no_grad():
        want = attn(x, AttentionContext(None))  # float32: the chunked pure-PyTorch path
        assert not calls
        with torch.autocast("cuda", dtype=torch.bfloat16):
            full = attn(x, AttentionContext(None))
            cache = attn.init_cache(2, 80, "cuda", torch.float32)
            parts = [attn(x[:, :50], AttentionContext(None, 0), cache),
                     attn(x[:, 50:], AttentionContext(None, 50), cache)]
    assert len(calls) == 3
    scale = want.abs().max()
    assert (full.float() - want).abs().max() < 3e-2 * scale
    assert (torch.cat(parts, dim=1).float() - want).abs().max() < 3e-2 * scale


def run_tokens(attn, x, cache, splits):
    """Feed ``x`` through ``attn`` with ``cache`` in pieces of the given lengths."""
    outputs, start = [], 0
    for length in splits:
        outputs.append(attn(x[:, start:start + length], AttentionContext(None, start), cache))
        start += length
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("options", [{"chunk_size": 8}, {"chunk_size": 5, "conv_size": 1, "expand_v": 2},
                                     {"chunk_size": 64, "conv_size": 3}])
def test_forward_equals_token_by_token_decoding(options):
    _, attn = build(**options)
    x = torch.randn(2, 23, 64, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x, AttentionContext(None))
        cache = attn.init_cache(2, 23, None, torch.float64)
        stepped = run_tokens(attn, x, cache, [1] * 23)
        cache = attn.init_cache(2, 23, None, torch.float64)
        prefilled = run_tokens(attn, x, cache, [2, 11, 1, 1, 6, 1, 1])
    torch.testing.assert_close(stepped, full, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(prefilled, full, atol=1e-10, rtol=1e-9)


def test_memory_grows_linearly_with_length():
    """No (T, T) tensor in the forward or backward pass: the largest intermediate is O(T * chunk)."""
    _, attn = build(chunk_size=64)
    attn = attn.float().train()

    def step(x):
        attn(x, AttentionContext(None, training=True)).sum().backward()

    sizes = {}
    for T in (1024, 2048):
        sizes[T], op = largest_intermediate(step, torch.randn(1, T, 64, requires_grad=True))
    assert 1.8 < sizes[2048] / sizes[1024] < 2.2, (sizes, op)
    assert sizes[2048] < 2048 * 2048 / 4


def expected_cache_bytes(B, H, d_k, d_v, conv_size, element):
    return B * H * d_v * d_k * max(element, 4) + B * (2 * H * d_k + H * d_v) * (conv_size - 1) * element


@pytest.mark.parametrize("context", [1, 2, 3, 40])
def test_state_bytes_constant_in_context(context):
    """The whole model's cache, after ``context`` tokens, equals the closed form for any context
    (including context < conv_size - 1); it does not grow with the context."""
    torch.manual_seed(0)
    model = GPT.from_config(TINY_MODEL, {"name": "linear", "expand_v": 2}).eval()
    cache = model.init_cache(3, context)
    with torch.no_grad():
        model(torch.randint(0, 97, (3, context)), cache=cache)
    per_layer = expected_cache_bytes(3, 4, 16, 32, 4, 4)
    assert cache.nbytes() == model.cache_bytes(3, context) == TINY_MODEL["n_layers"] * per_layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_state_is_float32_at_least(dtype):
    _, attn = build(conv_size=3)
    cache = attn.init_cache(2, 1000, None, dtype)
    assert cache.state.dtype == torch.promote_types(dtype, torch.float32)
    element = torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes() == attn.cache_bytes(2, 1000, dtype) == attn.cache_bytes(2, 1, dtype)
    assert cache.nbytes() == expected_cache_bytes(2, 4, 16, 16, 3, element)


def test_decay_lies_in_open_unit_interval_and_init_ranges():
    torch.manual_seed(0)
    model = GPT.from_config(TINY_MODEL, "linear")
    for block in model.blocks:
        attn = block.attn
        A, dt = attn.A_log.exp(), torch.nn.functional.softplus(attn.dt_bias)
        assert ((1 <= A) & (A <= 16)).all() and ((0.001 <= dt) & (dt <= 0.1)).all()
        assert attn.A_log._no_weight_decay and attn.dt_bias._no_weight_decay
        a, b = (torch.randn(2, 50, 4) for _ in range(2))
        g, beta = attn.gates(a, b)
        alpha = g.exp()
        assert ((0 < alpha) & (alpha < 1)).all() and ((0 < beta) & (beta < 1)).all()


def test_open_gate_and_no_write_keep_the_state():
    """A_log -> -inf (alpha -> 1) and beta -> 0: the memory is carried unchanged; with the
    initial gates it is not."""
    model = ModelConfig(**{**TINY_MODEL, "bias": True})
    attn = resolve_attention("linear", model).build(model, 0).double().eval()
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    initial = torch.randn(2, 4, 16, 16, dtype=torch.float64)

    def state_after(x):
        cache = attn.init_cache(2, 9, None, torch.float64)
        cache.state.copy_(initial)
        with torch.no_grad():
            attn(x, AttentionContext(None), cache)
        return cache.state

    assert (state_after(x) - initial).abs().max() > 0.1
    b_rows = slice(sum(attn.split) - attn.n_heads, sum(attn.split))
    with torch.no_grad():
        attn.A_log.fill_(-40.0)
        attn.in_proj.weight[b_rows] = 0.0
        attn.in_proj.bias[b_rows] = -40.0
    torch.testing.assert_close(state_after(x), initial, atol=1e-12, rtol=1e-12)


def test_parameter_count_close_to_mha():
    """``5 d^2`` of projections at ``expand_v = 1`` (MHA: ``4 d^2``) plus per-head and conv terms."""
    exp10 = ModelConfig(n_layers=4, d_model=128, n_heads=4, d_ff=512, max_seq_len=1024)
    attn = resolve_attention("linear", exp10).build(exp10, 0)
    d, H, D, K = 128, 4, 32, 4
    expected = 5 * d * d + 2 * H * d + 3 * H * D * K + 2 * H + D
    assert sum(p.numel() for p in attn.parameters()) == expected
    assert expected < 1.3 * 4 * d * d


@pytest.mark.parametrize("option", ["chunk_size", "conv_size", "expand_v"])
@pytest.mark.parametrize("value", [0, -2])
def test_options_must_be_positive(tiny_model_cfg, option, value):
    with pytest.raises(ConfigError, match=rf"attention\.{option}={value}; allowed: an integer >= 1"):
        resolve_attention({"name": "linear", option: value}, tiny_model_cfg)


@pytest.mark.parametrize("option", ["chunk_size", "conv_size", "expand_v"])
def test_options_must_be_integers(tiny_model_cfg, option):
    with pytest.raises(ConfigError, match=rf"attention\.{option}=1\.5; allowed: an integer"):
        resolve_attention({"name": "linear", option: 1.5}, tiny_model_cfg)


def test_cache_type_and_no_rope():
    _, attn = build()
    assert type(attn).uses_rope is False
    assert isinstance(attn.init_cache(1, 4, None, torch.float32), GatedDeltaCache)
