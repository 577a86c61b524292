"""A GPT whose every layer's token mixer comes from the attention registry.

Pre-norm decoder blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``), rotary or learned
positions, tied or untied LM head, GPT-2 initialisation. The loss is computed by the fused
chunked LM-head cross-entropy (:mod:`attnlab.loss`) so the ``(B, T, V)`` logits never exist
during training.

Decoding has two paths over the same caches. ``model(idx, cache=cache)`` continues a cached
sequence by any number of tokens with each mechanism's eager code (host positions, buffers sliced
to the written prefix). :meth:`GPT.step` decodes one token per sequence through
:meth:`GPT.static_step`, where the position is a tensor on the device and every layer's
:meth:`~attnlab.attention.base.Attention.decode_step` reads whole pre-allocated buffers under a
mask: the same shapes and Python control flow at every position, so ``torch.compile`` traces it
once and runs it without Python in the loop (compiled ahead of time on CPU, CUDA graphs on CUDA).
``generate(compile=True)`` uses it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import (
    Attention,
    AttentionCache,
    AttentionContext,
    AttentionSpec,
    ModelCache,
    resolve_layer_attention,
)
from attnlab.attention._native import decode_c_shims
from attnlab.attention.kernels import native_decode_available
from attnlab.config import ModelConfig
from attnlab.decode_passes import FewRowLinears
from attnlab.direct_step import call_precompiled
from attnlab.layers import MLP, RotaryEmbedding, make_norm
from attnlab.loss import IGNORE_INDEX, linear_cross_entropy

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """``logits`` ``(B, T, V)`` (or ``(B, 1, V)`` with ``last_only``) when no targets were given;
    otherwise ``loss`` (mean over counted tokens), ``loss_sum``, ``n_tokens`` and ``n_correct``
    (counted tokens whose argmax is the target; None while gradients are computed), and with
    ``per_token`` the ``(B, T)`` ``token_loss`` (0 where not counted) and ``token_correct``."""

    logits: Tensor | None = None
    loss: Tensor | None = None
    loss_sum: Tensor | None = None
    n_tokens: Tensor | None = None
    n_correct: Tensor | None = None
    token_loss: Tensor | None = None
    token_correct: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: AttentionSpec, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn: Attention = spec.build(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``"""
        x = x + self.dropout(self.attn(self.attn_norm(x), ctx, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """``(B, C) -> (B, C)`` through the attention's static step, which takes ``(B, 1, C)``
        (inference: no dropout). The feed-forward half stays two-dimensional: compiled, a
        ``(B, 1, C)`` activation reaches its matrix products as a view that gives the size-1
        axis stride 0, which ATen's CPU ``mm`` copies before every call."""
        B, C = x.shape
        x = x + self.attn.decode_step(self.attn_norm(x).view(B, 1, C), ctx, cache).view(B, C)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: list[AttentionSpec]):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer at start-up)")
        if len(attention) != cfg.n_layers:
            raise ValueError(f"need one attention spec per layer ({cfg.n_layers}), got {len(attention)}")
        self.cfg = cfg
        self.attention_specs = attention
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.rope = RotaryEmbedding(cfg.rope_theta) if cfg.pos_encoding == "rope" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, spec, i) for i, spec in enumerate(attention))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self._no_static_step = self.decode_step_unsupported()

    @classmethod
    def from_config(cls, model: Mapping[str, Any] | ModelConfig, attention: Any = "mha", **overrides: Any) -> GPT:
        """Build from plain config values (validated): ``GPT.from_config({...}, "gqa_2")``."""
        from attnlab.config import from_dict

        if not isinstance(model, ModelConfig):
            model = from_dict(ModelConfig, {**model, **overrides}, "model")
        return cls(model, resolve_layer_attention(attention, model))

    # ----------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L).

        The tied embedding must get this std too: left at PyTorch's N(0, 1) it saturates the
        softmax and the LM head's gradients turn denormal (8x slower CPU training)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, "is_residual_projection", False) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for module in self.modules():
            if isinstance(module, Attention):
                module.reset_mechanism_parameters()

    # ----------------------------------------------------------------------------- forward
    @property
    def lm_weight(self) -> Tensor:
        """``(V, C)`` LM-head weight (the token embedding when tied)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: ModelCache | None = None,
                record_stats: bool = False, last_only: bool = False, per_token: bool = False,
                step: int | None = None) -> ModelOutput:
        """``idx`` ``(B, T)`` token ids; ``targets`` ``(B, T)`` next-token ids (``-100`` = not counted).

        With ``cache`` the tokens continue the cached sequence and the cache advances by ``T``.
        Rotary models take sequences longer than ``max_seq_len`` (evaluation beyond the training
        context); learned positions stop at their table. ``per_token`` also returns each token's
        loss and correctness (evaluation by position). ``step``: the optimizer step of a training
        step (``AttentionContext.step``)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"sequence of {start + T} positions exceeds the limit of {cache.max_len} (the cache)")
        if self.pos_emb is not None and start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds the limit of {self.cfg.max_seq_len} "
                             "learned positions")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.emb_dropout(x)
        ctx = AttentionContext(self.rope, start, record_stats, training=self.training, token_ids=idx,
                               step=step)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx.scope(f"layer{i}"), cache.layers[i] if cache is not None else None)
        x = self.final_norm(x)
        if cache is not None:
            cache.advance(T)

        out = ModelOutput(aux_losses=ctx.aux_losses, stats=ctx.stats)
        if targets is None:
            if last_only:
                x = x[:, -1:]
            out.logits = F.linear(x, self.lm_weight).float()
            return out
        result = linear_cross_entropy(x.reshape(B * T, -1), self.lm_weight, targets.reshape(-1),
                                      self.cfg.loss_chunk_size, IGNORE_INDEX, per_token=per_token)
        out.loss_sum, out.n_tokens, out.n_correct = result.loss_sum, result.n_tokens, result.n_correct
        if per_token:
            out.token_loss, out.token_correct = result.token_loss.view(B, T), result.token_correct.view(B, T)
        out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
        return out

    def length_extrapolation_issue(self, length: int, trained_length: int) -> str | None:
        """Why this model cannot be evaluated on windows of ``length`` tokens after training on
        windows of ``trained_length``, or None when it can (always for ``length <= trained_length``)."""
        if length <= trained_length:
            return None
        if self.pos_emb is not None:
            return (f"learned absolute positions (model.pos_encoding=learned) have no trained embedding "
                    f"beyond the training context of {trained_length} tokens")
        for i, block in enumerate(self.blocks):
            issue = block.attn.length_extrapolation_issue()
            if issue is not None:
                return f"layer {i} ({block.attn.cfg.name}): {issue}"
        return None

    # ----------------------------------------------------------------------------- decoding
    def init_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> ModelCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` positions."""
        max_len = max_len or self.cfg.max_seq_len
        param = self.tok_emb.weight
        dtype = dtype or param.dtype
        layers = [block.attn.init_cache(batch_size, max_len, param.device, dtype) for block in self.blocks]
        return ModelCache(layers, max_len, param.device)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype | None = None) -> int:
        """Closed form of :meth:`init_cache`'s bytes for ``context_len`` positions."""
        dtype = dtype or self.tok_emb.weight.dtype
        return sum(block.attn.cache_bytes(batch_size, context_len, dtype) for block in self.blocks)

    def decode_step_unsupported(self) -> str | None:
        """Why :meth:`static_step` cannot decode this model (its first such layer), or None."""
        for i, block in enumerate(self.blocks):
            reason = block.attn.decode_step_unsupported()
            if reason is not None:
                return f"layer {i} ({self.attention_specs[i].name}): {reason}"
        return None

    def static_step(self, token: Tensor, cache: ModelCache) -> Tensor:
        """Logits ``(B, V)`` (float32) of ``token`` ``(B, 1)`` at position ``cache.position``; writes
        every layer's state there but leaves the position to :meth:`step`.

        The function ``torch.compile`` compiles: it reads the position only as a tensor and calls
        each layer's :meth:`~attnlab.attention.base.Attention.decode_step`, so every position runs
        the same graph. Call :meth:`step` (limits checked, position advanced) rather than this."""
        x = self.tok_emb(token[:, 0])  # (B, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(cache.position)
        ctx = AttentionContext(self.rope, cache.position)
        for i, block in enumerate(self.blocks):
            x = block.decode_step(x, ctx.scope(f"layer{i}"), cache.layers[i])
        return F.linear(self.final_norm(x), self.lm_weight).float()

    def step(self, token: Tensor, cache: ModelCache, compile: bool = False, trust_guards: bool = False) -> Tensor:
        """Decode one token per sequence, ``token`` ``(B, 1)``, with the static step; returns the
        next-token logits ``(B, V)`` and advances ``cache`` by one position.

        ``compile=True`` runs the step compiled with ``torch.compile``: traced once per model and
        cache shape, then the same graph at every position. On CPU it is compiled ahead of time
        (:func:`precompile_static_step`) and called without dynamo's frame evaluation, its guards
        checked by the step itself; on CUDA through dynamo with ``mode="reduce-overhead"`` (CUDA
        graphs). ``trust_guards=True`` skips the checks that the graph still applies (on CUDA by
        ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``; on CPU the step then calls
        inductor's graph directly with the inputs of the cache's last step,
        :func:`~attnlab.direct_step.call_precompiled`), for a step that follows a compiled step of
        the same model and cache with nothing about them changed in between but their values
        (:meth:`stream` passes it from its second step on). Raises ``ValueError``
        when a layer has no static step (:meth:`decode_step_unsupported`)."""
        limit = cache.max_len if self.pos_emb is None else min(cache.max_len, self.cfg.max_seq_len)
        if cache.pos + 1 > limit:
            raise ValueError(f"sequence of {cache.pos + 1} positions exceeds the limit of {limit}")
        if self._no_static_step is not None:
            raise ValueError(f"no static decoding step: {self._no_static_step}")
        if not compile:
            logits = self.static_step(token, cache)
        elif token.device.type == "cuda":
            cache.mark_static_addresses()
            torch.compiler.cudagraph_mark_step_begin()
            with _guards_trusted(trust_guards):  # the graph's output buffer is overwritten by the next replay
                logits = compiled_static_step("cuda")(self, token, cache).clone()
        elif (precompiled := self._precompiled_step(token, cache, trust_guards)) is not None:
            logits = call_precompiled(precompiled, self, token, cache, trust_guards)
        else:
            with _guards_trusted(trust_guards):
                logits = compiled_static_step(token.device.type)(self, token, cache)
        cache.advance(1)
        return logits

    def forget_compiled_step(self) -> None:
        """Drop this model's precompiled CPU step, so that the next compiled :meth:`step` compiles
        (or finds in inductor's caches) a new one: what ``torch._dynamo.reset()`` does to the
        steps that run through dynamo."""
        _PRECOMPILED_STEPS.pop(self, None)

    def _precompiled_step(self, token: Tensor, cache: ModelCache, trusted: bool):
        """This model's CPU step compiled ahead of time (:func:`precompile_static_step`), its guards
        checked against ``token`` and ``cache`` unless ``trusted``, compiled again where they fail;
        None where it cannot be precompiled (the step then runs through dynamo)."""
        precompiled = _PRECOMPILED_STEPS.get(self)
        if precompiled is not None and (trusted or precompiled.guard_check(self, token, cache)):
            return precompiled
        if precompiled is None and self in _PRECOMPILED_STEPS:  # it could not be precompiled before
            return None
        _PRECOMPILED_STEPS[self] = precompiled = precompile_static_step(self, token, cache)
        return precompiled

    @torch.no_grad()
    def stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None, compile: bool = False) -> Iterator[Tensor]:
        """Sample ``max_new_tokens`` continuations of ``idx`` ``(B, T)`` with a KV cache, yielding
        each ``(B, 1)`` token as soon as it is sampled.

        The prompt is one eager call. ``compile=False`` decodes with :meth:`forward` (each
        mechanism's eager code), ``compile=True`` with the compiled :meth:`step`, dynamo's guards
        checked at the first step and trusted after it (so change neither the model nor the
        cache, other than values, while the tokens are consumed); a model with a layer that has
        no static step (routed top-k MoAS) decodes eagerly, with a warning.
        ``temperature=0`` is greedy decoding; ``top_k`` keeps the k most likely tokens."""
        total = idx.shape[1] + max_new_tokens
        if self.pos_emb is not None and total > self.cfg.max_seq_len:
            raise ValueError(f"learned positions stop at {self.cfg.max_seq_len}; asked for {total}")
        if compile and (reason := self.decode_step_unsupported()) is not None:
            log.warning("compile=True: decoding eagerly, there is no static decoding step (%s)", reason)
            compile = False
        was_training = self.training
        self.eval()
        try:
            cache = self.init_cache(idx.shape[0], total)
            logits = self(idx, cache=cache, last_only=True).logits[:, -1]
            for i in range(max_new_tokens):
                token = sample_next_token(logits, temperature, top_k, generator)
                yield token
                if i + 1 < max_new_tokens:
                    if compile:  # from the second step on, the first one's graph, unchecked
                        logits = self.step(token, cache, compile=True, trust_guards=i > 0)
                    else:
                        logits = self(token, cache=cache, last_only=True).logits[:, -1]
        finally:
            self.train(was_training)

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, compile: bool = False) -> Tensor:
        """``idx`` ``(B, T)`` followed by ``max_new_tokens`` sampled tokens: :meth:`stream`, collected."""
        tokens = list(self.stream(idx, max_new_tokens, temperature, top_k, generator, compile))
        return torch.cat([idx, *tokens], dim=1)

    # ----------------------------------------------------------------------------- accounting
    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters by part: embeddings, attention, feed_forward, norms, lm_head, total."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        counts = {
            "embeddings": count(self.tok_emb) + count(self.pos_emb),
            "attention": sum(count(b.attn) for b in self.blocks),
            "feed_forward": sum(count(b.mlp) for b in self.blocks),
            "norms": sum(count(b.attn_norm) + count(b.mlp_norm) for b in self.blocks) + count(self.final_norm),
            "lm_head": count(self.lm_head),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["non_embedding"] = counts["total"] - counts["embeddings"]
        return counts


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """One token ``(B, 1)`` from next-token ``logits`` ``(B, V)``: the argmax for ``temperature=0``,
    else a sample of ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def _guards_trusted(trusted: bool) -> contextlib.AbstractContextManager:
    """Dynamo's guards skipped for the calls inside (only where they are known to pass)."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if trusted else contextlib.nullcontext()


#: Each model's precompiled CPU step (None: it cannot be precompiled), held no longer than the model.
_PRECOMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def precompile_static_step(model: GPT, token: Tensor, cache: ModelCache):
    """:meth:`GPT.static_step` for ``model`` and caches shaped like ``cache``, compiled ahead of time
    (``torch.compile(...).aot_compile``, the CPU options of :func:`compiled_static_step`) into a
    function called as ``fn(model, token, cache)`` without dynamo's frame evaluation: no cache
    lookup, no guards (``fn.guard_check(model, token, cache)`` checks them on demand). That is
    60-130 µs less per token than the compiled step through dynamo with its guards skipped
    (2 CPU threads, exp10 width, context 4,096: ``gqa_2`` 728 -> 598 µs, ``mha`` 842 -> 777 µs,
    fastest of 25 blocks of 200 tokens). None, logged, where it cannot compile so (the step then
    runs through dynamo)."""
    try:
        # outside AOTAutograd's cache: the step's options name C operators that its cache key cannot
        # pickle, and the key then falls back to a nonce drawn from Python's global `random`, which a
        # seeded program (Lightning's seed_everything) draws again in its next run: the on-disk cache
        # would hand this model another model's step (what a nonce finds is never this graph's)
        with torch._functorch.config.patch(enable_autograd_cache=False):
            precompiled = compiled_static_step(token.device.type).aot_compile(((model, token, cache), {}))
    except Exception as exc:  # e.g. a mechanism whose step breaks the graph
        log.warning("the static step could not be compiled ahead of time, it runs through dynamo: %s", exc)
        return None
    precompiled.disable_guard_check()  # checked where GPT.step is not told to trust them
    return precompiled


@functools.cache
def compiled_static_step(device_type: str):
    """:meth:`GPT.static_step` under ``torch.compile``, one wrapper per device type, called as
    ``fn(model, token, cache)`` (``fn.aot_compile`` gives :func:`precompile_static_step`'s function).
    CUDA: ``mode="reduce-overhead"`` (CUDA graphs: the step is one
    graph replay; the caches' addresses are marked static, see :meth:`ModelCache.mark_static_addresses`).
    Elsewhere inductor's C++ wrapper calls the step's kernels without Python between them: 18-20%
    less time per step than its Python wrapper (exp10 width, context 4,096, one thread: 2.10 ->
    1.73 ms MHA, 1.10 -> 0.89 ms MQA), for a longer first compilation; on CPU with the C kernels
    built, :class:`~attnlab.decode_passes.FewRowLinears` moves the step's one-row matrix products
    onto ``attnlab::decode_linear``, and the wrapper calls both C operators through their C shims
    (:func:`~attnlab.attention._native.decode_c_shims`), not the boxed dispatcher: 3-7% less time
    per token (paired blocks of 100 tokens, 30 pairs: ``identity`` 1.067x, ``gqa_2`` 1.036x,
    ``mha`` 1.033x)."""
    if device_type == "cuda":
        return torch.compile(GPT.static_step, mode="reduce-overhead")
    options: dict[str, Any] = {"cpp_wrapper": True}
    if device_type == "cpu" and native_decode_available():  # the products of few rows on the C kernel
        options["post_grad_custom_post_pass"] = FewRowLinears()
        options["aot_inductor.custom_ops_to_c_shims"] = decode_c_shims()  # the C operators called directly
    # one graph (which precompile_static_step requires): a graph break fails loudly, not silently slowly
    return torch.compile(GPT.static_step, fullgraph=True, options=options)
