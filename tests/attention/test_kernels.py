"""The kernel-choice policies: their decisions, and the plain_kernels scope under torch.compile."""

from __future__ import annotations

import pytest
import torch

from attnlab.attention.kernels import (
    plain_kernels,
    plain_kernels_only,
    plan_sdpa,
    selected_attention_kernel,
    use_flex_attention,
)


def plan(device: str, n_heads: int, n_kv_heads: int, q_len: int, dtype=torch.float32, mask_shape=None,
         v_dim: int = 8, batch: int = 1):
    """``plan_sdpa`` for these shapes; the meta device stands in for a GPU (any non-CPU device)."""
    q = torch.empty(batch, n_heads, q_len, 8, device=device, dtype=dtype)
    k = torch.empty(batch, n_kv_heads, 5, 8, device=device, dtype=dtype)
    v = torch.empty(batch, n_kv_heads, 5, v_dim, device=device, dtype=dtype)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool, device=device)
    return plan_sdpa(q, k, v, mask)


@pytest.mark.parametrize("device,n_kv_heads,q_len,dtype,mask_shape,expected", [
    ("cpu", 4, 3, torch.float32, None, "none"),
    ("cpu", 2, 3, torch.float32, None, "repeat_kv"),
    ("cpu", 2, 1, torch.float32, None, "pack_rows"),
    ("cpu", 1, 1, torch.float32, None, "pack_rows"),  # MQA, one sequence: packed although a thread idles
    ("cpu", 2, 1, torch.float32, (1, 4, 1, 5), "enable_gqa"),  # a mask per head does not fit packed rows
    ("meta", 2, 3, torch.bfloat16, None, "enable_gqa"),
    ("meta", 2, 3, torch.float32, None, "repeat_kv"),
    ("meta", 2, 1, torch.float32, None, "enable_gqa"),
    ("meta", 2, 1, torch.float32, (1, 1, 1, 5), "pack_rows"),
])
def test_sdpa_grouping(device, n_kv_heads, q_len, dtype, mask_shape, expected, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert plan(device, 4, n_kv_heads, q_len, dtype, mask_shape).grouping == expected


def test_sdpa_pads_only_narrower_values():
    assert plan("cpu", 4, 4, 3, v_dim=4).pad_values
    assert not plan("cpu", 4, 4, 3, v_dim=8).pad_values
    assert not plan("cpu", 4, 4, 3, v_dim=16).pad_values


def test_flex_and_selected_attention_choices():
    cpu, other = torch.device("cpu"), torch.device("meta")
    assert not use_flex_attention(cpu, n_prefix=0, dropout_p=0.0)
    assert not use_flex_attention(other, n_prefix=0, dropout_p=0.0)  # CUDA only
    assert selected_attention_kernel(cpu, 0.0, torch.float64) == "csr"
    assert selected_attention_kernel(cpu, 0.1) == "gathered"
    assert selected_attention_kernel(other, 0.0) == "gathered"
    with plain_kernels():
        assert selected_attention_kernel(other, 0.0) == "csr"
        assert selected_attention_kernel(other, 0.1) == "gathered"


def test_plain_kernels_nests_and_restores():
    assert not plain_kernels_only()
    with plain_kernels():
        with plain_kernels():
            assert plain_kernels_only()
        assert plain_kernels_only()
    assert not plain_kernels_only()
    with pytest.raises(RuntimeError), plain_kernels():
        raise RuntimeError
    assert not plain_kernels_only()


def test_compiled_code_reads_plain_kernels_without_breaks_or_recompiles():
    """Traced with fullgraph=True (a graph break would fail); inside plain_kernels the compiled
    function runs eagerly and sees the scope; outside it, the one graph is reused."""
    from torch._dynamo.testing import CompileCounter

    def choose(x):
        return x + 1 if plain_kernels_only() else x * 2

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(choose, backend=counter, fullgraph=True)
    x = torch.full((3,), 3.0)
    assert compiled(x).tolist() == [6.0] * 3
    with plain_kernels():
        assert compiled(x).tolist() == [4.0] * 3
    assert compiled(x).tolist() == [6.0] * 3
    assert counter.frame_count == 1
