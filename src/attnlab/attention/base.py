"""The contract every attention mechanism implements.

A mechanism is an :class:`Attention` subclass with a nested ``Config`` dataclass, registered
under a name with :func:`attnlab.attention.register_attention`. The model only ever sees this
interface:

* ``forward(x, ctx, cache=None) -> y`` with ``x, y`` of shape ``(B, T, C)``;
* ``ctx`` (:class:`AttentionContext`) carries positions, the rotary table, the attention's
  structure (causal or bidirectional, a memory to cross-attend to, a key padding mask; the GPT
  model always passes plain causal self-attention), and the two side channels: auxiliary losses
  (added to the task loss by the LightningModule) and statistics (read by callbacks, recorded
  only when asked for);
* ``init_cache(...)`` returns an :class:`AttentionCache` holding what the mechanism keeps per
  token (or its recurrent state) for decoding; ``cache_bytes(...)`` is its closed form, which
  the tests compare with the bytes actually held;
* ``decode_step(x, ctx, cache)`` (optional) decodes one token per sequence at a position given as
  a tensor, with the same shapes at every position, so that ``torch.compile`` compiles the
  model's step once (:meth:`attnlab.model.GPT.static_step`);
* the class attributes ``supports_bidirectional``, ``supports_cross_attention`` and
  ``supports_key_padding`` declare which structures besides causal self-attention it computes
  (:meth:`Attention.structure_issue`); the factory (:func:`attnlab.attention.build`) refuses the
  others and the registry's contract tests check the declared ones against references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.layers import mark_residual_projection  # noqa: F401 - re-exported for mechanisms

# plain_kernels, plain_kernels_only: re-exported, profiling and extensions import them from here
from . import _native
from .kernels import plain_kernels, plain_kernels_only, plan_sdpa, sdpa_backends, use_native_decode  # noqa: F401

if TYPE_CHECKING:
    from attnlab.layers import RotaryEmbedding


@dataclass
class AttentionConfig:
    """Options common to all mechanisms. Subclasses add their own fields with defaults."""

    name: str = ""

    def validate(self, model: ModelConfig, field: str) -> None:
        """Cross-check against the model's dimensions; raise ``ConfigError`` naming ``field.<option>``."""


