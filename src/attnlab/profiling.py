"""Measuring instruments for the benchmark: peak memory, FLOP counts, timing, the machine.

* :class:`LiveTensorTracker` follows every tensor storage that ATen ops create or touch and
  keeps the running sum of their bytes, so the peak of live tensor bytes during a CPU training
  step can be measured without an allocator statistic (CUDA has ``max_memory_allocated``);
  :class:`PeakMemoryProbe` measures a peak with whichever of the two the device has.
* :func:`count_flops` wraps ``torch.utils.flop_counter.FlopCounterMode``, adding the CPU fused
  attention kernels it does not know (it would count their FLOPs as zero).
* :func:`matmul_peak_gflops` measures the machine's GEMM rate, the denominator of MFU;
  :func:`machine_info` describes the machine a measurement ran on, with those peaks.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# ----------------------------------------------------------------------------------- memory


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages while the mode is active.

    Every storage an ATen op produces (or receives, if not seen before) is counted once, keyed by
    its data pointer, so views share their base's bytes; a ``weakref.finalize`` on the untyped
    storage subtracts it when it is freed. ``roots`` are tensors alive before the mode starts
    (parameters, gradients, optimizer states): they count from the start.

    What it cannot see: scratch buffers a kernel allocates and frees internally (e.g. inside a
    fused attention kernel) and allocator fragmentation. It measures what the program keeps
    alive, not what the allocator reserves.
    """

    def __init__(self, roots: Iterable[Tensor] = ()):
        super().__init__()
        self._live: dict[int, int] = {}  # data pointer -> bytes
        self.current = 0
        self.peak = 0
        #: The ATen op whose output set the peak (where to look when reducing it).
        self.peak_op: str | None = None
        self._op: str | None = None
        for tensor in roots:
            self._track(tensor)
        self.baseline = self.current

    def _track(self, tensor: Any) -> None:
        if not isinstance(tensor, Tensor) or tensor.is_meta or tensor.layout != torch.strided:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a real storage
            return
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._live:
            return
        self._live[ptr] = nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, self._op
        weakref.finalize(storage, self._release, ptr)

    def _release(self, ptr: int) -> None:
        nbytes = self._live.pop(ptr, 0)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # inputs first: a tensor created before the mode (and not among the roots) is alive now
        for value in tree_flatten((args, kwargs))[0]:
            self._track(value)
        out = func(*args, **kwargs)
        self._op = str(func)
        for value in tree_flatten(out)[0]:
            self._track(value)
        self._op = None
        return out


def track_peak_bytes(fn: Callable[[], Any], roots: Iterable[Tensor] = ()) -> int:
    """Run ``fn()`` and return the peak of live tensor bytes (``roots`` counted from the start)."""
    with LiveTensorTracker(roots) as tracker:
        fn()
    return tracker.peak


def state_tensors(*objects: Any) -> list[Tensor]:
    """The tensors a training step keeps alive: parameters, buffers and gradients of modules,
    and the states of optimizers (``torch.optim.Optimizer``)."""
    found: list[Tensor] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                found.append(p)
                if p.grad is not None:
                    found.append(p.grad)
            found.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                found.extend(v for v in state.values() if isinstance(v, Tensor))
        elif isinstance(obj, Tensor):
            found.append(obj)
    return found


