"""Building blocks shared by the model and the mechanisms: rotary embeddings, norms, MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig


def mark_residual_projection(linear: nn.Linear) -> nn.Linear:
    """Flag a projection that writes into the residual stream: GPT-2 init scales its std by 1/sqrt(2L)."""
    linear.is_residual_projection = True  # type: ignore[attr-defined]
    return linear


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (rotate-half convention, as in GPT-NeoX and Llama).

    Mechanisms ask for the rotary dimension they need (MLA rotates only ``qk_rope_head_dim``
    channels), so tables are cached per ``(dim, device)`` and grown on demand. A static decoding
    step gives its position as a tensor (:meth:`rotate` with a 0-d ``start``): its angles are
    computed from the position with the tables' own float64 formula, so no table has to be grown
    (or looked up by a host integer) inside a compiled graph.
    """

    def __init__(self, theta: float = 10000.0):
        super().__init__()
        self.theta = theta
        self._tables: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def _table(self, dim: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dim, str(device))
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < length:
            size = max(length, 2 * table[0].shape[0] if table is not None else length)
            table = self._cos_sin(dim, torch.arange(size, device=device))
            self._tables[key] = table
        return table

    def _cos_sin(self, dim: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """float32 ``cos, sin`` ``(len(positions), dim)``, the angles computed in float64."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
        angles = positions.to(torch.float64)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()

    def cos_sin(self, dim: int, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(length, dim)`` for positions ``start..start+length``."""
        cos, sin = self._table(dim, start + length, device)
        return cos[start:start + length], sin[start:start + length]

    def rotate(self, x: Tensor, start: int | Tensor) -> Tensor:
        """Rotate ``x`` ``(..., T, D)`` whose time axis begins at absolute position ``start``: an
        int, or a 0-d integer tensor (static decoding steps; the same values as the tables)."""
        if isinstance(start, Tensor):
            cos, sin = self._cos_sin(x.shape[-1], start + torch.arange(x.shape[-2], device=start.device))
        else:
            cos, sin = self.cos_sin(x.shape[-1], start, x.shape[-2], x.device)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]`` over the last dim;
    ``cos, sin`` ``(T, D)`` with equal halves (:meth:`RotaryEmbedding.cos_sin`).

    With a gradient to track, eagerly, a custom autograd function that writes each half once (and
    its backward, the inverse rotation, likewise): autograd through the expression above runs a
    negation, a concatenation and its split, and zero-fills the halves' gradients before adding
    them. Without one (decoding, evaluation) the expression's five operations cost less than the
    function's own overhead on one token's few channels, and compiled graphs keep it too
    (inductor fuses it into one loop)."""
    if torch.compiler.is_compiling() or not (x.requires_grad and torch.is_grad_enabled()):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
    half = cos.shape[-1] // 2
    return _Rotation.apply(x, cos[..., :half], sin[..., :half])


def _rotate_halves(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """``[x1 cos - sign x2 sin, x2 cos + sign x1 sin]`` for the halves ``x1, x2`` of ``x`` ``(..., D)``
    and ``cos, sin`` ``(T, D / 2)``; ``sign = -1`` rotates back (the transpose). The result is laid
    out in the order of ``x``'s strides, as an elementwise operation's would be (a head-split view
    of a ``(B, T, H, D)`` projection stays ``(B, T, H, D)`` in memory)."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    order.remove(x.dim() - 1)  # the rotated channels stay innermost
    order.append(x.dim() - 1)
    out = x.new_empty([x.shape[d] for d in order]).permute([order.index(d) for d in range(x.dim())])
    half = x.shape[-1] // 2
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


class _Rotation(torch.autograd.Function):
    """:func:`apply_rotary` with ``cos, sin`` given as their first halves ``(T, D / 2)`` (no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate_halves(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_halves(grad, cos, sin, -1.0), None, None


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """Position-wise feed-forward: SwiGLU ``W2(silu(W1 x) * W3 x)`` or GELU ``W2 gelu(W1 x)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.d_ff
        if self.kind == "swiglu":
            # gate and up projections fused into one matmul
            self.up = nn.Linear(cfg.d_model, 2 * hidden, bias=cfg.bias)
        else:
            self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = mark_residual_projection(nn.Linear(hidden, cfg.d_model, bias=cfg.bias))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, T, C)``"""
        h = self.up(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)
