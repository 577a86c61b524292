"""The benchmark's instruments: live-tensor peak memory, FLOP counting, matmul peak, timing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.profiling import (
    EXTRA_FLOP_FORMULAS,
    LiveTensorTracker,
    PeakMemoryProbe,
    count_flops,
    matmul_peak_gflops,
    state_tensors,
    summarize,
    time_calls,
    track_peak_bytes,
)

MiB = 2**20
FLOAT = 4  # bytes per float32


def test_peak_is_the_largest_live_set_not_the_sum():
    """1 MiB allocated and freed, then 2 MiB: the peak is 2 MiB, and nothing is left afterwards."""
    with LiveTensorTracker() as tracker:
        a = torch.empty(MiB // FLOAT)
        del a
        b = torch.empty(2 * MiB // FLOAT)
        del b
    assert tracker.peak == 2 * MiB
    assert tracker.current == 0


def test_tensors_alive_at_once_add_up():
    """Both operands of an addition are alive while its result is created: 3 x 1 MiB."""
    n = MiB // FLOAT
    with LiveTensorTracker() as tracker:
        torch.ones(n) + torch.ones(n)
    assert tracker.peak == 3 * MiB
    assert tracker.peak_op == "aten.add.Tensor"


def test_roots_count_from_the_start_and_views_share_their_base():
    param = torch.zeros(1024)  # 4 KiB alive before the measured code
    with LiveTensorTracker([param]) as tracker:
        assert tracker.baseline == 4096
        x = torch.empty(MiB // FLOAT)
        views = [x[::2], x.view(-1, 2), x.t() if x.dim() == 2 else x.unsqueeze(0)]
        y = views[0] * 1  # a real copy of half the elements: 0.5 MiB
    assert tracker.peak == 4096 + MiB + MiB // 2
    del x, views, y
    assert tracker.current == 4096  # the root is still alive


def test_peak_memory_probe_on_cpu_measures_live_tensor_bytes_from_its_roots():
    """The probe the benchmark uses: on CPU the live-tensor peak, roots included, with the op that set it."""
    param = torch.zeros(1024)  # 4 KiB
    n = MiB // FLOAT
    probe = PeakMemoryProbe(torch.device("cpu"))
    assert probe.measure(lambda: torch.ones(n) + torch.ones(n), [param]) == 4096 + 3 * MiB
    assert probe.method == "live_tensor_bytes" and probe.peak_op == "aten.add.Tensor"
    assert probe.measure(lambda: torch.empty(n), []) == MiB  # each measurement starts afresh


def test_tensors_created_before_the_mode_count_when_used():
    outside = torch.ones(MiB // FLOAT)
    peak = track_peak_bytes(lambda: outside.sum())
    assert peak == MiB + FLOAT


def test_backward_gradients_and_saved_tensors_are_counted():
    """A linear layer's step peaks in backward with weight, input (saved by the matmul) and the
    weight gradient alive, plus a few scalars; the output is not saved, so it is gone by then."""
    batch, d_in, d_out = 4, 256, 256
    weight = torch.randn(d_out, d_in, requires_grad=True)
    x = torch.randn(batch, d_in)

    def step():
        (x @ weight.t()).sum().backward()

    peak = track_peak_bytes(step, state_tensors(weight, x))
    expected = FLOAT * (2 * d_out * d_in + batch * d_in)
    assert expected <= peak <= expected + 64
    assert weight.grad is not None


def test_state_tensors_collects_parameters_gradients_and_optimizer_states():
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    tensors = state_tensors(model, optimizer)
    n_params = sum(p.numel() for p in model.parameters())
    # parameters + gradients + exp_avg + exp_avg_sq (and the step counters)
    assert sum(t.numel() for t in tensors if t.dim() > 0) == 4 * n_params


def test_flops_of_a_matmul():
    m, k, n = 32, 48, 64
    flops, by_op = count_flops(lambda: torch.randn(m, k) @ torch.randn(k, n))
    assert flops == 2 * m * n * k
    assert by_op == {"aten.mm": 2 * m * n * k}


def test_flops_of_sparse_products_count_stored_entries():
    """A CSR matrix with 5 stored entries of a 3 x 40 shape: a product with a 40 x 6 dense matrix
    is 5 multiply-adds per column, a sampled product (SDDMM) one dot product of length 7 per entry."""
    crow, col = torch.tensor([0, 2, 2, 5]), torch.tensor([1, 30, 0, 7, 39])
    sparse = torch.sparse_csr_tensor(crow, col, torch.randn(5), (3, 40))
    flops, by_op = count_flops(lambda: torch.sparse.mm(sparse, torch.randn(40, 6)))
    assert (flops, by_op) == (2 * 5 * 6, {"aten._sparse_addmm": 2 * 5 * 6})
    flops, by_op = count_flops(lambda: torch.sparse.sampled_addmm(sparse, torch.randn(3, 7), torch.randn(7, 40)))
    assert (flops, by_op) == (2 * 5 * 7, {"aten.sparse_sampled_addmm": 2 * 5 * 7})


def test_flops_of_in_place_and_out_matmuls():
    m, k, n, b = 8, 16, 32, 3
    acc, x, y = torch.zeros(m, n), torch.randn(m, k), torch.randn(k, n)
    flops, _ = count_flops(lambda: (acc.addmm_(x, y), torch.mm(x, y, out=acc)))
    assert flops == 2 * (2 * m * n * k)
    batched, bx, by = torch.zeros(b, m, n), torch.randn(b, m, k), torch.randn(b, k, n)
    flops, _ = count_flops(lambda: batched.baddbmm_(bx, by))
    assert flops == 2 * b * m * n * k


def test_flops_of_cpu_fused_attention_are_counted():
    """FlopCounterMode alone counts CPU flash attention as 0; ours counts QK^T and PV, and for a
    causal call only the triangle of T (T + 1) / 2 scores the kernel computes."""
    B, H, T, D = 2, 4, 32, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    flops, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * (2 * B * H * T * T * D)
    flops, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert flops == 2 * (2 * B * H * (T * (T + 1) // 2) * D)


@pytest.mark.parametrize("op_name", ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                     "_scaled_dot_product_cudnn_attention"])
def test_cuda_attention_formulas_take_grouped_kv_and_count_the_causal_triangle(op_name):
    """The CUDA kernels' formulas, fed shapes as FlopCounterMode feeds them (positional arguments in
    each kernel's own order): grouped K/V count as repeated to every query head, causal calls count
    T (T + 1) / 2 scores; the backward counts five matmuls (the recomputed scores, dP, dV, dQ, dK)."""
    B, H, H_kv, T, D = 2, 8, 2, 64, 16
    q, kv = (B, H, T, D), (B, H_kv, T, D)
    op = getattr(torch.ops.aten, op_name)
    forward = EXTRA_FLOP_FORMULAS[op]
    names = [a.name for a in op.default._schema.arguments]
    args = {"query": q, "key": kv, "value": kv, "attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0,
            "is_causal": True, "return_debug_mask": False}
    positional = [args[n] for n in names if n in args]
    assert forward(*positional, out_shape=q) == 2 * (2 * B * H * (T * (T + 1) // 2) * D)
    assert forward(q, kv, kv, out_shape=q) == 2 * (2 * B * H * T * T * D)  # defaults: not causal
    backward = EXTRA_FLOP_FORMULAS[getattr(torch.ops.aten, op_name + "_backward")]
    grad_name = "grad_out_" if "efficient" in op_name else "grad_out"
    assert backward(**{grad_name: q, "query": q, "key": kv, "value": kv, "is_causal": False}) == 5 * (2 * B * H * T * T * D)


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops(torch.float32, 128, repeats=2) > 0
    assert matmul_peak_gflops(torch.bfloat16, 128, repeats=2) > 0


def test_summarize_and_time_calls():
    stats = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert stats == {"median": 3.0, "min": 1.0, "max": 5.0, "iqr": 2.0}
    assert summarize([2.0])["iqr"] == 0.0
    calls = []
    seconds = time_calls(lambda: calls.append(1), warmup=2, repeats=3, device=torch.device("cpu"))
    assert len(calls) == 5 and len(seconds) == 3 and all(s >= 0 for s in seconds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tracker_agrees_with_the_cuda_allocator():
    weight = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    x = torch.randn(64, 1024, device="cuda")

    def step():
        (x @ weight.t()).relu().sum().backward()

    step()  # cuBLAS allocates its workspace on first use: keep it out of the comparison
    weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    allocator_peak = torch.cuda.max_memory_allocated() - base
    weight.grad = None
    tracked = track_peak_bytes(step, state_tensors(weight, x)) - FLOAT * (weight.numel() + x.numel())
    # the allocator rounds blocks up to 512 bytes
    assert abs(tracked - allocator_peak) <= 8 * 512


def test_flops_are_counted_on_the_plain_aten_paths():
    """Inside count_flops mechanisms skip Triton kernels (flex attention, fla), which
    FlopCounterMode cannot see; outside it they may use them."""
    from attnlab.attention.base import plain_kernels_only

    seen = []
    count_flops(lambda: seen.append(plain_kernels_only()))
    assert seen == [True] and not plain_kernels_only()
