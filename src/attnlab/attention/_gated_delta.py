"""The gated delta rule (Yang, Kautz & Hatamizadeh, ICLR 2025) as plain tensor algorithms.

Per head, with a state ``S`` of shape ``(D_v, D_k)``, decay ``alpha_t = exp(g_t)`` and write
strength ``beta_t``::

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,        o_t = S_t (scale * q_t)

Three implementations of the same function, all taking ``q, k`` ``(B, H, T, D_k)``, ``v``
``(B, H, T, D_v)``, log-space decay ``g`` and ``beta`` ``(B, H, T)``, and an optional initial
state ``(B, H, D_v, D_k)``; all return ``o`` ``(B, H, T, D_v)`` and the final state:

* :func:`recurrent_gated_delta_rule`: one token at a time (the reference, and the decoding step);
* :func:`chunk_gated_delta_rule`: the chunked WY/UT form used for training, ``O(T)`` time and
  ``O(T * chunk)`` memory, with ``T / chunk`` sequential steps;
* :func:`fla_chunk_gated_delta_rule`: flash-linear-attention's Triton kernel (CUDA, 16-bit
  inputs), when the optional ``fla`` package is installed (:data:`FLA_AVAILABLE`).

Derivation of the chunked form. Write the update as ``S_t = alpha_t S_{t-1} + u_t k_t^T`` with
the *new value* ``u_t = beta_t (v_t - alpha_t S_{t-1} k_t)``. Inside a chunk starting from state
``S_0``, let ``gamma_t = g_1 + ... + g_t`` (so ``exp(gamma_t - gamma_s)`` is the decay from ``s``
to ``t``). Unrolling ``S_{t-1}`` gives a lower-triangular system for the rows ``u_t``::

    (I + A) U = beta * V - (beta * exp(gamma)) * K S_0^T,
    A[t, s] = beta_t exp(gamma_t - gamma_s) k_t . k_s   (s < t, else 0)

so ``U = U~ - W S_0^T`` with ``U~ = (I + A)^-1 (beta * V)`` and ``W = (I + A)^-1 (beta exp(gamma) * K)``
(the UT transform; one triangular solve for every chunk at once). Then, with the causal decay
mask ``M[t, s] = exp(gamma_t - gamma_s)`` for ``s <= t``::

    O   = (M * Q K^T) U~ + (exp(gamma) * Q - (M * Q K^T) W) S_0^T
    S_C = S_0 (exp(gamma_C) I - W^T E K) + U~^T E K,        E = diag(exp(gamma_C - gamma_t))

Only the last line is sequential over chunks: one ``(D_v, D_k) x (D_k, D_k)`` product per chunk.
Every exponent above is ``<= 0``, so nothing overflows however strong the decay.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import plain_kernels_only


def _load_fla_kernel():
    """flash-linear-attention's chunked kernel, or None. Versions before 0.2 read ``(B, H, T, D)``
    inputs by default (``head_first=True``, an argument later versions reject), so they are
    not used."""
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, or broken on this machine (no GPU driver for triton...)
        return None
    try:
        version = tuple(int(part) for part in fla.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return None
    return chunk_gated_delta_rule if version >= (0, 2) else None


_fla_chunk_gated_delta_rule = _load_fla_kernel()
#: Whether flash-linear-attention's kernel can be used (it also needs CUDA and 16-bit inputs).
FLA_AVAILABLE = _fla_chunk_gated_delta_rule is not None
#: Input dtypes every fla version >= 0.2 accepts (0.2 and 0.3 reject float32).
FLA_DTYPES = (torch.bfloat16, torch.float16)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@functools.lru_cache(maxsize=None)
def fla_backward_is_reliable(capability: tuple[int, int], triton_version: str) -> bool:
    """Whether fla's gated chunk backward is correct on a GPU of this compute capability.

    fla issue #640: Triton >= 3.4.0 and < 3.7.1 miscompiles the gated ``chunk_bwd_dqkwg`` kernel
    on Hopper (sm_90), per fla: fla 0.6 refuses to run it, earlier versions run it unchecked. On
    such machines training takes the pure-PyTorch chunked path and fla serves the no-grad
    forward (evaluation, prefill), which is unaffected. Checked on an H100 with Triton 3.6.0.
    """
    return not (capability[0] == 9 and (3, 4, 0) <= _version(triton_version) < (3, 7, 1))


def fla_usable(t: Tensor, needs_grad: bool) -> bool:
    """The kernel choice of the chunked rule: whether fla's kernel computes it for ``t`` (else
    :func:`chunk_gated_delta_rule`)."""
    if not (FLA_AVAILABLE and t.device.type == "cuda" and t.dtype in FLA_DTYPES):
        return False  # a Triton kernel for CUDA and 16-bit inputs, from the optional fla package
    if plain_kernels_only():
        return False  # FLOP counters cannot see Triton kernels (kernels.plain_kernels)
    if not needs_grad:
        return True  # the Triton miscompilation below affects only the gated backward
    import triton

    # the gated backward is miscompiled by some Triton versions on Hopper
    return fla_backward_is_reliable(torch.cuda.get_device_capability(t.device), triton.__version__)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dim (the same formula as fla's fused l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Accumulate in at least float32: the state sums thousands of rank-one updates."""
    return torch.promote_types(x.dtype, torch.float32)


