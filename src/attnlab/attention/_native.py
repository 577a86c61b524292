"""C kernels for two CPU paths that PyTorch's operations leave slow, built on first use.

**The sparse mechanism's training path** (``csrc/selected.c``). PyTorch's CPU operations leave
DeepSeek-style sparse attention slower than dense attention: the ``topk`` of every indexer row
reads each score several times (about 13 ns per score at T=4,096), and the sparse CSR products
need the transposed selection sorted and permuted for the key and value gradients. These kernels
work row by row instead: :func:`select_chunk` scores a query's causal keys from the indexer's head
products and takes an exact radix top-k while the row is in cache; :func:`attention_forward` gives
each row's probabilities over its selected keys and the output in one pass;
:func:`attention_backward` and :func:`indexer_kl` read each selected key once for all of a
row's gradients, scattering the key-side ones into one table per thread (or per KV group) instead
of sorting. The file is compiled with the system C compiler (``$CC``, else ``cc``) and called
through ``ctypes``, which releases the GIL: every call splits its rows over
``torch.get_num_threads()`` Python threads, except :func:`select_chunk`, called for every few
dozen query rows, which spreads them over PyTorch's own OpenMP threads (a Python thread pool cost
tens of microseconds per call, and its threads competed for the cores with OpenMP's spinning ones).

**The static decoding step's attention** (``csrc/decode.c`` and ``csrc/decode_op.cpp``): one
token's queries over a pre-allocated cache, split over the keys (see the C file), registered as
the operator ``attnlab::decode_attention`` (C++, against PyTorch's headers, ``$CXX`` else ``c++``)
so that a ``torch.compile``'d step calls it from inside its graph: :func:`decode_attention`; the
same file exports both operators as AOTInductor C shims (:func:`decode_c_shims`), which the
compiled step's C++ wrapper calls directly.

Libraries are cached per source, compiler and CPU (and PyTorch version for the operator) under
``$XDG_CACHE_HOME/attnlab/native``, written atomically, so concurrent processes may race safely.
Where no compiler works, or with ``ATTNLAB_NATIVE=0``, :func:`available` / :func:`decode_available`
are False and the callers keep PyTorch's operations (the results agree to rounding; tests compare
both with naive references).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "selected.c"
#: ``-fassociative-math`` (with the flags it needs) lets the dot products vectorise; infinities,
#: which mark excluded positions, keep their meaning (no ``-ffast-math``).
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math"]

_i64, _f32 = ctypes.c_int64, ctypes.c_float
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "attention_forward": [_ptr] * 7 + [_i64] * 7 + [_f32, _i64, _i64],
    "attention_backward": [_ptr] * 10 + [_i64] * 7 + [_f32] + [_i64] * 4,
    "indexer_kl": [_ptr] * 12 + [_i64] * 6 + [_f32, _i64, _i64],
    "select_chunk": [_ptr] * 6 + [_i64] * 9,
}


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (hosts differ between runs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnlab" / "native"


def _cached_library(stem: str, key_parts: list[str], build: Callable[[Path], Path]) -> Path:
    """The library cached under a hash of ``key_parts`` (sources, flags, compiler versions) and the
    CPU; if absent, ``build(scratch)`` makes it in a scratch directory and it is moved into place
    (atomic: concurrent processes may race; a failed build leaves nothing behind)."""
    key = hashlib.sha256("\0".join([*key_parts, _cpu_signature()]).encode())
    target = _cache_dir() / f"{stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            os.replace(build(Path(scratch)), target)
    return target


def _shell(command: list[str]) -> str:
    """A compiler's standard output (raises with its standard error on failure)."""
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _compilers(variables: dict[str, str], fallback: str) -> list[str] | None:
    """The compilers named by these environment variables (else their defaults), or None (logged,
    saying what the ``fallback`` is) when ``ATTNLAB_NATIVE=0`` or one of them is not installed."""
    if os.environ.get("ATTNLAB_NATIVE", "1") == "0":
        return None
    compilers = [os.environ.get(variable) or default for variable, default in variables.items()]
    if missing := [c for c in compilers if shutil.which(c) is None]:
        log.warning("no compiler %s: %s", " / ".join(missing), fallback)
        return None
    return compilers


