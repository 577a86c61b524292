"""Mixture of Attention Schemes (MoAS): several attention mechanisms side by side, mixed per token.

Every branch is an ordinary registered mechanism, built through the registry from an entry of
``branches`` (a preset such as ``gqa_2``, a registered name, or a mapping with ``name`` and
options); the default is MHA, GQA with 2 key/value heads and MQA. Two ways to combine them:

* ``static_moas``: the plain average ``y = (1/n) sum_i O_i`` of the ``n`` branch outputs.
* ``moas``: a per-token router ``r = W2 GELU(W1 x)`` (hidden width ``d_model / 4``) gives gates
  ``g = softmax(r)`` and ``y_t = sum_i g_{t,i} O_{i,t}``. In training a load-balance loss
  ``load_balance_weight * MSE(mean over tokens of g, 1/n)`` keeps the router from collapsing
  onto one scheme. It is taken on the dense softmax even when ``top_k < n``, because the sparse
  gates of ``top_k = 1`` are one-hot and would give the router no gradient.

Sparse routing (``top_k = k < n``): each token keeps its ``k`` largest gates, renormalised to
sum to one (the others are exactly 0), and only the chosen branches run on it. Semantics
(Mixture-of-Depths style): for each sequence, a branch processes the subsequence of tokens
routed to it as its own contiguous causal sequence; it attends only over earlier tokens also
routed to it, and its rotary positions (or window, for a sliding branch) count within that
subsequence. So cached decoding equals the full forward pass and a branch's cache grows only
with the tokens routed to it. The router learns through the renormalised chosen gates; with
``k = 1`` the chosen gate is the constant 1, so its gradient is passed straight through to the
chosen probability (the forward value stays 1; the router's gradient is that of ``y = p O``, as
in the Switch Transformer), otherwise the task loss could never teach the router.

Execution:

* dense (``k = n``, and ``static_moas``): every branch runs once on the whole batch, with
  batched branch caches (:class:`MixtureCache`).
* sparse without a cache (training, evaluation): each branch runs once on ``(B, L_i, C)``, row
  ``b`` holding its routed tokens first, in order, padded to ``L_i = max_b (tokens of row b
  routed to i)`` with its unrouted tokens. Because branches are causal the padding, placed
  after every real token, cannot change a real token's output, and its gate is 0. (A branch's
  own aux losses and statistics do see the padding tokens.)
* sparse with a cache (decoding): rows route differently and their per-branch lengths differ,
  so each ``(row, branch)`` pair has its own batch-1 cache (:class:`RoutedMixtureCache`) and
  rows are processed one at a time.

Static decoding steps (:meth:`~attnlab.attention.base.Attention.decode_step`, what compiled
decoding runs): dense mixtures run every branch's step and mix as above. Sparse routing has none:
which branch runs, and where it writes in its cache (the length of the row's subsequence routed
to it, which is also the rotary position the branch sees), depend on the router's choices at
every earlier token. A static step would have to run every branch on every token and discard
all but the chosen ones, i.e. cost what the dense mixture costs, so such a mixture decodes
eagerly.

Structures (bidirectional, cross-attention, key padding: :class:`~attnlab.attention.base.AttentionContext`)
pass through to the branches, so a mixture supports those all its branches support. Sparse
routing hides each row's unrouted tail from its routed tokens when they may look ahead
(bidirectional), and never routes a padded token: no branch sees it (with or without a cache),
its output is 0, and the load-balance loss and routing statistics average over real tokens only.

Parameters: the branches' sum; ``moas`` adds its router, ``C h + h n + n`` (``h`` the router
width, ``n`` branches; with ``model.bias`` also ``h``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig, require

from .base import Attention, AttentionCache, AttentionConfig, AttentionContext, token_mean
from .registry import AttentionSpec, register_attention, resolve_attention


def default_branches() -> list:
    """MHA, GQA with 2 key/value heads, MQA."""
    return ["mha", {"name": "gqa", "n_kv_heads": 2}, "mqa"]


def resolve_branches(branches: Any, model: ModelConfig, field: str) -> list[AttentionSpec]:
    """Validated specs of ``branches``; errors name ``<field>.branches[i]...``."""
    require(isinstance(branches, list) and len(branches) >= 1, f"{field}.branches", branches,
            "a non-empty list of presets, registered names or mappings with 'name'")
    specs = []
    for i, entry in enumerate(branches):
        where = f"{field}.branches[{i}]"
        spec = resolve_attention(entry, model, where)
        require(not issubclass(spec.registration.cls, StaticMixtureOfAttentionSchemes), f"{where}.name",
                spec.name, "any registered mechanism except a mixture", reason="nested mixtures are not supported")
        specs.append(spec)
    return specs


def branch_names(branches: list) -> list[str]:
    """Preset or registered name of each entry; repeated names get their branch index (``mha_0``)."""
    labels = [entry if isinstance(entry, str) else str(entry["name"]) for entry in branches]
    counts = Counter(labels)
    names = [label if counts[label] == 1 else f"{label}_{i}" for i, label in enumerate(labels)]
    if len(set(names)) < len(names):  # e.g. [gqa_1, gqa, gqa]: index every branch, which is unique
        names = [f"{label}_{i}" for i, label in enumerate(labels)]
    return names


@dataclass
class StaticMoASConfig(AttentionConfig):
    #: Branch mechanisms: preset names (``gqa_2``), registered names, or mappings with ``name``.
    branches: list = dataclasses.field(default_factory=default_branches)

    def validate(self, model: ModelConfig, field: str) -> None:
        self.branch_specs(model, field)

    def branch_specs(self, model: ModelConfig, field: str = "attention") -> list[AttentionSpec]:
        """The branches as validated specs, resolved once (by validation) and reused by every layer."""
        resolved = self.__dict__.get("_branch_specs")  # not a dataclass field: never in the saved config
        if resolved is None:
            resolved = self.__dict__["_branch_specs"] = resolve_branches(self.branches, model, field)
        return resolved


@dataclass
class MoASConfig(StaticMoASConfig):
    #: Branches run per token; null: all of them (dense mixture).
    top_k: int | None = None
    #: Weight of the load-balance aux loss, MSE(mean gate, uniform).
    load_balance_weight: float = 0.01
    #: Router hidden width; null: d_model // 4.
    router_hidden: int | None = None

    def validate(self, model: ModelConfig, field: str) -> None:
        super().validate(model, field)
        n = len(self.branches)
        if self.top_k is not None:
            require(1 <= self.top_k <= n, f"{field}.top_k", self.top_k,
                    f"an integer in 1..{n} (the number of branches), or null for all {n}")
        require(self.load_balance_weight >= 0, f"{field}.load_balance_weight", self.load_balance_weight,
                "a number >= 0")
        if self.router_hidden is not None:
            require(self.router_hidden >= 1, f"{field}.router_hidden", self.router_hidden,
                    "an integer >= 1, or null for d_model // 4")


class MixtureCache(AttentionCache):
    """One cache per branch, each for the whole batch (dense mixtures)."""

    def __init__(self, branches: list[AttentionCache]):
        self.branches = branches


class RoutedMixtureCache(AttentionCache):
    """Sparse routing: ``rows[b].branches[i]`` is branch ``i``'s batch-1 cache for row ``b``,
    holding the ``lengths[b][i]`` tokens row ``b`` routed to it, at positions ``0..lengths[b][i]``.

    Allocation vs use: every ``(row, branch)`` cache has capacity ``max_len``, because all of a
    row's tokens may go to one branch, so :meth:`nbytes` (what is allocated, the registry's
    measure) is ``B * sum_i cache_bytes_i(1, max_len)`` whatever the routing. :meth:`used_nbytes`
    is what the routed tokens occupy, ``sum_{b,i} cache_bytes_i(1, lengths[b][i])``: the memory
    a cache sized to the routing (paged, or grown on demand) would need.
    """

    def __init__(self, rows: list[MixtureCache], branch_bytes: list[Callable[[int, int, torch.dtype], int]],
                 dtype: torch.dtype):
        self.rows = rows
        self.lengths = [[0] * len(branch_bytes) for _ in rows]
        self.branch_bytes = branch_bytes
        self.dtype = dtype

    def used_nbytes(self) -> int:
        return sum(self.branch_bytes[i](1, length, self.dtype)
                   for row in self.lengths for i, length in enumerate(row) if length > 0)


@register_attention("static_moas")
class StaticMixtureOfAttentionSchemes(Attention):
    """The average of the branches' outputs. ``branches`` ``nn.ModuleList``; ``branch_names``."""

    Config = StaticMoASConfig
    # passed through to the branches: supported where every branch supports it (structure_issue)
    supports_bidirectional = supports_cross_attention = supports_key_padding = True

    def __init__(self, cfg: StaticMoASConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.branches = nn.ModuleList(spec.build(model, layer_idx) for spec in cfg.branch_specs(model))
        self.branch_names: list[str] = branch_names(cfg.branches)
        # statistics of branch i are stored under "<layer>/branch<i>_<name>/..."
        self.branch_scopes = [f"branch{i}_{name}" for i, name in enumerate(self.branch_names)]

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``: the mean of the branch outputs."""
        return self.mix_dense(x, ctx, cache, gates=None)

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        return self.mix_dense(x, ctx, cache, gates=None, step=True)

    def decode_step_unsupported(self) -> str | None:
        reasons = [f"branch {name}: {reason}" for name, branch in zip(self.branch_names, self.branches)
                   if (reason := branch.decode_step_unsupported()) is not None]
        return "; ".join(reasons) or None

    def mix_dense(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None,
                  gates: Tensor | None, step: bool = False) -> Tensor:
        """Every branch on the whole batch; ``sum_i gates[..., i] * O_i``, or their mean when
        ``gates`` ``(B, T, n)`` is None. ``step``: the branches' static decoding steps."""
        caches: list[AttentionCache | None] = [None] * len(self.branches)
        if cache is not None:
            assert isinstance(cache, MixtureCache)
            caches = cache.branches
        y = torch.zeros_like(x)
        for i, branch in enumerate(self.branches):
            run = branch.decode_step if step else branch
            out = run(x, ctx.scope(self.branch_scopes[i]), caches[i])
            y = y + (out if gates is None else gates[..., i:i + 1] * out)
        return y if gates is not None else y / len(self.branches)

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> AttentionCache:
        return MixtureCache([b.init_cache(batch_size, max_len, device, dtype) for b in self.branches])

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        return sum(b.cache_bytes(batch_size, context_len, dtype) for b in self.branches)

    def first_branch_issue(self, issue_of: Callable[[Attention], str | None]) -> str | None:
        """The first branch's ``issue_of(branch)``, prefixed with the branch's name, or None."""
        for name, branch in zip(self.branch_names, self.branches):
            issue = issue_of(branch)
            if issue is not None:
                return f"branch {name}: {issue}"
        return None

    def length_extrapolation_issue(self) -> str | None:
        """A mixture runs beyond its training length when every branch does."""
        return self.first_branch_issue(lambda branch: branch.length_extrapolation_issue())

    def structure_issue(self, structure: str) -> str | None:
        """A mixture computes a structure when every branch does."""
        return self.first_branch_issue(lambda branch: branch.structure_issue(structure))


@register_attention("moas")
class MixtureOfAttentionSchemes(StaticMixtureOfAttentionSchemes):
    """Branches mixed by per-token softmax gates from a two-layer router; ``top_k`` of them per token."""

    Config = MoASConfig

    def __init__(self, cfg: MoASConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        n = len(self.branches)
        self.top_k = cfg.top_k or n
        self.load_balance_weight = cfg.load_balance_weight
        hidden = cfg.router_hidden or max(1, self.d_model // 4)
        # the output bias is a learned prior over schemes (and always present, whatever model.bias)
        self.router = nn.Sequential(nn.Linear(self.d_model, hidden, bias=model.bias), nn.GELU(),
                                    nn.Linear(hidden, n, bias=True))
        self.init_std = model.init_std

    @property
    def sparse(self) -> bool:
        return self.top_k < len(self.branches)

    def reset_mechanism_parameters(self) -> None:
        """Near-uniform initial gates: every scheme gets gradient before the router commits.

        ``W2`` is small (std ``init_std / 10``, logits ~1e-3) rather than zero: with ``W2 = 0``
        the gradient reaching ``W1`` is exactly zero in the first step (it flows through ``W2``),
        which the registry's every-parameter-learns test would flag. The prior bias starts at 0."""
        last = self.router[-1]
        nn.init.normal_(last.weight, 0.0, 0.1 * self.init_std)
        nn.init.zeros_(last.bias)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``(B, T, C)`` -> ``probs`` (dense softmax), ``gates`` (the mixing weights: ``probs``
        or, for ``top_k < n``, the chosen probabilities renormalised and 0 elsewhere) and the
        ``chosen`` mask, each ``(B, T, n)``; probabilities in at least float32."""
        logits = self.router(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        if not self.sparse:
            return probs, probs, torch.ones_like(probs, dtype=torch.bool)
        top = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top.indices, True)
        if self.top_k == 1:
            # The renormalised top-1 gate is the constant 1: pass the task loss's gradient to the
            # chosen probability straight through (forward value unchanged, backward as if y = p O,
            # the Switch Transformer's router gradient), or routing could never specialise.
            gates = gates + (probs - probs.detach()) * chosen
        return probs, gates, chosen

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``: ``y_t = sum_i g_{t,i} O_{i,t}``."""
        probs, gates, chosen = self.route(x)
        real = ctx.real_queries(x.shape[1])  # padded tokens count in neither the loss nor the statistics
        if ctx.training and self.load_balance_weight > 0:
            ctx.add_aux_loss("load_balance", self.load_balance_weight * load_balance_loss(probs, real))
        if ctx.recording:
            self.record_routing(gates, ctx, real)
        gates = gates.to(x.dtype)
        if not self.sparse:
            return self.mix_dense(x, ctx, cache, gates)
        if ctx.key_padding_mask is not None and ctx.memory is None:
            # a padded token joins no branch: no branch ever sees it (nor caches it)
            real = ctx.key_padding_mask[:, ctx.start_pos:ctx.start_pos + x.shape[1], None]
            chosen, gates = chosen & real, gates * real
        if cache is None:
            return self.mix_routed(x, ctx, gates, chosen)
        assert isinstance(cache, RoutedMixtureCache)
        return self.mix_routed_cached(x, ctx, cache, gates, chosen)

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """Dense routing only (see :meth:`decode_step_unsupported`)."""
        _, gates, _ = self.route(x)
        return self.mix_dense(x, ctx, cache, gates.to(x.dtype), step=True)

    def decode_step_unsupported(self) -> str | None:
        if self.sparse:
            return (f"routed top_k={self.top_k} of {len(self.branches)} branches: the chosen branch and its "
                    "position in its own subsequence cache depend on the routing of every earlier token")
        return super().decode_step_unsupported()

    def branch_context(self, ctx: AttentionContext, i: int, start_pos: int, token_ids: Tensor | None,
                       key_padding_mask: Tensor | None) -> AttentionContext:
        """Branch ``i``'s view of a routed subsequence: its own positions, token ids and real keys
        (cross-attention keeps the memory's)."""
        scoped = ctx.scope(self.branch_scopes[i])
        scoped.start_pos = start_pos
        scoped.token_ids = token_ids
        if ctx.memory is None:
            scoped.key_padding_mask = key_padding_mask
        return scoped

    def mix_routed(self, x: Tensor, ctx: AttentionContext, gates: Tensor, chosen: Tensor) -> Tensor:
        """Sparse mixture without a cache: one batched call per branch on the rows' routed
        subsequences, compacted to the front and padded at the end (see the module docstring)."""
        B, T, C = x.shape
        y = torch.zeros_like(x)
        for i, branch in enumerate(self.branches):
            routed = chosen[..., i]  # (B, T)
            counts = routed.sum(dim=1)
            length = int(counts.max())
            if length == 0:
                continue
            # stable: each row's routed tokens first, in their order; then its unrouted ones
            order = torch.argsort(routed.to(torch.uint8), dim=1, descending=True, stable=True)[:, :length]
            token_ids = ctx.token_ids.gather(1, order) if ctx.token_ids is not None else None
            index = order.unsqueeze(-1).expand(-1, -1, C)
            # the unrouted tail of a row, after its routed tokens, is hidden from those that look ahead
            real = None if ctx.plain else torch.arange(length, device=x.device) < counts[:, None]
            out = branch(x.gather(1, index), self.branch_context(ctx, i, 0, token_ids, real))  # (B, length, C)
            # padding tokens were not routed to branch i, so their gate is exactly 0
            y = y.scatter_add(1, index, gates[..., i].gather(1, order).unsqueeze(-1) * out)
        return y

    def mix_routed_cached(self, x: Tensor, ctx: AttentionContext, cache: RoutedMixtureCache, gates: Tensor,
                          chosen: Tensor) -> Tensor:
        """Sparse mixture with a cache: row by row, each branch continues that row's routed
        subsequence in its own batch-1 cache. (In train mode a branch's aux losses would add up
        over rows; decoding runs in eval mode, where mechanisms add none.)"""
        rows = []
        for b in range(x.shape[0]):
            y_row = torch.zeros_like(x[b])  # (T, C)
            for i, branch in enumerate(self.branches):
                positions = chosen[b, :, i].nonzero().squeeze(1)
                if positions.numel() == 0:
                    continue
                token_ids = ctx.token_ids[b, positions].unsqueeze(0) if ctx.token_ids is not None else None
                # (padded tokens are routed nowhere, so a branch's cache holds real tokens only)
                branch_ctx = self.branch_context(ctx, i, cache.lengths[b][i], token_ids, None)
                out = branch(x[b, positions].unsqueeze(0), branch_ctx, cache.rows[b].branches[i])[0]
                cache.lengths[b][i] += positions.numel()
                y_row = y_row.index_add(0, positions, gates[b, positions, i].unsqueeze(-1) * out)
            rows.append(y_row)
        return torch.stack(rows)

    def record_routing(self, gates: Tensor, ctx: AttentionContext, real: Tensor | None = None) -> None:
        """Gates ``(B, T, n)``, their per-token entropy, and per scheme the mean gate and the
        share of tokens whose largest gate it is (over the ``real`` ``(B, T)`` tokens when given)."""
        ctx.record("gates", gates)
        ctx.record("gate_entropy", token_mean(torch.special.entr(gates).sum(dim=-1), real))
        mean_gate = token_mean(gates, real)
        top1_share = token_mean(F.one_hot(gates.argmax(dim=-1), gates.shape[-1]).float(), real)
        for i, name in enumerate(self.branch_names):
            ctx.record(f"gate_mean/{name}", mean_gate[i])
            ctx.record(f"top1_share/{name}", top1_share[i])

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> AttentionCache:
        if not self.sparse:
            return super().init_cache(batch_size, max_len, device, dtype)
        dense_init = super().init_cache  # (zero-argument super() does not work inside a comprehension)
        rows = [dense_init(1, max_len, device, dtype) for _ in range(batch_size)]
        return RoutedMixtureCache(rows, [b.cache_bytes for b in self.branches], dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        if not self.sparse:
            return super().cache_bytes(batch_size, context_len, dtype)
        # capacity-based: every (row, branch) cache can hold the whole context
        return batch_size * super().cache_bytes(1, context_len, dtype)


def load_balance_loss(probs: Tensor, real: Tensor | None = None) -> Tensor:
    """``MSE(mean over tokens of probs, uniform)`` for ``probs`` ``(B, T, n)``: 0 when every scheme
    gets the same average gate, largest when one scheme takes every token. ``real`` ``(B, T)``:
    average over those tokens only (padding excluded)."""
    usage = token_mean(probs, real)
    return F.mse_loss(usage, torch.full_like(usage, 1.0 / usage.numel()))
