"""The compiled decoding step's product rewrite (``attnlab.decode_passes``) and its C kernel
(``attnlab::decode_linear``) against float64 matrix products."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from attnlab.attention import _native
from attnlab.decode_passes import MAX_ROWS, FewRowLinears

pytestmark = pytest.mark.skipif(not _native.decode_available(),
                                reason="no C/C++ compiler or PyTorch headers: the decode kernels did not build")


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("M,N,K", [(1, 384, 128), (1, 1024, 128), (1, 128, 512), (3, 37, 13), (2, 5, 8), (1, 256, 96)])
def test_decode_linear_equals_float64_products(threads, M, N, K):
    """Widths the kernel specialises (128, 512) and others, weight rows not a multiple of its four,
    weights split over the threads (>= 64 KiB) and not; no addend, a bias, a residual."""
    gen = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    for add in (None, torch.randn(N, generator=gen), torch.randn(M, N, generator=gen)):
        want = x.double() @ w.double().T + (0 if add is None else add.double())
        torch.testing.assert_close(_native.decode_linear(x, w, add).double(), want, atol=1e-5, rtol=1e-5)


def test_decode_linear_reads_strided_rows():
    x = torch.randn(4, 64)[::2]  # rows 128 floats apart
    w = torch.randn(16, 64)
    torch.testing.assert_close(_native.decode_linear(x, w), x @ w.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="do not match"):
        _native.decode_linear(x, torch.randn(16, 63))


def products(x, w, bias, residual):
    return x @ w.T, torch.addmm(bias, x, w.t()), torch.addmm(residual, x, w.T), torch.addmm(bias, x, w.T, beta=2)


def test_pass_rewrites_few_row_products_only():
    """``mm``/``addmm`` by a transposed weight with at most MAX_ROWS float32 rows go to the kernel
    (same values); scaled ``addmm``, more rows and float64 stay ATen's."""
    w, bias = torch.randn(24, 16), torch.randn(24)
    for rows, dtype, rewritten in [(1, torch.float32, 3), (MAX_ROWS, torch.float32, 3), (MAX_ROWS + 1, torch.float32, 0),
                                   (2, torch.float64, 0)]:
        args = (torch.randn(rows, 16, dtype=dtype), w.to(dtype), bias.to(dtype), torch.randn(rows, 24, dtype=dtype))
        graph_module = make_fx(products, tracing_mode="fake")(*args)
        FewRowLinears()(graph_module.graph)
        graph_module.recompile()
        targets = [node.target for node in graph_module.graph.nodes]
        assert targets.count(torch.ops.attnlab.decode_linear.default) == rewritten
        assert targets.count(torch.ops.aten.addmm.default) >= 1  # beta=2 is never rewritten
        for got, want in zip(graph_module(*args), products(*args)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pass_has_a_stable_cache_key():
    assert FewRowLinears().uuid() == FewRowLinears().uuid()
