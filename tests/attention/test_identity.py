import torch

from attnlab.attention import AttentionContext, resolve_attention
from attnlab.config import ModelConfig
from tests.conftest import TINY_MODEL


def test_identity_mixes_no_tokens():
    model = ModelConfig(**TINY_MODEL)
    attn = resolve_attention("identity", model).build(model, 0)
    x = torch.randn(2, 10, 64)
    y = attn(x, AttentionContext(None))
    # each position equals the projection of that position alone
    for t in range(10):
        torch.testing.assert_close(y[:, t:t + 1], attn(x[:, t:t + 1], AttentionContext(None)))
    torch.testing.assert_close(y, x @ attn.v_proj.weight.T @ attn.out_proj.weight.T)
    assert sum(p.numel() for p in attn.parameters()) == 2 * 64 * 64
