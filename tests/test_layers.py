import math

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.layers import MLP, RotaryEmbedding, apply_rotary, make_norm
from tests.conftest import TINY_MODEL


def complex_rope(x, start, theta=10000.0):
    """RoPE as complex multiplication: pair channel i with i + D/2, rotate by pos * theta^(-2i/D)."""
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    pos = torch.arange(start, start + T, dtype=torch.float64)
    z = z * torch.polar(torch.ones(T, half, dtype=torch.float64), torch.outer(pos, freqs))
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("start", [0, 5, 1000])
@pytest.mark.parametrize("dim", [8, 32])
def test_rope_matches_complex_rotation(start, dim):
    x = torch.randn(2, 3, 11, dim, dtype=torch.float64)
    got = RotaryEmbedding().rotate(x, start)
    torch.testing.assert_close(got, complex_rope(x, start), atol=1e-5, rtol=1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    """The eager rotation's custom backward against autograd's numerical Jacobian (float64), on a
    head-split view of a projection (not contiguous); the result keeps that view's memory order."""
    projection = torch.randn(2, 5, 3 * 4 * 8, dtype=torch.float64)
    x = projection[..., :32].view(2, 5, 4, 8).transpose(1, 2).detach().requires_grad_()  # (B, H, T, D)
    cos, sin = RotaryEmbedding().cos_sin(8, 3, 5, "cpu")
    cos, sin = cos.double(), sin.double()
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
    y = apply_rotary(x, cos, sin)
    assert y.grad_fn.name() == "_RotationBackward"
    assert y.transpose(1, 2).is_contiguous()  # (B, T, H, D) in memory, like x * cos would be
    torch.testing.assert_close(y, complex_rope(x.detach(), 3))
    with torch.no_grad():  # the expression, the same values
        torch.testing.assert_close(apply_rotary(x, cos, sin), y.detach(), atol=1e-12, rtol=0)


def test_rope_compiled_equals_eager():
    x = torch.randn(2, 4, 9, 16)
    rope = RotaryEmbedding()
    compiled = torch.compile(lambda t: rope.rotate(t, 5), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), rope.rotate(x, 5))


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding()
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    s1 = (rope.rotate(q, 7) * rope.rotate(k, 3)).sum()
    s2 = (rope.rotate(q, 104) * rope.rotate(k, 100)).sum()
    assert math.isclose(s1.item(), s2.item(), rel_tol=1e-4)


def test_swiglu_and_gelu_mlp():
    cfg = ModelConfig(**TINY_MODEL)
    x = torch.randn(2, 3, 64)
    mlp = MLP(cfg)
    gate, up = (x @ mlp.up.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(gate) * up) @ mlp.down.weight.T)
    gelu = MLP(ModelConfig(**{**TINY_MODEL, "mlp": "gelu"}))
    torch.testing.assert_close(gelu(x), torch.nn.functional.gelu(x @ gelu.up.weight.T, approximate="tanh") @ gelu.down.weight.T)


def test_norms():
    x = torch.randn(4, 64) * 3 + 1
    rms = make_norm(ModelConfig(**TINY_MODEL))
    torch.testing.assert_close(rms(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
    ln = make_norm(ModelConfig(**{**TINY_MODEL, "norm": "layernorm"}))
    torch.testing.assert_close(ln(x), (x - x.mean(-1, keepdim=True)) / x.var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt(),
                               atol=1e-5, rtol=1e-5)
