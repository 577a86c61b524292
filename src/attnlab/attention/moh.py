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

``routing``: ``router`` (the above), ``static`` (heads ``0 .. n_shared_heads + top_k - 1`` always
active with weight 1: static head pruning, no router) or ``all`` (every head, weight 1: exactly
GQA with ``n_heads`` / ``n_kv_heads`` heads and the same q/k/v/o weights).

Heads and cache: MoH has its own ``n_heads`` (``head_dim = d_model / n_heads``), grouped onto
``n_kv_heads`` key/value heads as in GQA: query head ``h`` reads KV head ``h // (n_heads /
n_kv_heads)``. Any later token may activate any head, so the cache holds K/V of every KV head:
``2 * n_kv_heads * head_dim`` values per token and layer. What is computed:

* Decoding one sequence (a single token): routing runs on the host from one copy of the router
  logits. From ``skip_heads_from`` cached tokens on, exactly the active query heads are computed
  (:meth:`attend_heads`): a KV group is read once for all its active heads (they become query
  rows of one packed call) and not at all when none is active; K/V are only sliced, never
  gathered. Below, as a batch. ``static`` and ``all`` take the same path.
* A static decoding step (:meth:`decode_step`, compiled decoding): every head, weighted by the
  router's gates as tensors, since host routing would break the compiled graph at every layer.
* Any other call (a batch, a prompt): the KV groups that some token of the call needs, in
  contiguous runs of groups (slices of K/V); inactive heads inside them are computed and
  weighted 0. ``static`` never computes the groups beyond its heads. Training with ``router``
  computes every group: a group goes unused by a whole batch almost never, and finding out would
  stall the device once per layer.

With 4 KV heads of 2 query heads, a token's 2 inactive routed heads share a group 1 time in 5;
otherwise they leave two groups with one active head each, so the saving is the per-head share
of a group's cost (its K/V is read either way): on 2 CPU cores about 15% of the attention time,
about even with the extra kernel calls and the routing at 16k cached tokens, 1.07-1.26x faster
decoding than ``routing=all`` at 32k-64k (README, "Decoding at long context").

Router init: one bias-free ``nn.Linear`` holding ``[W_r; W_s; W_h]``, initialised by the model's
GPT-2 init, N(0, 0.02): small logits give near-uniform routing (every active head starts with
weight ~1, like MHA), and non-zero ones break the ties between routed heads differently for each
token, so every routed head is trained and every router row gets a gradient from the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig, divisors, require

from .base import (Attention, AttentionCache, AttentionConfig, AttentionContext, KVCache, mark_residual_projection,
                   sdpa, sdpa_causal)
from .gqa import GroupedQueryAttention
from .registry import register_attention

ROUTINGS = ("router", "static", "all")


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


def contiguous_runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive True entries: ``[T, T, F, T] -> [(0, 2), (3, 4)]``."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        elif flag:
            runs.append((i, i + 1))
    return runs


