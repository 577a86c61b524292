"""The chunked LM-head loss equals the plain cross-entropy, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from attnlab.loss import IGNORE_INDEX, linear_cross_entropy


def reference(hidden, weight, targets):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 100, 1000])
@pytest.mark.parametrize("n_rows", [37, 64])
def test_value_and_gradients_match_plain_cross_entropy(chunk_size, n_rows):
    torch.manual_seed(chunk_size)
    hidden = torch.randn(n_rows, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (n_rows,))
    targets[::5] = IGNORE_INDEX  # padded positions do not count
    loss, count = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    (g_h, g_w) = torch.autograd.grad(loss * 0.3, (hidden, weight))
    ref = reference(hidden, weight, targets)
    (r_h, r_w) = torch.autograd.grad(ref * 0.3, (hidden, weight))
    assert count.item() == (targets != IGNORE_INDEX).sum().item()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_h, r_h, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g_w, r_w, atol=1e-7, rtol=1e-6)


def test_without_grad_computes_no_gradients():
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), atol=1e-4, rtol=1e-5)


def test_only_weight_requires_grad():
    hidden = torch.randn(20, 8)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    loss.backward()
    ref_w = weight.detach().clone().requires_grad_()
    reference(hidden, ref_w, targets).backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True) * 0.1
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), atol=0.5, rtol=2e-2)
