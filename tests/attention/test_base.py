"""The shared SDPA helper against an explicit softmax(q k^T / sqrt(d)) v over repeated K/V heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention.base import sdpa, sdpa_causal


def naive_attention(q, k, v, mask=None):
    """``q`` ``(B, H, T, D)``, ``k`` ``(B, H_kv, S, D)``, ``v`` ``(B, H_kv, S, D_v)``; ``mask`` ``(T, S)`` bool
    (True = attend). Query head ``h`` reads KV head ``h // (H / H_kv)``."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype)
    for h in range(H):
        scores = q[:, h] @ k[:, h // group].transpose(-1, -2) / math.sqrt(D)  # (B, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, h // group]
    return out


def record_kernel_queries(monkeypatch) -> list[tuple[int, ...]]:
    """The query shapes ``scaled_dot_product_attention`` is called with from now on."""
    shapes: list[tuple[int, ...]] = []
    kernel = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        shapes.append(tuple(q.shape))
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return shapes


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("v_dim", [16, 8])
@pytest.mark.parametrize("threads", [1, 64])
def test_single_token_decoding_reads_grouped_kv(n_heads, n_kv_heads, v_dim, threads, monkeypatch):
    """On CPU the query heads of a KV head are packed into query rows of one kernel call, also
    when there are fewer (sequence, KV head) pairs than threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    queries = record_kernel_queries(monkeypatch)
    torch.manual_seed(0)
    q = torch.randn(3, n_heads, 1, 16, dtype=torch.float64)
    k = torch.randn(3, n_kv_heads, 11, 16, dtype=torch.float64)
    v = torch.randn(3, n_kv_heads, 11, v_dim, dtype=torch.float64)
    torch.testing.assert_close(sdpa(q, k, v), naive_attention(q, k, v))
    packed = n_kv_heads < n_heads
    assert queries == [(3, n_kv_heads, n_heads // n_kv_heads, 16) if packed else (3, n_heads, 1, 16)]
    # a cache view (a slice of a longer buffer) gives the same result
    buffer_k = torch.randn(3, n_kv_heads, 20, 16, dtype=torch.float64)
    buffer_v = torch.randn(3, n_kv_heads, 20, v_dim, dtype=torch.float64)
    buffer_k[:, :, :11], buffer_v[:, :, :11] = k, v
    torch.testing.assert_close(sdpa_causal(q, buffer_k[:, :, :11], buffer_v[:, :, :11], start=10),
                               naive_attention(q, k, v))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("q_len,start", [(7, 0), (3, 4), (1, 0)])
def test_causal_attention_with_grouped_kv(n_heads, n_kv_heads, q_len, start):
    torch.manual_seed(1)
    k_len = start + q_len
    q = torch.randn(2, n_heads, q_len, 8, dtype=torch.float64)
    k = torch.randn(2, n_kv_heads, k_len, 8, dtype=torch.float64)
    v = torch.randn(2, n_kv_heads, k_len, 8, dtype=torch.float64)
    # query i sits at position start + i and sees keys 0 .. start + i
    mask = torch.arange(k_len)[None, :] <= (start + torch.arange(q_len))[:, None]
    torch.testing.assert_close(sdpa_causal(q, k, v, start), naive_attention(q, k, v, mask))