class AttentionContext:
    """What one forward pass shares with every attention layer.

    ``start_pos`` is the absolute position of ``x[:, 0]`` (non-zero while decoding with a cache):
    an int, or in :meth:`Attention.decode_step` a 0-d int64 tensor on the model's device (which
    ``RotaryEmbedding.rotate`` accepts too). ``step`` is the optimizer step during training
    (``None`` otherwise), for mechanisms whose behaviour changes with training progress (the
    sparse indexer's warm-up). Aux losses are summed over layers by name; statistics are stored per layer under
    ``"<scope>/<name>"`` and only when ``record_stats`` was requested, so they cost nothing in
    ordinary steps.

    The attention's structure (only what :attr:`Attention.supports_bidirectional` and its
    siblings declare; the GPT model leaves all three at their defaults, :attr:`plain`):

    * ``causal``: False lets every query see every key (bidirectional; never with a cache);
    * ``memory`` ``(B, S, C)``: cross-attention, queries from ``x`` and keys and values from
      ``memory`` (its own length, no rotary positions, never causal, never with a cache);
    * ``key_padding_mask`` ``(B, S)`` bool, True for a real token: keys at False positions are
      never attended to. It covers the key positions: the memory's for cross-attention, else
      ``0 .. start_pos + T`` (with a cache, the cached positions first; longer masks are cut).
    """

    def __init__(self, rope: RotaryEmbedding | None, start_pos: int | Tensor = 0, record_stats: bool = False,
                 *, _aux: dict | None = None, _stats: dict | None = None, _prefix: str = "",
                 training: bool = False, token_ids: Tensor | None = None, step: int | None = None,
                 _visible: list | None = None, causal: bool = True, memory: Tensor | None = None,
                 key_padding_mask: Tensor | None = None):
        self.rope = rope
        self.start_pos = start_pos
        self.step = step
        self.causal = causal
        self.memory = memory
        self.key_padding_mask = key_padding_mask
        self._visible: list[tuple[int, Tensor]] = [] if _visible is None else _visible
        self.aux_losses: dict[str, Tensor] = {} if _aux is None else _aux
        self.stats: dict[str, Tensor] | None = ({} if record_stats else None) if _stats is None else _stats
        self.prefix = _prefix
        self.training = training
        # (B, T) input token ids, for statistics that relate routing to tokens.
        self.token_ids = token_ids

    @property
    def recording(self) -> bool:
        return self.stats is not None

    def scope(self, name: str) -> AttentionContext:
        """A view whose statistics are stored under ``<prefix><name>/`` (aux losses stay shared)."""
        return AttentionContext(self.rope, self.start_pos, _aux=self.aux_losses,
                                _stats=self.stats, _prefix=f"{self.prefix}{name}/",
                                training=self.training, token_ids=self.token_ids, step=self.step,
                                _visible=self._visible, causal=self.causal, memory=self.memory,
                                key_padding_mask=self.key_padding_mask)

    @property
    def plain(self) -> bool:
        """Causal self-attention without padding: what the GPT model runs, on the fused causal paths."""
        return self.causal and self.memory is None and self.key_padding_mask is None

    def real_queries(self, q_len: int) -> Tensor | None:
        """``(B, q_len)`` bool: which of this call's tokens (positions ``start_pos ..``) are real
        under the key padding mask of a self-attention; None when all are (no mask, or the mask
        covers a cross-attention's memory). Routers average their losses and statistics over these."""
        if self.key_padding_mask is None or self.memory is not None:
            return None
        return self.key_padding_mask[:, self.start_pos:self.start_pos + q_len]

    def attention_mask(self, q_len: int, k_len: int, start: int, device: torch.device | str,
                       key_start: int = 0) -> Tensor | None:
        """Boolean mask broadcastable to ``(B, H, q_len, k_len)``, True where a query may see a key,
        for queries at positions ``start .. start+q_len`` over keys at ``key_start .. key_start+k_len``
        (memory rows for cross-attention): causal unless bidirectional or cross-attention, and only
        real keys under a key padding mask. None: every key is visible."""
        mask = None
        if self.causal and self.memory is None:
            mask = causal_mask(q_len, k_len, start - key_start, device)
        if self.key_padding_mask is not None:
            keys = self.key_padding_mask[:, key_start:key_start + k_len]
            keys = keys.view(keys.shape[0], 1, 1, k_len)
            mask = keys if mask is None else mask & keys
        return mask

    def visible(self, length: int) -> Tensor:
        """In a static step: the boolean ``(1, 1, 1, length)`` mask of the slots ``0..start_pos`` of
        a pre-allocated buffer, the ones written so far (a rolling buffer's slot ``s`` holds a
        position ``<= start_pos`` exactly when ``s <= start_pos`` too). Built once per step and
        length, shared by every layer. (Looked up by comparing lengths, not hashing them: in a graph
        compiled for any cache length the length is symbolic, and hashing would specialise it.)"""
        for known, mask in self._visible:
            if known == length:
                return mask
        mask = (torch.arange(length, device=self.start_pos.device) <= self.start_pos).view(1, 1, 1, length)
        self._visible.append((length, mask))
        return mask

    def add_aux_loss(self, name: str, value: Tensor) -> None:
        """Add an (already weighted) auxiliary loss; it reaches the total training loss."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value
        self.record(f"aux/{name}", value)

    def record(self, name: str, value: Tensor) -> None:
        if self.stats is not None:
            self.stats[f"{self.prefix}{name}"] = value.detach()


class AttentionCache:
    """Decoding state of one attention layer for a batch of sequences.

    Subclasses store tensors as attributes; :meth:`nbytes` counts every tensor they hold, so
    the reported size is measured, not computed.
    """

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        for value in vars(self).values():
            if isinstance(value, Tensor):
                found.append(value)
            elif isinstance(value, AttentionCache):
                found.extend(value.tensors())
            elif isinstance(value, (list, tuple, dict)):
                items = value.values() if isinstance(value, dict) else value
                for item in items:
                    if isinstance(item, Tensor):
                        found.append(item)
                    elif isinstance(item, AttentionCache):
                        found.extend(item.tensors())
        return found

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class EmptyCache(AttentionCache):
    """For mechanisms that keep nothing between tokens."""


class KVCache(AttentionCache):
    """Pre-allocated keys and values: ``k`` ``(B, H_kv, S_max, D_k)``, ``v`` ``(B, H_kv, S_max, D_v)``."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, k_dim: int, v_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype):
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, k_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, n_kv_heads, max_len, v_dim, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``(B, H_kv, T, D)`` at positions ``start..start+T`` and return all keys and
        values seen so far, ``(B, H_kv, start+T, D)``."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def update_at(self, k: Tensor, v: Tensor, position: Tensor) -> tuple[Tensor, Tensor]:
        """Static step: write one token's ``k, v`` ``(B, H_kv, 1, D)`` at the 0-d tensor ``position``;
        return the whole buffers ``(B, H_kv, S_max, D)`` (mask them with ``ctx.visible(S_max)``)."""
        index = position.view(1)
        # (under autocast the new rows may be 16-bit while the cache keeps its own dtype)
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))
        return self.k, self.v