class PeakMemoryProbe:
    """Peak memory of the code between :meth:`start` and :meth:`stop`, in bytes.

    CUDA: the caching allocator's peak of allocated bytes. CPU: the peak of live tensor bytes,
    ``roots`` (tensors alive before, e.g. parameters and optimizer states) included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tracker: LiveTensorTracker | None = None
        #: CPU only: the ATen op whose output reached the peak.
        self.peak_op: str | None = None

    @property
    def method(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "live_tensor_bytes"

    def start(self, roots: list[Tensor]) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracker = LiveTensorTracker(roots)
            self.tracker.__enter__()

    def stop(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        assert self.tracker is not None
        self.tracker.__exit__(None, None, None)
        peak, self.peak_op, self.tracker = self.tracker.peak, self.tracker.peak_op, None
        return int(peak)

    def measure(self, fn: Callable[[], Any], roots: list[Tensor]) -> int:
        self.start(roots)
        try:
            fn()
        finally:
            peak = self.stop()
        return peak


# ----------------------------------------------------------------------------------- FLOPs

_aten = torch.ops.aten


def _causal_fraction(query_shape, key_shape, is_causal: bool) -> float:
    """Share of the ``T x S`` score matrix a causal kernel computes: ``(T + 1) / (2 T)`` when the
    queries are the last ``T`` of ``S`` keys and ``T == S`` (the fused causal kernels skip the rest)."""
    T, S = query_shape[-2], key_shape[-2]
    return (T + 1) / (2 * T) if is_causal and T == S else 1.0


def _attention_flop_formula(packet: Any, backward: bool) -> Callable[..., int]:
    """FLOP formula of one fused attention op, its arguments bound by name from the op's schema
    (each kernel orders them differently). Grouped K/V (``enable_gqa``: fewer key/value heads than
    query heads) count as if repeated to every query head, which is what the kernel computes;
    causal calls count the triangle."""
    arguments = packet.default._schema.arguments
    names = [a.name for a in arguments]
    defaults = {a.name: a.default_value for a in arguments if a.has_default_value()}

    def formula(*args, out_shape=None, **kwargs) -> int:
        bound = {**defaults, **dict(zip(names, args)), **kwargs}
        q, k, v = bound["query"], bound["key"], bound["value"]
        k = (*k[:-3], q[-3], *k[-2:])
        v = (*v[:-3], q[-3], *v[-2:])
        if backward:
            grad_out = bound["grad_out"] if "grad_out" in bound else bound["grad_out_"]
            flops = sdpa_backward_flop_count(grad_out, q, k, v)
        else:
            flops = sdpa_flop_count(q, k, v)
        return round(flops * _causal_fraction(q, k, bool(bound.get("is_causal", False))))

    return formula


def _addmm_inplace_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = mat1_shape
    return 2 * m * k * mat2_shape[1]


def _baddbmm_inplace_flops(self_shape, batch1_shape, batch2_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = batch1_shape
    return 2 * b * m * k * batch2_shape[2]


def _sparse_times_dense_flops(self, mat1, mat2, *args, out_val=None, **kwargs) -> int:
    """``_sparse_addmm(self, sparse, dense)``: one multiply-add per stored entry and dense column."""
    return 2 * mat1._nnz() * mat2.shape[-1]


def _sampled_addmm_flops(self, mat1, mat2, *args, out_val=None, **kwargs) -> int:
    """``sparse_sampled_addmm(pattern, a, b)`` (SDDMM): one dot product of length ``a.shape[-1]`` per stored entry."""
    return 2 * self._nnz() * mat1.shape[-1]


# sparse operands: the formulas read the number of stored entries, not just shapes
_sparse_times_dense_flops._get_raw = True  # type: ignore[attr-defined]
_sampled_addmm_flops._get_raw = True  # type: ignore[attr-defined]


#: Formulas that replace or extend FlopCounterMode's: the fused attention kernels (torch has none
#: for the CPU kernel, so it would count CPU attention as 0 FLOPs, and its CUDA formulas reject
#: grouped K/V and ignore causality), the in-place accumulating matmuls (``grad.addmm_(a, b)``)
#: and the sparse CSR products of sparse attention (which it does not count).
_FUSED_ATTENTION_OPS = [
    f"_scaled_dot_product_{kernel}{suffix}"
    for kernel in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention")
    for suffix in ("", "_backward")
]
EXTRA_FLOP_FORMULAS = {
    **{getattr(_aten, name): _attention_flop_formula(getattr(_aten, name), name.endswith("_backward"))
       for name in _FUSED_ATTENTION_OPS if hasattr(_aten, name)},
    _aten.addmm_: _addmm_inplace_flops,
    _aten.baddbmm_: _baddbmm_inplace_flops,
    _aten._sparse_addmm: _sparse_times_dense_flops,
    _aten.sparse_sampled_addmm: _sampled_addmm_flops,
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs executed by ``fn()`` (matmuls, convolutions, attention kernels), and their split by op.

    These are the FLOPs of the operations the implementation runs: fused causal attention counts
    the triangle it computes, a mechanism that computes a dense masked product counts all of it.
    Elementwise work is not counted. Mechanisms run their ATen paths while counting
    (:func:`~attnlab.attention.base.plain_kernels`): FlopCounterMode cannot see Triton kernels
    (flash-linear-attention, compiled flex attention), so on CUDA the count is that of the
    equivalent PyTorch path (the blocked band for sliding windows, the chunked delta rule)."""
    from attnlab.attention.base import plain_kernels

    with plain_kernels(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


# ----------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and the interquartile range of ``values``."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "iqr": q3 - q1}


def matmul_peak_gflops(dtype: torch.dtype, size: int, device: torch.device | str = "cpu", warmup: int = 2,
                       repeats: int = 5) -> float:
    """GFLOP/s of ``size x size`` GEMMs in ``dtype`` (median of ``repeats``): ``2 * size**3`` FLOPs each."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = time_calls(lambda: torch.mm(a, b, out=out), warmup, repeats, device)
    return 2 * size**3 / statistics.median(seconds) / 1e9


# ----------------------------------------------------------------------------------- the machine


def describe_error(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (at most 500 characters), how a failed measurement
    is recorded."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"[:500]


def set_threads(threads: int | None) -> int:
    """Intra-op CPU threads: ``threads``, or every core this process may run on."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or available)
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, matmul_size: int | None = None, matmul_repeats: int = 5) -> dict[str, Any]:
    """Device, software and the measured fp32 / bf16 GEMM peaks (GFLOP/s) of ``matmul_size``
    square matrices (null: 1024 on cpu, 8192 on cuda)."""
    size = matmul_size or (8192 if device.type == "cuda" else 1024)
    peaks: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        try:
            peaks[name] = matmul_peak_gflops(dtype, size, device, repeats=matmul_repeats)
        except Exception as exc:  # e.g. no bf16 GEMM on this device
            peaks[name], errors[name] = None, describe_error(exc)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "matmul_size": size,
        "matmul_peak_gflops": peaks,
    }
    if errors:
        info["matmul_peak_errors"] = errors
    return info