def _build(source: Path, flags: list[str], compiler: str) -> Path:
    """Compile ``source`` unless the cache holds it; return the library's path."""
    def build(scratch: Path) -> Path:
        _shell([compiler, *flags, str(source), "-o", str(scratch / "library.so")])
        return scratch / "library.so"

    return _cached_library(source.stem, [source.read_text(), " ".join(flags), _shell([compiler, "--version"])], build)


def _load(source: Path, flags: list[str], signatures: dict, restype, fallback: str) -> ctypes.CDLL | None:
    """``source`` built and loaded with its functions' signatures, or None (disabled, no compiler,
    or the build failed: logged, saying what the ``fallback`` is)."""
    if (compilers := _compilers({"CC": "cc"}, fallback)) is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(source, flags, compilers[0])))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("building %s failed, %s: %s", source.name, fallback, detail)
        return None
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = restype
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The sparse mechanism's compiled kernels (``csrc/selected.c``), or None."""
    # OpenMP (select_chunk's rows), resolved to the libgomp that PyTorch loaded: one thread team
    flags = [*FLAGS, "-fopenmp", f"-Wl,-rpath,{Path(torch.__file__).parent / 'lib'}"]
    return _load(SOURCE, flags, _SIGNATURES, None, "the sparse mechanism's CPU training path uses PyTorch operations")


def available() -> bool:
    return library() is not None


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process (``pid``): a forked child inherits the parent's pool without its threads."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attnlab-native")


def _ranges(n_rows: int, parts: int, first_cost: int = 1, cost_step: int = 0) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges of about equal cost, row ``r`` costing ``first_cost + cost_step * r``."""
    def rows_costing(goal: float) -> int:  # the smallest r whose rows 0..r-1 cost at least goal
        if cost_step == 0:
            return math.ceil(goal / first_cost)
        linear = first_cost - cost_step / 2
        return math.ceil((-linear + math.sqrt(linear * linear + 2 * cost_step * goal)) / cost_step)

    total = n_rows * first_cost + cost_step * n_rows * (n_rows - 1) / 2
    bounds = [0, *(min(n_rows, rows_costing(total * part / parts)) for part in range(1, parts)), n_rows]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _run(calls: list) -> None:
    """Run zero-argument callables, the first on this thread and the others on the pool."""
    if len(calls) == 1:
        calls[0]()
        return
    futures = [_pool(torch.get_num_threads(), os.getpid()).submit(call) for call in calls[1:]]
    calls[0]()
    for future in futures:
        future.result()


def _threads(n_rows: int) -> int:
    return max(1, min(torch.get_num_threads(), n_rows))


def _pointer(t: Tensor | None) -> int | None:
    """A kernel's optional array: the tensor's data, or NULL."""
    return None if t is None else t.data_ptr()


def _check(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.int32):
            raise ValueError(f"the native kernels take contiguous CPU float32/int32 tensors, not {t.dtype} "
                             f"on {t.device} (contiguous: {t.is_contiguous()})")


def _shape_args(queries: Tensor, table: Tensor, keys: Tensor, start: int) -> tuple[int, ...]:
    """``T, H, G, S, D, K, start`` for ``queries`` ``(B, T, H, *)``, ``table`` ``(B, S, G, D)`` and
    ``keys`` ``(B, T, K)``."""
    B, T, H = queries.shape[:3]
    _, S, G, D = table.shape
    return T, H, G, S, D, keys.shape[-1], start


def attention_forward(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, start: int, scale: float,
                      want_mean: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Softmax attention of ``q`` ``(B, T, H, D)`` over the selected keys of ``k, v`` ``(B, S, G, D)``
    (head ``h`` reads group ``h // (H / G)``), ``keys`` ``(B, T, K)`` int32, query ``t`` at position
    ``start + t``; entries after it are padding.

    Returns the probabilities ``(B, T, H, K)`` (0 on padding), the output ``(B, T, H, D)`` and, when
    ``want_mean``, the probabilities averaged over the heads ``(B, T, K)``. Each row's logits,
    softmax and weighted sum in one pass, rows split over the threads."""
    _check(q, k, v, keys)
    B, T, H, D = q.shape
    K = keys.shape[-1]
    p, out = q.new_empty(B, T, H, K), torch.empty_like(q)
    mean = q.new_empty(B, T, K) if want_mean else None
    args = _shape_args(q, k, keys, start)
    lib = library()
    _run([functools.partial(lib.attention_forward, q.data_ptr(), k.data_ptr(), v.data_ptr(), keys.data_ptr(),
                            p.data_ptr(), out.data_ptr(), _pointer(mean), *args, scale,
                            r0, r1) for r0, r1 in _ranges(B * T, _threads(B * T))])
    return p, out, mean