def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step-by-step recurrence, ``O(T d^2)`` with a Python loop over ``T``: use it to decode.

    Shapes as in the module docstring; returns ``o`` ``(B, H, T, D_v)`` in ``v``'s dtype and the
    final state ``(B, H, D_v, D_k)`` in float32 (or float64 for float64 inputs)."""
    B, H, T, d_k = k.shape
    dtype = _compute_dtype(q)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, v.shape[-1], d_k))
    outputs = []
    for t in range(T):
        k_t = k[:, :, t]
        state = state * g[:, :, t, None, None].exp()
        # delta rule: move the value stored under k_t a fraction beta_t towards v_t
        new_value = beta[:, :, t, None] * (v[:, :, t] - (state @ k_t[..., None]).squeeze(-1))
        state = state + new_value[..., None] * k_t[..., None, :]
        outputs.append((state @ (scale * q[:, :, t, :, None])).squeeze(-1))
    return torch.stack(outputs, dim=2).to(v.dtype), state


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                           chunk_size: int = 64, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked (WY/UT) gated delta rule: equal to :func:`recurrent_gated_delta_rule`.

    ``O(T (C d + d^2))`` time and ``O(T C)`` memory for chunk size ``C``; ``T`` need not be a
    multiple of ``C``. Returns ``o`` ``(B, H, T, D_v)`` in ``v``'s dtype and the final state
    ``(B, H, D_v, D_k)`` in float32 (float64 for float64 inputs).
    """
    B, H, T, d_k = k.shape
    d_v = v.shape[-1]
    out_dtype = v.dtype
    dtype = _compute_dtype(q)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    C = chunk_size
    pad = -T % C
    if pad:
        # k = 0, beta = 0, g = 0 make a padded step the identity on the state (alpha = 1, no write);
        # the padded outputs are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    N = (T + pad) // C
    q = q.view(B, H, N, C, d_k) * scale
    k = k.view(B, H, N, C, d_k)
    v = v.view(B, H, N, C, d_v)
    beta = beta.view(B, H, N, C, 1)
    gamma = g.view(B, H, N, C).cumsum(-1)  # log decay from the chunk's start through t

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(gamma_t - gamma_s) for s <= t, 0 above the diagonal (masked before exp: no overflow)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    eye = torch.eye(C, dtype=dtype, device=q.device)
    # I + A, A strictly lower: how much each earlier new value is already stored under k_t
    system = eye + (beta * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([beta * v, beta * gamma.exp()[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_local, w = solved.split([d_v, d_k], dim=-1)  # U~ (.., C, D_v), W (.., C, D_k)

    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, C, C), causal
    o_local = scores @ u_local  # output of a chunk started from a zero state
    q_state = q * gamma.exp()[..., None] - scores @ w  # its output is q_state @ S_0^T

    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # E K
    write = u_local.transpose(-1, -2) @ k_to_end  # (B, H, N, D_v, D_k)
    transition = (gamma[..., -1, None, None].exp() * torch.eye(d_k, dtype=dtype, device=q.device)
                  - w.transpose(-1, -2) @ k_to_end)  # (B, H, N, D_k, D_k)

    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, d_v, d_k))
    starts = []
    for n in range(N):
        starts.append(state)
        state = torch.baddbmm(write[:, :, n].reshape(B * H, d_v, d_k), state.reshape(B * H, d_v, d_k),
                              transition[:, :, n].reshape(B * H, d_k, d_k)).view(B, H, d_v, d_k)
    start_states = torch.stack(starts, dim=2)  # (B, H, N, D_v, D_k): the state entering each chunk
    o = o_local + q_state @ start_states.transpose(-1, -2)
    return o.reshape(B, H, N * C, d_v)[:, :, :T].to(out_dtype), state


def fla_chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                               initial_state: Tensor | None = None,
                               output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """flash-linear-attention's chunked kernel behind this module's interface (CUDA only).

    fla takes ``(B, T, H, D)`` inputs, ``g`` in log space, post-sigmoid ``beta``, an explicit
    ``scale``, and states laid out ``(B, H, D_k, D_v)``; it does not L2-normalise unless asked
    (``use_qk_l2norm_in_kernel``), so ``q, k`` arrive normalised as on the other paths. Inputs
    share ``v``'s dtype, one of :data:`FLA_DTYPES` (under autocast ``q, k`` may come out of the
    norm in float32); ``g`` stays float32 as fla's gate cumsum expects.
    """
    if _fla_chunk_gated_delta_rule is None:
        raise RuntimeError("flash-linear-attention >= 0.2 (import name 'fla') is not installed")
    dtype = v.dtype
    to_bthd = lambda t: t.transpose(1, 2).to(dtype)  # noqa: E731
    o, final_state = _fla_chunk_gated_delta_rule(
        to_bthd(q), to_bthd(k), to_bthd(v), g.transpose(1, 2).float(), beta.transpose(1, 2).to(dtype),
        scale=scale,
        initial_state=None if initial_state is None else initial_state.transpose(-1, -2).float().contiguous(),
        output_final_state=output_final_state,
    )
    if final_state is not None:
        final_state = final_state.transpose(-1, -2)
    return o.transpose(1, 2), final_state