def causal_mask(q_len: int, k_len: int, start: int, device: torch.device | str) -> Tensor:
    """Boolean ``(q_len, k_len)`` mask, True where query ``start+i`` may see key ``j`` (``j <= start+i``)."""
    q_pos = torch.arange(start, start + q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def token_mean(values: Tensor, real: Tensor | None) -> Tensor:
    """Mean of ``values`` ``(B, T, ...)`` over the batch and token axes, over the ``real`` ``(B, T)``
    tokens only when given: ``(...)``."""
    if real is None:
        return values.mean(dim=(0, 1))
    weights = real.to(values.dtype).view(*real.shape, *([1] * (values.dim() - 2)))
    return (values * weights).sum(dim=(0, 1)) / weights.sum().clamp_min(1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q`` ``(B, H, T, D)`` and ``k, v`` ``(B, H_kv, S, D_k|D_v)``,
    query head ``h`` reading KV head ``h // (H / H_kv)``: ``(B, H, T, D_v)``.

    ``scaled_dot_product_attention`` on the fused kernels, fed as
    :func:`~attnlab.attention.kernels.plan_sdpa` decides (packed query rows, repeated or grouped
    K/V heads, zero-padded narrow values) with the CUDA kernels of
    :func:`~attnlab.attention.kernels.sdpa_backends`; every plan computes the same function.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    B, H, T, D = q.shape
    H_kv, v_dim = k.shape[1], v.shape[-1]
    plan = plan_sdpa(q, k, v, attn_mask)
    if plan.grouping == "pack_rows":
        q = q.reshape(B, H_kv, H // H_kv, D)
    elif plan.grouping == "repeat_kv":
        k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    if plan.pad_values:
        v = F.pad(v, (0, D - v_dim))
    with sdpa_backends(q.device):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                           scale=scale, enable_gqa=plan.grouping == "enable_gqa")
    if plan.pad_values:
        y = y[..., :v_dim]
    return y.reshape(B, H, T, v_dim) if plan.grouping == "pack_rows" else y


def sdpa_static(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, scale: float | None = None) -> Tensor:
    """The static decoding step's attention: one token's ``q`` ``(B, H, 1, D)`` over whole buffers
    ``k, v`` ``(B, H_kv, S, D|D_v)`` whose slots ``0..ctx.start_pos`` (all ``S`` once that many are
    written) are the visible keys (:meth:`AttentionContext.visible`): ``(B, H, 1, D_v)``.

    On CPU in float32 without gradients the C kernel ``_native.decode_attention`` reads the written
    slots only; elsewhere SDPA over the whole buffers under the visibility mask (same function)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if use_native_decode(q, k, v):
        return _native.decode_attention(q, k, v, ctx.start_pos, scale)
    return sdpa(q, k, v, attn_mask=ctx.visible(k.shape[2]), scale=scale)


def sdpa_causal(q: Tensor, k: Tensor, v: Tensor, start: int, dropout_p: float = 0.0,
                scale: float | None = None) -> Tensor:
    """Causal softmax attention of ``q`` ``(B, H, T, D)`` over ``k, v`` ``(B, H_kv, S, D)``.

    The last ``T`` keys sit at the queries' positions (``S = start + T``). Uses the fused causal
    kernel without a cache, a single unmasked row when decoding one token, and an explicit mask
    for a chunked prefill.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    if start == 0 and q_len == k_len:
        return sdpa(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    if q_len == 1:
        return sdpa(q, k, v, dropout_p=dropout_p, scale=scale)
    return sdpa(q, k, v, attn_mask=causal_mask(q_len, k_len, start, q.device), dropout_p=dropout_p, scale=scale)


def sdpa_in_context(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, start: int, dropout_p: float = 0.0,
                    scale: float | None = None, key_start: int = 0) -> Tensor:
    """Softmax attention of ``q`` ``(B, H, T, D)`` (positions ``start..start+T``) over ``k, v``
    ``(B, H_kv, S, D)`` (positions ``key_start..key_start+S``, or memory rows) under ``ctx``'s
    structure. Plain causal self-attention takes :func:`sdpa_causal`'s fused paths unchanged; the
    other structures one explicit mask (a query that sees no key gets zeros: SDPA's rule for rows
    without a visible key)."""
    if ctx.plain:
        return sdpa_causal(q, k, v, start - key_start, dropout_p=dropout_p, scale=scale)
    mask = ctx.attention_mask(q.shape[2], k.shape[2], start, q.device, key_start)
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


#: The attention structures beyond causal self-attention a mechanism may declare.
STRUCTURES = ("bidirectional", "cross_attention", "key_padding")


class ModelCache:
    """Decoding state of a stack of layers (a whole model, or one layer built with
    :func:`attnlab.attention.build`): one :class:`AttentionCache` per layer and the position,
    twice: ``pos`` on the host (limits, eager calls) and ``position``, the same number as a 0-d
    int64 tensor on the device, which static steps read so that a compiled step never sees a
    changing Python integer."""

    def __init__(self, layers: list[AttentionCache], max_len: int, device: torch.device | str | None = None):
        self.layers = layers
        self.max_len = max_len
        self.pos = 0
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._static_addresses = False

    def advance(self, n: int) -> None:
        """Move both positions ``n`` tokens on (after the tokens' state was written)."""
        self.pos += n
        self.position.fill_(self.pos)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def mark_static_addresses(self) -> None:
        """Tell ``torch.compile`` that the state tensors keep their addresses between steps, so
        CUDA graphs write them in place instead of copying them into graph-owned inputs."""
        if not self._static_addresses:
            for tensor in [self.position, *(t for layer in self.layers for t in layer.tensors())]:
                torch._dynamo.mark_static_address(tensor)
            self._static_addresses = True


@dataclass(frozen=True)
class ParameterGroupHint:
    """Parameters of a mechanism that train with their own learning rate: ``lr_multiplier`` times
    the run's (and its schedule's). The optimizer gives them a group of their own per ``name`` and
    multiplier, split by the same weight-decay rule as every other parameter."""

    name: str
    params: tuple[nn.Parameter, ...]
    lr_multiplier: float = 1.0


class Attention(nn.Module):
    """Base class of all token-mixing mechanisms. See the module docstring for the contract."""

    Config: ClassVar[type[AttentionConfig]] = AttentionConfig
    #: Whether the mechanism applies rotary embeddings itself (the model passes ``ctx.rope``).
    uses_rope: ClassVar[bool] = True
    #: ``ctx.causal=False``: every query sees every key (the mechanism's bidirectional form).
    supports_bidirectional: ClassVar[bool] = False
    #: ``ctx.memory``: queries from ``x``, keys and values from the memory.
    supports_cross_attention: ClassVar[bool] = False
    #: ``ctx.key_padding_mask``: keys at padded positions never change a real token's output,
    #: with and without a cache.
    supports_key_padding: ClassVar[bool] = False
    #: Why an undeclared structure is not supported (structure name -> reason), for error messages.
    unsupported_reasons: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: AttentionConfig, model: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.d_model = model.d_model
        self.n_heads = model.n_heads
        self.head_dim = model.head_dim
        self.attn_dropout = model.attn_dropout
        self.bias = model.bias
        self.layer_idx = layer_idx

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``x`` ``(B, T, C)`` -> ``(B, T, C)``. With ``cache``, ``x`` continues the cached sequence
        at position ``ctx.start_pos`` and the cache is updated in place."""
        raise NotImplementedError

    def init_cache(self, batch_size: int, max_len: int, device: torch.device | str | None,
                   dtype: torch.dtype) -> AttentionCache:
        """An empty decoding state able to hold ``max_len`` positions."""
        raise NotImplementedError

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        """Closed form of the bytes :meth:`init_cache` holds for ``context_len`` positions."""
        raise NotImplementedError

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """One token per sequence, ``x`` ``(B, 1, C)`` -> ``(B, 1, C)``, at position ``ctx.start_pos``,
        a 0-d int64 tensor: the same result as :meth:`forward` with that cache, but with the same
        shapes and the same Python control flow at every position (write the state at the tensor
        position, read whole pre-allocated buffers under a mask, no host synchronisation), so a
        compiled step is traced once. Inference only: no dropout, aux losses or statistics."""
        raise NotImplementedError(f"{type(self).__name__} has no static decoding step")

    def decode_step_unsupported(self) -> str | None:
        """Why :meth:`decode_step` cannot decode this layer, or None when it can."""
        if type(self).decode_step is Attention.decode_step:
            return f"{type(self).__name__} implements no decode_step"
        return None

    def structure_issue(self, structure: str) -> str | None:
        """Why this layer cannot compute ``structure`` (one of :data:`STRUCTURES`), or None when it
        can: the class's declaration (mixtures also ask their branches)."""
        if getattr(self, f"supports_{structure}"):
            return None
        return self.unsupported_reasons.get(structure, f"{type(self).__name__} does not declare supports_{structure}")

    def length_extrapolation_issue(self) -> str | None:
        """Why this mechanism cannot run on sequences longer than those it was trained on (say, a
        learned parameter per position), or None when it can. Evaluation at longer windows
        (``eval.lengths``) reports such lengths as not applicable with this reason."""
        return None

    def reset_mechanism_parameters(self) -> None:
        """Re-initialise parameters that the generic GPT-2 init must not touch (gates, decays...).

        Called by the model after its normal(0, 0.02) initialisation of every Linear/Embedding."""

    def parameter_group_hints(self) -> list[ParameterGroupHint]:
        """Parameters that want other optimizer settings than the rest (a router's learning rate);
        read by :func:`attnlab.recipe.parameter_groups`. None by default."""
        return []

    @property
    def dropout_p(self) -> float:
        return self.attn_dropout if self.training else 0.0

    def extra_repr(self) -> str:
        fields = {k: v for k, v in vars(self.cfg).items() if k != "name"}
        return f"name={self.cfg.name!r}" + "".join(f", {k}={v!r}" for k, v in fields.items())


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