def attention_backward(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, start: int, probs: Tensor, grad_out: Tensor,
                       delta: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of softmax attention over the selected keys, one pass over each query's keys:
    ``q, grad_out`` ``(B, T, H, D)``, ``k, v`` ``(B, S, G, D)``, ``probs`` ``(B, T, H, K)``,
    ``delta`` ``(B, T, H)`` (``grad_out . out``) -> ``grad_q`` ``(B, T, H, D)``, ``grad_k, grad_v``
    ``(B, S, G, D)``.

    Threads take whole KV groups where there are enough (each writes its own slice of the key and
    value gradients: no per-thread tables, and each reads a share of the keys), else row ranges
    with one pair of gradient tables each (MQA)."""
    _check(q, k, v, keys, probs, grad_out, delta)
    B, T, H, _ = q.shape
    G = k.shape[2]
    threads, per_group = torch.get_num_threads(), H // G
    if G >= threads > 1 and G % threads == 0:
        groups = G // threads
        tasks = [(i * groups * per_group, (i + 1) * groups * per_group, 0, B * T, 0) for i in range(threads)]
    else:
        tasks = [(0, H, r0, r1, i) for i, (r0, r1) in enumerate(_ranges(B * T, _threads(B * T)))]
    grad_q = torch.empty_like(q)
    grad_kv = k.new_zeros(2, 1 + max(task[-1] for task in tasks), *k.shape)
    args = _shape_args(q, k, keys, start)
    lib = library()
    _run([functools.partial(lib.attention_backward, q.data_ptr(), k.data_ptr(), v.data_ptr(), keys.data_ptr(),
                            probs.data_ptr(), grad_out.data_ptr(), delta.data_ptr(), grad_q.data_ptr(),
                            grad_kv[0, table].data_ptr(), grad_kv[1, table].data_ptr(), *args, scale, h0, h1, r0, r1)
          for h0, h1, r0, r1, table in tasks])
    grad_k, grad_v = grad_kv.sum(1) if grad_kv.shape[1] > 1 else grad_kv[:, 0]
    return grad_q, grad_k, grad_v


def indexer_kl(scores: Tensor, target: Tensor, weights: Tensor, terms: Tensor, index_k: Tensor, index_q: Tensor,
               keys: Tensor, start: int, with_grad: bool = True
               ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The indexer's KL over each query's selected keys, mean over the ``R = B * T`` queries, and
    its gradients, in one pass over each row: the selected indexer ``scores`` ``(B, T, K)`` (any
    value on padding), the target probabilities ``(B, T, K)`` (zero on padding), the head
    ``weights`` ``(B, T, J)``, the ReLU ``terms`` ``(B, T, J, K)`` that make the scores,
    ``index_k`` ``(B, S, D)`` and ``index_q`` ``(B, T, J, D)``.

    Returns the loss (0-d) and, when ``with_grad``, its gradients with respect to the queries
    ``(B, T, J, D)``, the keys ``(B, S, D)`` and the head weights ``(B, T, J)``."""
    _check(scores, target, weights, terms, index_k, index_q, keys)
    B, T, J, D = index_q.shape
    S, K = index_k.shape[1], keys.shape[-1]
    loss_rows = scores.new_empty(B * T)
    parts = _ranges(B * T, _threads(B * T))
    scratch = scores.new_empty(len(parts), K)
    grad_q = grad_w = grad_k = None
    if with_grad:
        grad_q, grad_w = torch.empty_like(index_q), torch.empty_like(weights)
        grad_k = index_k.new_zeros(len(parts), *index_k.shape)
    lib = library()
    _run([functools.partial(lib.indexer_kl, scores.data_ptr(), target.data_ptr(), weights.data_ptr(),
                            terms.data_ptr(), index_k.data_ptr(), index_q.data_ptr(), keys.data_ptr(),
                            loss_rows.data_ptr(), _pointer(grad_w), _pointer(grad_q),
                            _pointer(None if grad_k is None else grad_k[i]), scratch[i].data_ptr(),
                            T, J, S, D, K, start, 1.0 / (B * T), r0, r1)
          for i, (r0, r1) in enumerate(parts)])
    loss = loss_rows.sum() / (B * T)
    if not with_grad:
        return loss, None
    return loss, (grad_q, grad_k.sum(0) if len(parts) > 1 else grad_k[0], grad_w)


def select_chunk(products: Tensor, weights: Tensor, first_count: int, top_k: int, keep_for_kl: bool,
                 into: tuple[Tensor, Tensor | None, Tensor | None] | None = None, row: int = 0,
                 scratch: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The lightning indexer's top-k for a chunk of ``n`` queries from its heads' products
    ``q_j . k`` ``(B, J, n, E)`` and head weights ``(B, n, J)``: the scores ``sum_j w_j ReLU(q_j . k)``
    of row ``t``'s causal positions ``s < first_count + t``, and their ``top_k`` highest, ties at
    the threshold going to the latest positions (``first_count > top_k``).

    Returns the positions ``(B, n, top_k)`` int32, ascending, and when ``keep_for_kl`` the scores
    ``(B, n, top_k)`` and ReLU terms ``(B, n, J, top_k)`` there. ``into``: write them instead into
    rows ``row..row+n`` of these contiguous ``(B, T', ...)`` tensors (a whole sequence's selection,
    filled chunk by chunk) and return those; the head weights are then the whole sequence's too,
    ``(B, T', J)``, read at the same rows. ``scratch``: int32 workspace of at least
    :func:`select_scratch_size` elements, reused across chunks. One row at a time: a row's product
    rows stay in cache from its scores to its terms, and no ``(n, E)`` score matrix is written;
    the rows run on PyTorch's OpenMP threads (``torch.get_num_threads()``)."""
    products, weights = products.float().contiguous(), weights.float().contiguous()
    B, J, n, E = products.shape
    assert top_k < first_count and first_count + n - 1 <= E
    if into is None:
        into = (torch.empty(B, n, top_k, dtype=torch.int32), products.new_empty(B, n, top_k) if keep_for_kl else None,
                products.new_empty(B, n, J, top_k) if keep_for_kl else None)
        row = 0
    keys, scores, terms = into
    _check(*(t for t in into if t is not None))
    assert keys.shape[0] == B and keys.shape[-1] == top_k and row + n <= keys.shape[1]
    assert weights.shape == (B, keys.shape[1], J), "head weights: one row per row of the outputs"
    assert (scores is None) == (terms is None) and (scores is not None or not keep_for_kl)
    threads = _threads(B * n)
    if scratch is None or scratch.numel() < select_scratch_size(E, threads):
        scratch = torch.empty(select_scratch_size(E, threads), dtype=torch.int32)
    library().select_chunk(products.data_ptr(), weights.data_ptr(), keys.data_ptr(),
                           _pointer(scores if keep_for_kl else None), _pointer(terms if keep_for_kl else None),
                           scratch.data_ptr(), B, n, E, J, first_count, top_k, keys.shape[1], row, threads)
    return keys, scores if keep_for_kl else None, terms if keep_for_kl else None


def select_scratch_size(max_keys: int, threads: int | None = None) -> int:
    """Elements of :func:`select_chunk`'s int32 workspace for rows of up to ``max_keys`` keys."""
    return 3 * max_keys * (threads or torch.get_num_threads())


# ----------------------------------------------------------------------------------- decoding

DECODE_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("decode.c", "decode_op.cpp")]
#: The C kernel's fixed buffers: query heads per KV head and value width.
DECODE_MAX_GROUP, DECODE_MAX_VALUE_DIM = 16, 256


def _build_decode(c_compiler: str, cxx_compiler: str) -> Path:
    """Compile ``decode.c`` (OpenMP: its blocks of keys go to PyTorch's own thread team, the same
    ``libgomp``) and link it with ``decode_op.cpp``, which registers it as the operator
    ``attnlab::decode_attention`` with PyTorch's dispatcher, so that a compiled decoding step calls
    it directly (an operator defined in Python would cost tens of microseconds per call)."""
    from torch.utils import cpp_extension

    c_flags = [*FLAGS, "-ffp-contract=fast", "-fopenmp"]  # fused multiply-adds (ISO C mode leaves them off)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    cxx_flags = ["-O2", "-std=c++17", "-fPIC", "-shared", abi, *(f"-I{d}" for d in cpp_extension.include_paths())]
    lib_dir = cpp_extension.library_paths()[0]
    link = [f"-L{lib_dir}", "-lc10", "-ltorch_cpu", "-fopenmp", f"-Wl,-rpath,{lib_dir}"]
    versions = [_shell([c, "--version"]) for c in (c_compiler, cxx_compiler)]

    def build(scratch: Path) -> Path:
        kernel, library = scratch / "decode.o", scratch / "decode.so"
        c_only = [flag for flag in c_flags if flag != "-shared"]
        _shell([c_compiler, *c_only, "-c", str(DECODE_SOURCES[0]), "-o", str(kernel)])
        _shell([cxx_compiler, *cxx_flags, str(DECODE_SOURCES[1]), str(kernel), *link, "-o", str(library)])
        return library

    key_parts = [*(source.read_text() for source in DECODE_SOURCES), " ".join(c_flags + cxx_flags), *versions,
                 torch.__version__]
    return _cached_library("decode", key_parts, build)


@functools.cache
def decode_available() -> bool:
    """Whether ``attnlab::decode_attention`` is loaded (built on first use; False, logged once,
    when disabled or when no C/C++ compiler or PyTorch's headers can build it)."""
    fallback = "the static decoding step attends with PyTorch's fused kernel"
    if (compilers := _compilers({"CC": "cc", "CXX": "c++"}, fallback)) is None:
        return False
    try:
        library_path = _build_decode(*compilers)
        # global symbols: the compiled steps' C++ wrappers link to its C shims (decode_c_shims) at load time
        ctypes.CDLL(str(library_path), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        torch.ops.load_library(library_path)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("building the decode kernel failed, %s: %s", fallback, detail)
        return False
    _register_decode_shape()
    return True


@functools.cache
def _register_decode_shape() -> None:
    """The operators' outputs for fake tensors, symbolic sizes kept (a cache length traced as
    dynamic stays dynamic). Once per process: a library loads only once."""
    @torch.library.register_fake("attnlab::decode_attention")
    def _attention_shape(q: Tensor, k: Tensor, v: Tensor, position: Tensor, scale: float) -> Tensor:
        return q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])

    @torch.library.register_fake("attnlab::decode_linear")
    def _linear_shape(x: Tensor, weight: Tensor, add: Tensor | None) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])


