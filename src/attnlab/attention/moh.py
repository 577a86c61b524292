"""Mixture-of-Head attention, MoH (Jin, Zhu, Yuan & Yan 2024, arXiv:2410.11842).

Multi-head attention is a sum over heads, ``y = sum_i head_i W_O^i``; MoH treats the heads as
experts and makes it a *weighted* sum over a per-token subset::

    y_t = sum_i g_i(x_t) head_i(t) W_O^i

Heads ``0 .. n_shared_heads-1`` are *shared* (active for every token); the other
``E = n_heads - n_shared_heads`` are *routed*: token ``t`` activates the ``top_k`` of them with
the highest router scores ``W_r x_t``. Two-stage weights, with ``[a1, a2] = softmax(W_h x_t)``
balancing the two head types::

    g_i = 2 a1 * n_shared * softmax(W_s x_t)_i             shared heads
    g_i = 2 a2 * top_k * softmax_{selected}(W_r x_t)_i      selected routed heads
    g_i = 0                                                 the other routed heads

The paper's equations write the weights without the factors ``2``, ``n_shared`` and ``top_k``;
the authors' released code has them, and so do we: each factor is the number of items its softmax
shares out, so under uniform routing every active head gets weight exactly 1, as in MHA (and in
``routing=static``/``all`` below), instead of ``1 / n_active``. A lone shared head
(``n_shared_heads=1``) has no ``W_s`` (its softmax is 1); without shared heads there is no
``W_h`` and the routed weights take the whole factor (``a2 = 1``, no ``2``).

Load balance over the routed heads (paper: ``L_b = sum_i f_i P_i``; we normalise by ``E / top_k``)::

    L_b = E / top_k * sum_i f_i P_i,    f_i = mean_t 1[t selects i],   P_i = mean_t softmax(W_r x_t)_i

over the ``B * T`` tokens of the call. It is 1 whenever the mean routing probabilities are
uniform and ``E / top_k`` when every token puts all its probability on the same ``top_k`` heads
(the authors' code computes ``top_k`` times this). It reaches the training loss as
``load_balance_weight * L_b`` per layer (``ctx.add_aux_loss("load_balance", ...)``).

Training options of ``routing=router`` (all off by default):

* ``router_warmup_steps``: for the first training steps (``AttentionContext.step``) every head is
  active and the routed ones are weighted densely, ``g_i = 2 a2 * E * softmax(W_r x_t)_i`` (1 per
  head under uniform routing, like the top-k weights), so the router and every head train before
  the selection starts; the load-balance loss keeps balancing the top-k choice the router would
  make. The statistics show the switch: every ``head_frequency`` is 1 and ``dense_routing`` is 1
  during the warm-up. Evaluation and decoding always route top-k.
* ``router_lr_multiplier``: the router's weights form an optimizer group of their own with
  ``lr * router_lr_multiplier`` (:meth:`parameter_group_hints`); decay follows the usual rule.
* ``straight_through``: the top-k weights in the forward, the gradient of the dense weights
  ``E * softmax(W_r x_t)`` in the backward (:func:`top_k_gates`), so the logits of the heads a
  token did not select learn from those heads' outputs, which training computes anyway.

``window``: every head attends within a sliding window, keys ``t - window < s <= t``, through the
``sliding`` mechanism's attention core and its rolling cache of ``min(window, context)`` tokens;
routing is unchanged (``routing=all`` with a window is ``sliding`` with these heads).

``routing``: ``router`` (the above), ``static`` (heads ``0 .. n_shared_heads + top_k - 1`` always
active with weight 1: static head pruning, no router) or ``all`` (every head, weight 1: exactly
GQA with ``n_heads`` / ``n_kv_heads`` heads and the same q/k/v/o weights).

Heads and cache: MoH has its own ``n_heads`` (``head_dim = d_model / n_heads``), grouped onto
``n_kv_heads`` key/value heads as in GQA: query head ``h`` reads KV head ``h // (n_heads /
n_kv_heads)``. Any later token may activate any head, so the cache holds K/V of every KV head:
``2 * n_kv_heads * head_dim`` values per token and layer (of the last ``window`` tokens with a
window). What is computed:

* Decoding one sequence (a single token): from ``skip_heads_from`` cached tokens on, exactly the
  active query heads are computed (:func:`~attnlab.attention._moh_decode.attend_heads`, which
  plans the kernel calls from the active heads read to the host): a KV group is read once for
  all its active heads (they become query rows of one packed call) and not at all when none is
  active; K/V are only sliced, never gathered. Below, as a batch. ``static`` and ``all`` take
  the same path.
* A static decoding step (:meth:`decode_step`, compiled decoding): every head, weighted by the
  router's gates, since reading the active heads to the host would break the compiled graph at
  every layer.
* Any other call (a batch, a prompt): the KV groups that some token of the call needs, in
  contiguous runs of groups (slices of K/V); inactive heads inside them are computed and
  weighted 0. ``static`` never computes the groups beyond its heads. Training with ``router``
  computes every group: a group goes unused by a whole batch almost never, and finding out would
  stall the device once per layer.

With 4 KV heads of 2 query heads, a token's 2 inactive routed heads share a group 1 time in 5;
otherwise they leave two groups with one active head each, so the saving is the per-head share
of a group's cost (its K/V is read either way); measured speeds in the README ("Decoding at
long context").

Router init: one bias-free ``nn.Linear`` holding ``[W_r; W_s; W_h]``, initialised by the model's
GPT-2 init, N(0, 0.02): small logits give near-uniform routing (every active head starts with
weight ~1, like MHA), and non-zero ones break the ties between routed heads differently for each
token, so every routed head is trained and every router row gets a gradient from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig, divisors, require

from ._moh_decode import attend_heads, contiguous_runs
from .base import (
    Attention,
    AttentionCache,
    AttentionConfig,
    AttentionContext,
    KVCache,
    ParameterGroupHint,
    mark_residual_projection,
    sdpa_in_context,
    sdpa_static,
    token_mean,
)
from .gqa import GroupedQueryAttention
from .registry import register_attention
from .sliding import RollingKVCache, SlidingWindowAttention

ROUTINGS = ("router", "static", "all")


def top_k_gates(logits: Tensor, top_k: int, straight_through: bool = False) -> tuple[Tensor, Tensor]:
    """Routed heads' weights from their router ``logits`` ``(..., E)``: ``top_k * softmax`` over each
    token's ``top_k`` highest logits, 0 for the others; and that selection ``(..., E)`` bool.
    ``straight_through``: the same values, differentiated as the dense ``E * softmax(logits)``."""
    chosen = logits.topk(top_k, dim=-1).indices
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True)
    gates = top_k * logits.masked_fill(~selected, float("-inf")).softmax(-1)
    if straight_through:
        dense = logits.shape[-1] * logits.softmax(-1)
        gates = gates.detach() + (dense - dense.detach())  # ``dense - dense.detach()`` is exactly 0
    return gates, selected


@dataclass
class MoHConfig(AttentionConfig):
    #: MoH's own query heads (not ``model.n_heads``): ``head_dim = d_model / n_heads``.
    n_heads: int = 8
    #: Key/value heads; query heads share them in groups of ``n_heads / n_kv_heads``.
    n_kv_heads: int = 4
    #: Heads active for every token (the first ones).
    n_shared_heads: int = 2
    #: Routed heads each token activates, out of ``n_heads - n_shared_heads``.
    top_k: int = 4
    #: ``router`` (MoH), ``static`` (first ``n_shared_heads + top_k`` heads) or ``all`` (GQA).
    routing: str = "router"
    #: Scale of the load-balance loss (the paper's beta), ``routing=router`` only.
    load_balance_weight: float = 0.01
    #: Decoding one sequence computes only the active heads once the cache holds this many
    #: tokens; below, every KV group an active head needs, in fewer and larger kernel calls (on
    #: 2 CPU cores the extra calls cost more than the skipped heads save below ~16k tokens).
    skip_heads_from: int = 16384
    #: Training steps of dense routing (``routing=router``): every head active, the routed ones
    #: weighted ``E * softmax(W_r x)`` (1 each under uniform routing); top-k routing after.
    router_warmup_steps: int = 0
    #: The router's learning rate as a multiple of the run's (an optimizer group of its own).
    router_lr_multiplier: float = 1.0
    #: Straight-through top-k gates: the forward as without, the backward as if the routed heads
    #: were weighted by the dense ``E * softmax(W_r x)``, so unselected heads' logits learn too.
    straight_through: bool = False
    #: Every head attends within a sliding window (keys ``t - window < s <= t``; the ``sliding``
    #: mechanism's kernels and rolling cache); null: over the whole causal context.
    window: int | None = None

    def validate(self, model: ModelConfig, field: str) -> None:
        require(self.n_heads >= 1 and model.d_model % self.n_heads == 0, f"{field}.n_heads", self.n_heads,
                f"divisors of model.d_model={model.d_model}: {divisors(model.d_model)}",
                reason="must divide model.d_model")
        if model.pos_encoding == "rope":
            require((model.d_model // self.n_heads) % 2 == 0, f"{field}.n_heads", self.n_heads,
                    "a head count giving an even head dimension",
                    reason=f"RoPE needs an even head dimension, got d_model/n_heads={model.d_model // self.n_heads}")
        require(1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
                f"{field}.n_kv_heads", self.n_kv_heads,
                f"divisors of {field}.n_heads={self.n_heads}: {divisors(self.n_heads)}",
                reason=f"must divide {field}.n_heads")
        require(0 <= self.n_shared_heads < self.n_heads, f"{field}.n_shared_heads", self.n_shared_heads,
                f"an integer in [0, {field}.n_heads - 1 = {self.n_heads - 1}]",
                reason="at least one head must be routed")
        n_routed = self.n_heads - self.n_shared_heads
        require(1 <= self.top_k <= n_routed, f"{field}.top_k", self.top_k,
                f"an integer in [1, n_heads - n_shared_heads = {n_routed}]")
        require(self.routing in ROUTINGS, f"{field}.routing", self.routing, " | ".join(ROUTINGS))
        require(self.load_balance_weight >= 0, f"{field}.load_balance_weight", self.load_balance_weight,
                "a number >= 0")
        require(self.skip_heads_from >= 0, f"{field}.skip_heads_from", self.skip_heads_from,
                "a number of cached tokens >= 0")
        require(isinstance(self.router_warmup_steps, int) and self.router_warmup_steps >= 0,
                f"{field}.router_warmup_steps", self.router_warmup_steps, "an integer >= 0")
        require(self.router_lr_multiplier > 0, f"{field}.router_lr_multiplier", self.router_lr_multiplier,
                "a number > 0")
        require(isinstance(self.straight_through, bool), f"{field}.straight_through", self.straight_through,
                "true | false")
        require(self.window is None or (isinstance(self.window, int) and self.window >= 1), f"{field}.window",
                self.window, "an integer >= 1, or null for the whole causal context")


@register_attention("moh")
class MixtureOfHeadsAttention(Attention):
    Config = MoHConfig
    # the structures reach its GQA attention calls (projections, masks) unchanged
    supports_bidirectional = True
    supports_cross_attention = True
    supports_key_padding = True

    def __init__(self, cfg: MoHConfig, model: ModelConfig, layer_idx: int):
        super().__init__(cfg, model, layer_idx)
        self.n_heads = cfg.n_heads
        self.head_dim = model.d_model // cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.group_size = cfg.n_heads // cfg.n_kv_heads
        self.routing = cfg.routing
        self.n_shared = cfg.n_shared_heads
        self.n_routed = cfg.n_heads - cfg.n_shared_heads
        self.top_k = cfg.top_k
        self.load_balance_weight = cfg.load_balance_weight
        self.router_warmup_steps = cfg.router_warmup_steps
        self.straight_through = cfg.straight_through
        self.window = cfg.window
        if self.window is not None:
            self.block_size = min(self.window, 128)  # the sliding mechanism's default query block

        # q/k/v/o exactly as GroupedQueryAttention names and lays them out (routing=all is GQA)
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv_proj = nn.Linear(self.d_model, sum(self.split), bias=model.bias)
        self.out_proj = mark_residual_projection(nn.Linear(q_dim, self.d_model, bias=model.bias))

        self.router: nn.Linear | None = None
        if self.routing == "router":
            # rows [W_r; W_s; W_h]; a softmax over a single logit is constant, so it gets no rows
            self.router_split = (self.n_routed if self.n_routed > 1 else 0,
                                 self.n_shared if self.n_shared > 1 else 0,
                                 2 if self.n_shared > 0 else 0)
            if sum(self.router_split) > 0:
                self.router = nn.Linear(self.d_model, sum(self.router_split), bias=False)

        n_active = self.n_shared + self.top_k
        static = torch.arange(self.n_heads) < n_active
        # (H,) weights of routing=static: 1 for its heads, 0 for the pruned ones
        self.register_buffer("static_gates", static.float(), persistent=False)
        #: Groups routing=static computes: those holding one of its heads.
        self.static_groups = static.view(self.n_kv_heads, self.group_size).any(-1).tolist()

    # ----------------------------------------------------------------------------- routing
    def route(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        """``x`` ``(B, T, C)`` -> head weights ``g`` ``(B, T, H)`` (at least float32; 0 for inactive heads) and
        the routed heads' selection ``(B, T, E)`` bool. Adds the load-balance loss in training."""
        B, T, _ = x.shape
        # routing in at least float32, also under bf16 autocast
        if self.router is not None:
            logits = self.router(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        else:
            logits = x.new_zeros(B, T, 0, dtype=torch.promote_types(x.dtype, torch.float32))
        routed_logits, shared_logits, type_logits = logits.split(self.router_split, dim=-1)
        ones = logits.new_ones(B, T, 1)
        dense = self.dense_routing(ctx)
        if self.n_routed > 1:
            probs = routed_logits.softmax(-1)
            g_routed, selected = top_k_gates(routed_logits, self.top_k, self.straight_through and not dense)
            if dense:  # warm-up: every routed head; the loss below still balances the top-k choice
                g_routed = self.n_routed * probs
        else:  # a single routed head: always selected, all of its type's weight
            probs = g_routed = ones
            selected = ones.bool()
        if self.n_shared:
            shared = shared_logits.softmax(-1) if self.n_shared > 1 else ones
            balance = type_logits.softmax(-1)  # (B, T, 2): [a1, a2]
            gates = torch.cat([2 * balance[..., :1] * self.n_shared * shared,
                               2 * balance[..., 1:] * g_routed], dim=-1)
        else:
            balance = torch.cat([torch.zeros_like(ones), ones], dim=-1)  # a1 = 0, a2 = 1
            gates = g_routed

        real = ctx.real_queries(T)  # padded tokens count in neither the loss nor the statistics
        if ctx.training and self.n_routed > 1 and self.load_balance_weight > 0:
            frequency = token_mean(selected.float(), real)  # f_i, (E,)
            balance_loss = self.n_routed / self.top_k * (frequency * token_mean(probs, real)).sum()
            ctx.add_aux_loss("load_balance", self.load_balance_weight * balance_loss)
        if dense:
            selected = torch.ones_like(selected)
        if ctx.recording:
            self.record_selection(ctx, selected, real)
            ctx.record("dense_routing", logits.new_tensor(float(dense)))
            ctx.record("routing_entropy", token_mean(torch.special.entr(probs).sum(-1), real))
            ctx.record("shared_weight", token_mean(balance[..., 0], real))
            ctx.record("routed_weight", token_mean(balance[..., 1], real))
        return gates, selected

    def dense_routing(self, ctx: AttentionContext) -> bool:
        """Whether this is a training step of the router warm-up (every head active)."""
        return ctx.training and ctx.step is not None and ctx.step < self.router_warmup_steps

    def structure_issue(self, structure: str) -> str | None:
        if self.window is not None and structure == "cross_attention":
            return SlidingWindowAttention.unsupported_reasons["cross_attention"]
        return super().structure_issue(structure)

    def parameter_group_hints(self) -> list[ParameterGroupHint]:
        if self.router is None:
            return []
        return [ParameterGroupHint("router", tuple(self.router.parameters()), self.cfg.router_lr_multiplier)]

    def head_gates(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor | None, Tensor]:
        """The head weights of ``x`` ``(B, T, C)`` for every routing, ``(B, T, H)`` or ``(H,)`` (None:
        every head with weight 1), and the active heads ``(B, T, H)`` bool. Records the routed
        heads' selection when statistics are recorded."""
        B, T, _ = x.shape
        if self.routing == "router":
            gates, selected = self.route(x, ctx)
            return gates, torch.cat([selected.new_ones(B, T, self.n_shared), selected], dim=-1)
        gates = self.static_gates if self.routing == "static" else None
        active = (self.static_gates.bool() if gates is not None
                  else torch.ones(self.n_heads, dtype=torch.bool, device=x.device)).expand(B, T, self.n_heads)
        if ctx.recording:
            self.record_selection(ctx, active[..., self.n_shared:])
        return gates, active

    def needed_groups(self, active: Tensor, ctx: AttentionContext) -> list[bool]:
        """The KV groups ``(H_kv,)`` holding a head that some token of the call activates
        (``active`` ``(B, T, H)``). Training with ``router`` takes every group: a group goes
        unused by a whole batch almost never, and finding out would stall the device."""
        if self.routing == "static":
            return self.static_groups
        if self.routing == "all" or ctx.training:
            return [True] * self.n_kv_heads
        return active.reshape(-1, self.n_kv_heads, self.group_size).any(-1).any(0).tolist()

    def record_selection(self, ctx: AttentionContext, selected: Tensor, real: Tensor | None = None) -> None:
        """Statistics of the routed heads' selection ``(B, T, E)`` (over the ``real`` ``(B, T)`` tokens)."""
        active = selected.float()
        ctx.record("head_active", active)
        for j, frequency in enumerate(token_mean(active, real)):
            ctx.record(f"head_frequency/{j}", frequency)

    # ----------------------------------------------------------------------------- attention
    #: q/k/v heads are laid out exactly as in GQA: ``x (B, T, C)`` -> rotated ``q (B, H, T, D)``,
    #: ``k, v (B, H_kv, T, D)``.
    project = GroupedQueryAttention.project

    #: With a ``window``: the sliding mechanism's attention core, ``q`` ``(B, H, T, D)`` over ``k, v``
    #: ``(B, H_kv, n_prefix + T, D)`` -> ``(B, T, H * D)`` (flex attention or the blocked band).
    window_attend = SlidingWindowAttention.attend

    def attend_groups(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, n_prefix: int, first: int,
                      end: int) -> Tensor:
        """Attention (causal unless ``ctx`` says otherwise, within the window if there is one) of the
        query heads of KV groups ``first .. end-1`` over keys whose first ``n_prefix`` precede the
        queries' own: ``(B, (end-first)*G, T, D)``."""
        G = self.group_size
        q, k, v = q[:, first * G:end * G], k[:, first:end], v[:, first:end]
        if self.window is None:
            return sdpa_in_context(q, k, v, ctx, ctx.start_pos, self.dropout_p)
        B, H, T, D = q.shape
        return self.window_attend(q, k, v, n_prefix, ctx).reshape(B, T, H, D).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, n_prefix: int,
               groups: list[bool]) -> Tensor:
        """Attention ``(B, H, T, D)`` for the groups flagged in ``groups`` ``(H_kv,)``; zeros elsewhere."""
        runs = contiguous_runs(groups)
        if runs == [(0, self.n_kv_heads)]:
            return self.attend_groups(q, k, v, ctx, n_prefix, 0, self.n_kv_heads)
        y = q.new_zeros(q.shape)
        for first, end in runs:
            y[:, first * self.group_size:end * self.group_size] = self.attend_groups(q, k, v, ctx, n_prefix, first, end)
        return y

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        if isinstance(cache, RollingKVCache):  # the keys the window shows the new tokens
            k, v = cache.extend(k, v, ctx.start_pos, self.window)
            if T == 1 and ctx.key_padding_mask is not None:  # one token's are in slot order; flags by position
                k, v = cache.recent(ctx.start_pos + 1, k.shape[2])
        elif cache is not None:
            assert isinstance(cache, KVCache)
            k, v = cache.update(k, v, ctx.start_pos)

        gates, active = self.head_gates(x, ctx)
        if (B * T == 1 and not ctx.training and not ctx.recording and ctx.key_padding_mask is None
                and k.shape[2] >= self.cfg.skip_heads_from):
            # decoding one sequence at a long context: only the active heads computed
            y = attend_heads(q, k, v, active.view(-1).nonzero().flatten().tolist(), self.group_size)
        else:
            y = self.attend(q, k, v, ctx, k.shape[2] - T, self.needed_groups(active, ctx))
        y = y.transpose(1, 2)  # (B, T, H, D)
        if gates is not None:
            y = y * gates.to(y.dtype).unsqueeze(-1)
        return self.out_proj(y.reshape(B, T, -1))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """The static step (compiled decoding): every head over the whole cache, weighted by the
        gates (0 for inactive heads), none of the per-active-set kernel calls of :meth:`forward`'s
        single-sequence path, whose Python control flow depends on the routing of each token.
        With a ``window`` the rolling buffer's slots hold exactly the visible keys once written."""
        assert isinstance(cache, (KVCache, RollingKVCache))
        B = x.shape[0]
        q, k, v = self.project(x, ctx)
        k, v = cache.update_at(k, v, ctx.start_pos)
        y = sdpa_static(q, k, v, ctx).transpose(1, 2)  # (B, 1, H, D)
        gates, _ = self.head_gates(x, ctx)
        if gates is not None:
            y = y * gates.to(y.dtype).unsqueeze(-1)
        return self.out_proj(y.reshape(B, 1, -1))

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> KVCache | RollingKVCache:
        if self.window is not None:
            return RollingKVCache(batch_size, self.n_kv_heads, min(self.window, max_len), self.head_dim, device, dtype)
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, self.head_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        held = context_len if self.window is None else min(self.window, context_len)
        return 2 * batch_size * self.n_kv_heads * self.head_dim * held * element
