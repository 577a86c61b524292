"""Any registered mechanism as a standalone layer, for models of your own.

:func:`build` resolves a preset or registered name plus options exactly as a config's
``attention`` entry is resolved (the same validation, errors naming ``attention.<option>`` and
``model.<field>``) and returns an :class:`AttentionLayer`: ``attn(x)`` with ``x`` ``(B, T, C)``,
no model, layer index or context object needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.config import ConfigError, ModelConfig, require
from attnlab.layers import RotaryEmbedding

from .base import Attention, AttentionContext, ModelCache
from .registry import AttentionSpec, attention_options, get_registration, resolve_attention


def build(attention: str | Mapping[str, Any], *, d_model: int, n_heads: int, causal: bool = True,
          rope: bool = True, rope_theta: float = 10000.0, bias: bool = False, attn_dropout: float = 0.0,
          norm_eps: float = 1e-5, **options: Any) -> AttentionLayer:
    """A standalone attention layer, ``(B, T, d_model) -> (B, T, d_model)``.

    ``attention``: a preset (``"gqa_2"``), a registered name (``"gqa"``) or a mapping with ``name``;
    ``options`` override its fields (``n_kv_heads=4``, ``window=128``). ``causal=False``: the
    bidirectional form, where the mechanism declares one. ``rope``: rotary positions for the
    mechanisms that use them (False: no positions at all, e.g. when your model adds its own).
    ``n_heads`` is also the head count of a mechanism that has its own (MoH's ``n_heads``).
    ``bias``, ``attn_dropout``, ``norm_eps``: as the model's fields of those names.

    Parameters start from PyTorch's default initialisation of each module, then each mechanism's
    own (:meth:`~attnlab.attention.base.Attention.reset_mechanism_parameters`). Raises
    :class:`~attnlab.config.ConfigError` naming the field for every invalid value.
    """
    require(isinstance(causal, bool), "causal", causal, "True (causal) or False (bidirectional)")
    model = ModelConfig(n_layers=1, d_model=d_model, n_heads=n_heads, d_ff=4 * d_model, max_seq_len=1,
                        attn_dropout=attn_dropout, pos_encoding="rope" if rope else "learned",
                        rope_theta=rope_theta, bias=bias, norm_eps=norm_eps)
    values = {**attention_options(attention), **options}
    if "n_heads" in get_registration(values["name"]).cls.Config.__dataclass_fields__:
        values["n_heads"] = n_heads  # a mechanism with its own head count (MoH) takes this one
    spec = resolve_attention(values, model)
    layer = spec.build(model, 0)
    for module in layer.modules():
        if isinstance(module, Attention):
            module.reset_mechanism_parameters()
    if not causal:
        issue = layer.structure_issue("bidirectional")
        if issue is not None:
            raise ConfigError("causal", causal, f"True: '{spec.name}' is causal only", reason=issue)
    return AttentionLayer(layer, spec, causal, RotaryEmbedding(rope_theta) if rope else None)


class AttentionLayer(nn.Module):
    """A mechanism as a layer of your model (made by :func:`build`).

    ``attention``: the mechanism's module; ``spec``: its validated config; ``causal``;
    ``aux_losses``: the auxiliary losses of the last call, by name (routers' load balance, the
    sparse indexer's KL; empty outside training), to add to your training loss.
    """

    def __init__(self, attention: Attention, spec: AttentionSpec, causal: bool, rope: RotaryEmbedding | None):
        super().__init__()
        self.attention = attention
        self.spec = spec
        self.causal = causal
        self.rope = rope
        self.aux_losses: dict[str, Tensor] = {}

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                cache: ModelCache | None = None, start_pos: int = 0) -> Tensor:
        """``x`` ``(B, T, C)`` -> ``(B, T, C)``.

        ``context`` ``(B, S, C)``: cross-attention, keys and values from it (no positions, no cache).
        ``key_padding_mask`` ``(B, S)`` bool, True for a real token: over ``context`` for
        cross-attention, else over the key positions ``0 .. start + T`` (with a cache, the cached
        positions first: one mask for the whole sequence so far, or longer). ``cache``
        (:meth:`init_cache`): continue a cached causal sequence, the cache advancing by ``T``.
        ``start_pos``: the position of ``x[:, 0]`` without a cache (rotary positions).
        """
        B, T, _ = x.shape
        if cache is not None:
            require(self.causal, "cache", "a cache", "None: a bidirectional layer has no incremental decoding",
                    reason="every token would see later ones")
            require(context is None, "cache", "a cache", "None with context: cross-attention keeps no cache",
                    reason="its keys and values are the memory's, computed at every call")
            start_pos = cache.pos
            if start_pos + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions; writing up to {start_pos + T}")
        if context is not None:
            self._require_structure("cross_attention", "context", context)
            require(context.dim() == 3 and context.shape[0] == B and context.shape[2] == x.shape[2], "context",
                    tuple(context.shape), f"a (B, S, C) tensor with B={B}, C={x.shape[2]}")
        if key_padding_mask is not None:
            self._require_structure("key_padding", "key_padding_mask", key_padding_mask)
            keys = context.shape[1] if context is not None else start_pos + T
            require(key_padding_mask.dtype == torch.bool and key_padding_mask.dim() == 2
                    and key_padding_mask.shape[0] == B and key_padding_mask.shape[1] >= keys,
                    "key_padding_mask", f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}",
                    f"a boolean (B, S) tensor, True for real tokens, with B={B} and S >= {keys} "
                    + ("(the context's length)" if context is not None else "(the key positions so far)"))
        ctx = AttentionContext(self.rope, start_pos, training=self.training, causal=self.causal, memory=context,
                               key_padding_mask=key_padding_mask)
        y = self.attention(x, ctx, cache.layers[0] if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        self.aux_losses = ctx.aux_losses
        return y

    def _require_structure(self, structure: str, argument: str, value: Tensor) -> None:
        issue = self.attention.structure_issue(structure)
        if issue is not None:
            raise ConfigError(argument, f"a tensor {tuple(value.shape)}", f"None for '{self.spec.name}'", reason=issue)

    def init_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> ModelCache:
        """An empty decoding cache for ``batch_size`` sequences of up to ``max_len`` positions
        (``nbytes()``: the bytes it holds; ``pos``: the positions written)."""

        param = next(self.parameters())
        state = self.attention.init_cache(batch_size, max_len, param.device, dtype or param.dtype)
        return ModelCache([state], max_len, param.device)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, rope={self.rope is not None}"