def decode_c_shims() -> dict:
    """``torch._inductor.config.aot_inductor.custom_ops_to_c_shims`` for the decoding operators:
    inductor's C++ wrapper then calls ``decode_op.cpp``'s C functions directly rather than through
    the boxed dispatcher (call :func:`decode_available` first)."""
    return {
        torch.ops.attnlab.decode_linear.default: [
            "AOTITorchError aoti_torch_cpu_decode_linear(AtenTensorHandle x, AtenTensorHandle weight, "
            "AtenTensorHandle* add, AtenTensorHandle* ret0)"],
        torch.ops.attnlab.decode_attention.default: [
            "AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, "
            "AtenTensorHandle v, AtenTensorHandle position, double scale, AtenTensorHandle* ret0)"],
    }


def decode_attention(q: Tensor, k: Tensor, v: Tensor, position: Tensor, scale: float) -> Tensor:
    """Softmax attention of one token's queries ``q`` ``(B, H, 1, D)`` over the slots
    ``0..min(position, S - 1)`` of the buffers ``k`` ``(B, H_kv, S, D)`` and ``v`` ``(B, H_kv, S, D_v)``
    (CPU float32; ``position`` a 0-d int64 tensor): ``(B, H, 1, D_v)``, query head ``h`` reading KV
    head ``h // (H / H_kv)``. Needs :func:`decode_available`; usable inside ``torch.compile``."""
    return torch.ops.attnlab.decode_attention(q, k, v, position, scale)


def decode_linear(x: Tensor, weight: Tensor, add: Tensor | None = None) -> Tensor:
    """``x`` ``(M, K)`` times ``weight`` ``(N, K)`` transposed, plus ``add`` ``(N)`` or ``(M, N)``:
    ``(M, N)``, CPU float32, for the few rows of a decoding step (see :mod:`attnlab.decode_passes`)."""
    return torch.ops.attnlab.decode_linear(x, weight, add)
