"""The chunked LM-head loss equals the plain cross-entropy (value and gradients), and its accuracy
and per-token values equal a naive computation over the full logits."""

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
    loss, count, n_correct, _, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    (g_h, g_w) = torch.autograd.grad(loss * 0.3, (hidden, weight))
    ref = reference(hidden, weight, targets)
    (r_h, r_w) = torch.autograd.grad(ref * 0.3, (hidden, weight))
    assert count.item() == (targets != IGNORE_INDEX).sum().item()
    assert n_correct is None  # training does not pay for the argmax
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_h, r_h, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g_w, r_w, atol=1e-7, rtol=1e-6)


def test_without_grad_computes_no_gradients():
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=6).loss_sum
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), atol=1e-4, rtol=1e-5)


def test_only_weight_requires_grad():
    hidden = torch.randn(20, 8)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=6).loss_sum
    loss.backward()
    ref_w = weight.detach().clone().requires_grad_()
    reference(hidden, ref_w, targets).backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True) * 0.1
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16).loss_sum
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), atol=0.5, rtol=2e-2)


def naive_statistics(hidden, weight, targets):
    """Per-token losses and correctness from the full ``(N, V)`` logits."""
    logits = (hidden @ weight.T).double()
    counted = targets != IGNORE_INDEX
    token_loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    token_correct = (logits.argmax(dim=-1) == targets) & counted
    return token_loss, token_correct


@pytest.mark.parametrize("chunk_size", [0, 1, 7, 16, 100])
@pytest.mark.parametrize("with_grad", [False, True])
def test_accuracy_and_per_token_values_match_the_full_logits(chunk_size, with_grad):
    """Chunk sizes that do not divide the 37 rows, ignored targets, exact ties in the logits
    (argmax takes the first maximal index, as ``Tensor.argmax`` does), with and without gradients."""
    torch.manual_seed(chunk_size)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=with_grad)
    weight = torch.randn(50, 16, dtype=torch.float64)
    weight[7] = weight[3]  # tokens 3 and 7 always tie
    weight.requires_grad_(with_grad)
    hidden.data[10] = hidden.data[11] = weight.data[3] * 5  # rows 10 and 11 predict 3 (= 7)
    targets = torch.randint(0, 50, (37,))
    targets[1::3] = (hidden @ weight.T).argmax(-1)[1::3]  # a third of the predictions are right
    targets[::5] = IGNORE_INDEX
    targets[10], targets[11] = 7, 3
    ref_loss, ref_correct = naive_statistics(hidden.detach(), weight.detach(), targets)
    assert ref_correct[11] and not ref_correct[10]
    with torch.set_grad_enabled(with_grad):
        out = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, count_correct=True, per_token=True)
    assert out.n_correct.item() == ref_correct.sum().item() > 5
    assert torch.equal(out.token_correct, ref_correct)
    torch.testing.assert_close(out.token_loss.double(), ref_loss, atol=1e-10, rtol=1e-10)
    assert out.token_loss[targets == IGNORE_INDEX].eq(0).all()
    torch.testing.assert_close(out.loss_sum, ref_loss.sum(), atol=1e-10, rtol=1e-10)
    assert out.token_loss.grad_fn is None and not out.token_loss.requires_grad
    if with_grad:  # the statistics leave the gradients alone
        out.loss_sum.backward()
        ref_w = weight.detach().clone().requires_grad_()
        reference(hidden.detach(), ref_w, targets).backward()
        torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-10, rtol=1e-10)


def test_accuracy_is_counted_by_default_only_without_gradients():
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    targets = torch.randint(0, 30, (20,))
    assert linear_cross_entropy(hidden, weight, targets, chunk_size=6).n_correct is None
    with torch.no_grad():
        counted = linear_cross_entropy(hidden, weight, targets, chunk_size=6).n_correct
    assert counted.item() == naive_statistics(hidden.detach(), weight, targets)[1].sum().item()
