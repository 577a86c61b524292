"""The static decoding step's C kernel (``attnlab::decode_attention``: ``csrc/decode.c`` registered
by ``csrc/decode_op.cpp``) against a naive float64 softmax written here, traced by
``torch.compile``, and the fallback to SDPA where it is disabled or cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from attnlab.attention import AttentionContext, _native
from attnlab.attention.base import sdpa_static
from attnlab.attention.kernels import use_native_decode

pytestmark = pytest.mark.skipif(not _native.decode_available(),
                                reason="no C/C++ compiler or PyTorch headers: the decode kernel did not build")


def naive_decode(q, k, v, position, scale):
    """Per sequence and query head: softmax over the slots ``0..min(position, S-1)`` in float64."""
    B, H, _, _ = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    n = min(position + 1, S)
    out = torch.empty(B, H, 1, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // H_kv)
            scores = k[b, kv, :n].double() @ q[b, h, 0].double() * scale
            weights = torch.exp(scores - scores.max())
            out[b, h, 0] = weights @ v[b, kv, :n].double() / weights.sum()
    return out


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("H_kv,G", [(4, 1), (2, 2), (1, 4), (1, 16)])
@pytest.mark.parametrize("D,Dv", [(32, 32), (64, 64), (96, 96), (96, 64), (128, 128), (12, 20), (40, 8)])
def test_decode_attention_equals_naive_softmax(threads, H_kv, G, D, Dv):
    """MHA/GQA/MQA groups (16: the largest the kernel takes), the widths it specialises and two it
    does not (one not a multiple of its 8-lane vectors), and positions inside the first block,
    at block edges (128 keys), at the last slot and past it (a rolling buffer's wrapped state)."""
    gen = torch.Generator().manual_seed(D * G + H_kv)
    B, S = 2, 300
    q = torch.randn(B, H_kv * G, 1, D, generator=gen)
    k, v = torch.randn(B, H_kv, S, D, generator=gen), torch.randn(B, H_kv, S, Dv, generator=gen)
    for position in [0, 6, 127, 128, 255, 299, 350]:
        got = _native.decode_attention(q, k, v, torch.tensor(position), D ** -0.5)
        torch.testing.assert_close(got.double(), naive_decode(q, k, v, position, D ** -0.5), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("H_kv", [1, 2])
def test_values_read_in_place_from_wider_rows(threads, H_kv):
    """MLA's values are the first channels of its cached rows: a ``(B, H_kv, S, 64)`` view of
    ``(B, H_kv, S, 96)`` rows is read in place, with the same result as its contiguous copy; a view
    whose rows are not evenly spaced (heads of another buffer) is copied first, also correctly."""
    gen = torch.Generator().manual_seed(H_kv)
    B, S, G = 2, 300, 4
    q = torch.randn(B, H_kv * G, 1, 96, generator=gen)
    rows = torch.randn(B, H_kv, S, 96, generator=gen)
    values = rows[..., :64]
    uneven = torch.randn(B, S, H_kv, 64, generator=gen).transpose(1, 2)  # (B, H_kv, S, 64), heads interleaved
    for position in [0, 39, 40, 299]:
        got = _native.decode_attention(q, rows, values, torch.tensor(position), 0.125)
        assert torch.equal(got, _native.decode_attention(q, rows, values.contiguous(), torch.tensor(position), 0.125))
        torch.testing.assert_close(got.double(), naive_decode(q, rows, values, position, 0.125), atol=2e-6, rtol=2e-5)
        got = _native.decode_attention(q, rows, uneven, torch.tensor(position), 0.125)
        torch.testing.assert_close(got.double(), naive_decode(q, rows, uneven, position, 0.125), atol=2e-6, rtol=2e-5)


def test_peaked_and_flat_softmax():
    """Scores 60 apart (weights below exp(-64) are dropped: still the one-hot answer, no NaN) and
    equal scores (the plain mean of the values)."""
    B, H, S, D = 1, 2, 1000, 32
    k, v = torch.randn(B, 1, S, D), torch.randn(B, 1, S, D)
    q = k[:, :, 700:701].expand(B, H, 1, D).contiguous()  # query = key 700: by far its own best score
    got = _native.decode_attention(q, k, v, torch.tensor(S - 1), 50.0)
    torch.testing.assert_close(got.double(), naive_decode(q, k, v, S - 1, 50.0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0, :, 0], v[0, 0, 700].expand(H, D))
    flat = _native.decode_attention(torch.zeros(B, H, 1, D), k, v, torch.tensor(499), 1.0)
    torch.testing.assert_close(flat[0, :, 0], v[0, 0, :500].mean(0).expand(H, D), atol=1e-6, rtol=1e-5)


def test_non_contiguous_inputs_and_bad_arguments():
    q = torch.randn(1, 1, 4, 32).transpose(1, 2)  # (1, 4, 1, 32), heads not contiguous
    k, v = torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    torch.testing.assert_close(_native.decode_attention(q, k, v, torch.tensor(20), 0.3).double(),
                               naive_decode(q, k, v, 20, 0.3), atol=2e-6, rtol=2e-5)
    with pytest.raises(RuntimeError, match="3 query heads over 2 KV heads"):
        _native.decode_attention(torch.randn(1, 3, 1, 32), k, v, torch.tensor(0), 1.0)
    with pytest.raises(RuntimeError, match="float32 only"):
        _native.decode_attention(q.double(), k.double(), v.double(), torch.tensor(0), 1.0)
    with pytest.raises(RuntimeError, match="at most 16"):
        _native.decode_attention(torch.randn(1, 34, 1, 32), k, v, torch.tensor(0), 1.0)


def test_traced_by_torch_compile():
    """Fake tensors take the operator's meta kernel; one graph serves every position."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, k, v, pos: _native.decode_attention(q * 2, k, v, pos, 0.25) + 1,
                       backend=counter, fullgraph=True)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 8)
    for position in (0, 17, 39, 45):
        torch.testing.assert_close(fn(q, k, v, torch.tensor(position)).double(),
                                   naive_decode(q * 2, k, v, position, 0.25) + 1, atol=2e-6, rtol=2e-5)
    assert counter.frame_count == 1


def test_compiled_cpp_wrapper_calls_the_c_shims_directly():
    """With ``decode_c_shims()`` inductor's C++ wrapper calls the operators' C functions (global
    symbols of the loaded library), not the boxed dispatcher, with the same results: a product
    with and without its added term, and the attention."""
    import ctypes

    from torch._inductor.utils import run_and_get_code

    def step(x, weight, add, q, k, v, position):
        return (torch.ops.attnlab.decode_linear(x, weight, None), torch.ops.attnlab.decode_linear(x, weight, add),
                _native.decode_attention(q, k, v, position, 0.25))

    assert hasattr(ctypes.CDLL(None), "aoti_torch_cpu_decode_linear")
    compiled = torch.compile(step, fullgraph=True,
                             options={"cpp_wrapper": True, "aot_inductor.custom_ops_to_c_shims": _native.decode_c_shims()})
    x, weight, add = torch.randn(2, 8), torch.randn(16, 8), torch.randn(2, 16)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 8)
    (plain, added, attended), code = run_and_get_code(compiled, x, weight, add, q, k, v, torch.tensor(17))
    source = "\n".join(code)
    assert "aoti_torch_cpu_decode_linear(" in source and "aoti_torch_cpu_decode_attention(" in source
    assert "aoti_torch_call_dispatcher" not in source
    want = x.double() @ weight.double().T
    torch.testing.assert_close(plain.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(added.double(), want + add.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attended.double(), naive_decode(q, k, v, 17, 0.25), atol=2e-6, rtol=2e-5)


def test_static_attention_takes_the_kernel_only_where_it_applies():
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    with torch.no_grad():
        assert use_native_decode(q, k, v)
        assert not use_native_decode(q.double(), k.double(), v.double())
        assert not use_native_decode(torch.randn(1, 34, 1, 32), torch.randn(1, 2, 64, 32), v)  # 17 per KV head
    assert not use_native_decode(q, k, v)  # gradients: the kernel has no backward
    ctx = AttentionContext(None, torch.tensor(40))
    with torch.no_grad():
        native = sdpa_static(q, k, v, ctx)
    fused = sdpa_static(q, k, v, ctx)  # SDPA under the visibility mask
    torch.testing.assert_close(native, fused, atol=1e-6, rtol=1e-5)


@pytest.fixture
def fresh_decode_library():
    _native.decode_available.cache_clear()
    yield
    _native.decode_available.cache_clear()


def test_disabled_or_unbuildable_falls_back_to_sdpa(monkeypatch, fresh_decode_library, caplog, tmp_path):
    monkeypatch.setenv("ATTNLAB_NATIVE", "0")
    assert not _native.decode_available()
    _native.decode_available.cache_clear()
    monkeypatch.delenv("ATTNLAB_NATIVE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with caplog.at_level(logging.WARNING, logger="attnlab.attention._native"):
        assert not _native.decode_available()
    assert "attends with PyTorch's fused kernel" in caplog.text
    assert not list(tmp_path.rglob("*.so*"))  # no partial library left behind