def strided_slices(indices: list[int]) -> list[slice]:
    """Slices selecting exactly the sorted ``indices``: one when they are evenly spaced
    (``[1, 3] -> [1:4:2]``), else one per contiguous run (``[0, 1, 3] -> [0:2, 3:4]``)."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if all(b - a == step for a, b in zip(indices, indices[1:])):
        return [slice(indices[0], indices[-1] + 1, step)]
    return [slice(start, end, 1) for start, end in contiguous_runs([i in indices for i in range(indices[-1] + 1)])]


def host_softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


@register_attention("moh")
class MixtureOfHeadsAttention(Attention):
    Config = MoHConfig

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
        self._decode_plans: dict = {}

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
        if self.n_routed > 1:
            probs = routed_logits.softmax(-1)
            chosen = routed_logits.topk(self.top_k, dim=-1).indices
            selected = torch.zeros_like(routed_logits, dtype=torch.bool).scatter_(-1, chosen, True)
            # softmax over the selected heads only
            routed = routed_logits.masked_fill(~selected, float("-inf")).softmax(-1)
        else:  # a single routed head: always selected, all of its type's weight
            probs = routed = ones
            selected = ones.bool()
        g_routed = self.top_k * routed
        if self.n_shared:
            shared = shared_logits.softmax(-1) if self.n_shared > 1 else ones
            balance = type_logits.softmax(-1)  # (B, T, 2): [a1, a2]
            gates = torch.cat([2 * balance[..., :1] * self.n_shared * shared,
                               2 * balance[..., 1:] * g_routed], dim=-1)
        else:
            balance = torch.cat([torch.zeros_like(ones), ones], dim=-1)  # a1 = 0, a2 = 1
            gates = g_routed

        if ctx.training and self.n_routed > 1 and self.load_balance_weight > 0:
            frequency = selected.float().mean(dim=(0, 1))  # f_i, (E,)
            balance_loss = self.n_routed / self.top_k * (frequency * probs.mean(dim=(0, 1))).sum()
            ctx.add_aux_loss("load_balance", self.load_balance_weight * balance_loss)
        if ctx.recording:
            self.record_selection(ctx, selected)
            ctx.record("routing_entropy", torch.special.entr(probs).sum(-1).mean())
            ctx.record("shared_weight", balance[..., 0].mean())
            ctx.record("routed_weight", balance[..., 1].mean())
        return gates, selected

    def route_one_token(self, x: Tensor) -> tuple[list[float] | None, list[int]]:
        """Head weights ``(H,)`` (None: every head with weight 1) and the active heads, ascending,
        of a single token ``x`` ``(1, 1, C)``, computed on the host: :meth:`route`'s equations on
        one copy of the router's logits, instead of about twenty tensor operations (69 us per
        layer on 2 CPU cores, as much as skipping two heads saves at 16k cached tokens). Ties
        between routed scores go to the lower head index."""
        n_active = self.n_shared + self.top_k
        if self.routing == "all":
            return None, list(range(self.n_heads))
        if self.routing == "static":
            return [1.0] * n_active + [0.0] * (self.n_heads - n_active), list(range(n_active))
        logits = self.router(x).reshape(-1).tolist() if self.router is not None else []
        n_r, n_s, _ = self.router_split
        routed, shared, types = logits[:n_r], logits[n_r:n_r + n_s], logits[n_r + n_s:]
        if self.n_routed > 1:
            chosen = sorted(sorted(range(self.n_routed), key=lambda i: -routed[i])[:self.top_k])
            routed_weights = host_softmax([routed[i] for i in chosen])
        else:
            chosen, routed_weights = [0], [1.0]
        head_weights = [0.0] * self.n_heads
        routed_scale = float(self.top_k)
        if self.n_shared:
            shared_weights = host_softmax(shared) if self.n_shared > 1 else [1.0]
            a1, a2 = host_softmax(types)
            for i, weight in enumerate(shared_weights):
                head_weights[i] = 2 * a1 * self.n_shared * weight
            routed_scale *= 2 * a2
        for i, weight in zip(chosen, routed_weights):
            head_weights[self.n_shared + i] = routed_scale * weight
        return head_weights, list(range(self.n_shared)) + [self.n_shared + i for i in chosen]

    def record_selection(self, ctx: AttentionContext, selected: Tensor) -> None:
        """Statistics of the routed heads' selection ``(B, T, E)``."""
        active = selected.float()
        ctx.record("head_active", active)
        for j, frequency in enumerate(active.mean(dim=(0, 1))):
            ctx.record(f"head_frequency/{j}", frequency)

    # ----------------------------------------------------------------------------- attention
    #: q/k/v heads are laid out exactly as in GQA: ``x (B, T, C)`` -> rotated ``q (B, H, T, D)``,
    #: ``k, v (B, H_kv, T, D)``.
    project = GroupedQueryAttention.project

    def attend_groups(self, q: Tensor, k: Tensor, v: Tensor, start: int, first: int, end: int) -> Tensor:
        """Causal attention of the query heads of KV groups ``first .. end-1``: ``(B, (end-first)*G, T, D)``."""
        G = self.group_size
        return sdpa_causal(q[:, first * G:end * G], k[:, first:end], v[:, first:end], start, self.dropout_p)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int, groups: list[bool]) -> Tensor:
        """Attention ``(B, H, T, D)`` for the groups flagged in ``groups`` ``(H_kv,)``; zeros elsewhere."""
        runs = contiguous_runs(groups)
        if runs == [(0, self.n_kv_heads)]:
            return self.attend_groups(q, k, v, start, 0, self.n_kv_heads)
        y = q.new_zeros(q.shape)
        for first, end in runs:
            y[:, first * self.group_size:end * self.group_size] = self.attend_groups(q, k, v, start, first, end)
        return y

    def decode_plan(self, heads: tuple[int, ...], device: torch.device) -> list[tuple[slice, slice | Tensor]]:
        """How :meth:`attend_heads` computes the query heads ``heads`` of one token: calls of
        ``(KV groups, their active query heads)``, the groups a slice of the KV heads, the query
        heads a slice where evenly spaced, else an index. Planned once per set of active heads.

        Groups are batched by how many of their query heads are active (a group's active heads
        become query rows of one packed call, see :func:`sdpa`). A packed call runs one KV head
        per thread, so the groups beyond a multiple of the thread count run as a call of their
        own, which ``sdpa`` leaves unpacked: one query head per thread. Measured on 2 cores at
        65,536 cached tokens: 2 packed groups of 2 rows 741 us, 3 groups 1,435 us, 1 group
        1,484 us, 1 group unpacked 380 us."""
        threads = torch.get_num_threads()
        key = (heads, str(device), threads)
        plan = self._decode_plans.get(key)
        if plan is None:
            heads_of: dict[int, list[int]] = {}
            for h in heads:
                heads_of.setdefault(h // self.group_size, []).append(h)
            groups_with: dict[int, list[int]] = {}
            for group, members in heads_of.items():
                groups_with.setdefault(len(members), []).append(group)
            plan = []
            for rows, groups in sorted(groups_with.items()):
                for part in strided_slices(groups):
                    members = list(range(part.start, part.stop, part.step))
                    whole = len(members) - len(members) % threads if rows > 1 and len(members) > threads else len(members)
                    for chunk in (members[:whole], members[whole:]):
                        if chunk:
                            query_heads = [h for g in chunk for h in heads_of[g]]
                            evenly = strided_slices(query_heads)
                            select = evenly[0] if len(evenly) == 1 else torch.tensor(query_heads, device=device)
                            plan.append((strided_slices(chunk)[0], select))
            self._decode_plans[key] = plan
        return plan

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor, heads: list[int]) -> Tensor:
        """One token's attention ``(1, H, 1, D)`` for the query heads ``heads`` only (ascending;
        zeros for the others), over ``k, v`` ``(1, H_kv, S, D)``: inactive heads are not computed,
        a KV head is read once per call for all its active query heads, and K/V are only ever
        sliced (views), never gathered."""
        if len(heads) == self.n_heads:
            return sdpa(q, k, v)
        y = q.new_zeros(q.shape)
        for groups, select in self.decode_plan(tuple(heads), q.device):
            q_rows = q[:, select] if isinstance(select, slice) else q.index_select(1, select)
            out = sdpa(q_rows, k[:, groups], v[:, groups])
            if isinstance(select, slice):
                y[:, select] = out
            else:
                y.index_copy_(1, select, out)
        return y

    def forward(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        if cache is not None:
            assert isinstance(cache, KVCache)
            k, v = cache.update(k, v, ctx.start_pos)

        if B * T == 1 and not ctx.training and not ctx.recording:
            # decoding one sequence: routed on the host; only the active heads (or their KV groups) computed
            head_weights, heads = self.route_one_token(x)
            if k.shape[2] >= self.cfg.skip_heads_from:
                y = self.attend_heads(q, k, v, heads)
            else:
                needed = [False] * self.n_kv_heads
                for h in heads:
                    needed[h // self.group_size] = True
                y = self.attend(q, k, v, ctx.start_pos, needed)
            y = y.transpose(1, 2)  # (1, 1, H, D)
            if head_weights is not None:
                y = y * torch.tensor(head_weights, dtype=y.dtype, device=y.device).unsqueeze(-1)
            return self.out_proj(y.reshape(1, 1, -1))

        gates: Tensor | None = None  # (B, T, H) or (H,); None: every head with weight 1
        groups = [True] * self.n_kv_heads
        if self.routing == "router":
            gates, selected = self.route(x, ctx)
            if not ctx.training:
                # (B, T, E) -> (B, T, H) -> (H_kv,): groups with an active head anywhere in the call
                active = torch.cat([selected.new_ones(B, T, self.n_shared), selected], dim=-1)
                groups = active.view(B * T, self.n_kv_heads, self.group_size).any(-1).any(0).tolist()
        elif self.routing == "static":
            gates, groups = self.static_gates, self.static_groups
            if ctx.recording:
                self.record_selection(ctx, gates[self.n_shared:].bool().expand(B, T, self.n_routed))
        elif ctx.recording:
            self.record_selection(ctx, torch.ones(B, T, self.n_routed, dtype=torch.bool, device=x.device))

        y = self.attend(q, k, v, ctx.start_pos, groups).transpose(1, 2)  # (B, T, H, D)
        if gates is not None:
            y = y * gates.to(y.dtype).unsqueeze(-1)
        return self.out_proj(y.reshape(B, T, -1))

    def decode_step(self, x: Tensor, ctx: AttentionContext, cache: AttentionCache) -> Tensor:
        """The static step (compiled decoding): every head over the whole cache, weighted by the
        router's tensor gates (0 for inactive heads), none of the host routing and per-active-set
        kernel calls of :meth:`forward`'s single-sequence path, whose Python control flow depends
        on the routing of each token."""
        assert isinstance(cache, KVCache)
        B = x.shape[0]
        q, k, v = self.project(x, ctx)
        k, v = cache.update_at(k, v, ctx.start_pos)
        visible = ctx.visible(k.shape[2])
        y = sdpa(q, k, v, attn_mask=visible).transpose(1, 2)  # (B, 1, H, D)
        if self.routing == "router":
            y = y * self.route(x, ctx)[0].to(y.dtype).unsqueeze(-1)
        elif self.routing == "static":
            y = y * self.static_gates.to(y.dtype).unsqueeze(-1)
        return self.out_proj(y.reshape(B, 1, -1))

    def init_cache(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, self.head_dim, device, dtype)

    def cache_bytes(self, batch_size: int, context_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * batch_size * self.n_kv_heads * self.head_dim * context_len * element
