"""The README's closed forms of each mechanism's parameter count ("Using a mechanism in your own
model"), for general ``H`` and ``H_kv``, against the parameters the modules hold."""

from __future__ import annotations

import pytest

from attnlab.attention import build


def gqa(C, H, H_kv, bias):
    d = C // H
    return C * (H + 2 * H_kv) * d + H * d * C + bias * ((H + 2 * H_kv) * d + C)


def identity(C, bias):
    return 2 * C * C + bias * 2 * C


def mla(C, H, r, r_q, d_n, d_r, d_v, bias):
    queries = C * H * (d_n + d_r) + bias * H * (d_n + d_r) if not r_q else \
        C * r_q + r_q + r_q * H * (d_n + d_r) + bias * (r_q + H * (d_n + d_r))
    return (queries + C * (r + d_r) + r + r * H * (d_n + d_v) + H * d_v * C
            + bias * ((r + d_r) + H * (d_n + d_v) + C))


def sparse(C, H, H_kv, H_I, D_I, bias):
    return gqa(C, H, H_kv, bias) + (C + bias) * (H_I * D_I + D_I + H_I)


def linear(C, H, expand_v, conv_size, bias):
    d_k = C // H
    d_v = expand_v * d_k
    projections = 2 * H * d_k + 2 * H * d_v + 2 * H  # q, k, v, output gate, a, b
    return ((C + bias) * projections + (2 * H * d_k + H * d_v) * conv_size + 2 * H + d_v
            + H * d_v * C + bias * C)


def moh(C, H, H_kv, n_shared, top_k, bias):
    E = H - n_shared
    router = C * ((E if E > 1 else 0) + (n_shared if n_shared > 1 else 0) + (2 if n_shared > 0 else 0))
    return gqa(C, H, H_kv, bias) + router


def moas_router(C, h, n, bias):
    return C * h + bias * h + h * n + n


SETTINGS = [(64, 8, 2, False), (64, 4, 4, True), (96, 6, 1, False), (128, 8, 8, True)]


@pytest.mark.parametrize("C,H,H_kv,bias", SETTINGS)
def test_closed_forms_equal_the_modules_parameters(C, H, H_kv, bias):
    def count(attention, **options):
        layer = build(attention, d_model=C, n_heads=H, bias=bias, **options)
        return sum(p.numel() for p in layer.parameters())

    assert count("gqa", n_kv_heads=H_kv) == gqa(C, H, H_kv, bias)
    assert count("mha") == gqa(C, H, H, bias)
    assert count("mqa") == gqa(C, H, 1, bias)
    assert count("sliding", n_kv_heads=H_kv, window=16) == gqa(C, H, H_kv, bias)
    assert count("identity") == identity(C, bias)
    assert count("mla", kv_lora_rank=H_kv * 8, qk_nope_head_dim=H, qk_rope_head_dim=2 * H_kv, v_head_dim=12) == \
        mla(C, H, H_kv * 8, None, H, 2 * H_kv, 12, bias)
    assert count("mla", q_lora_rank=24, kv_lora_rank=16) == mla(C, H, 16, 24, 32, 32, 32, bias)
    assert count("sparse", n_kv_heads=H_kv, index_n_heads=H_kv, index_head_dim=8) == \
        sparse(C, H, H_kv, H_kv, 8, bias)
    assert count("linear", expand_v=2, conv_size=3) == linear(C, H, 2, 3, bias)
    for n_shared, top_k in [(2, H - 3), (1, 1), (0, 2)]:
        assert count("moh", n_kv_heads=H_kv, n_shared_heads=n_shared, top_k=top_k) == \
            moh(C, H, H_kv, n_shared, top_k, bias)
    branches = [gqa(C, H, H, bias), gqa(C, H, H_kv, bias), gqa(C, H, 1, bias)]
    moas_branches = ["mha", {"name": "gqa", "n_kv_heads": H_kv}, "mqa"]
    assert count("static_moas", branches=moas_branches) == sum(branches)
    assert count("moas", branches=moas_branches) == sum(branches) + moas_router(C, C // 4, 3, bias)
