"""Mixture-of-Heads decoding of one sequence: exactly the active query heads of one token.

:func:`attend_heads` computes one token's attention for a given set of active query heads, in
the kernel calls :func:`plan_head_calls` plans for that set: a KV group is read once for all its
active heads (they become query rows of one packed call) and not at all when none is active;
K/V are only sliced, never gathered. The routing that picks the heads is MoH's
(:meth:`~attnlab.attention.moh.MixtureOfHeadsAttention.route`); this module only plans and runs.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .base import sdpa
from .kernels import cpu_threads

#: One kernel call: (the KV groups it reads, a slice of the KV heads; its query heads, a slice
#: where evenly spaced, else an index tensor).
HeadCall = tuple[slice, slice | Tensor]


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


@functools.lru_cache(maxsize=1024)
def plan_head_calls(heads: tuple[int, ...], group_size: int, threads: int, device: torch.device) -> tuple[HeadCall, ...]:
    """The kernel calls computing the query heads ``heads`` (ascending) of one token, KV head
    ``h // group_size`` serving query head ``h``, on ``threads`` CPU threads. Planned once per
    set of active heads (there are at most ``C(routed heads, top_k)``).

    Groups are batched by how many of their query heads are active (a group's active heads
    become query rows of one packed call, see :func:`~attnlab.attention.kernels.plan_sdpa`). A
    packed call runs one KV head per thread, so the groups beyond a multiple of the thread count
    run as a call of their own, which ``sdpa`` leaves unpacked: one query head per thread."""
    heads_of: dict[int, list[int]] = {}
    for h in heads:
        heads_of.setdefault(h // group_size, []).append(h)
    groups_with: dict[int, list[int]] = {}
    for group, members in heads_of.items():
        groups_with.setdefault(len(members), []).append(group)
    plan: list[HeadCall] = []
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
    return tuple(plan)


def attend_heads(q: Tensor, k: Tensor, v: Tensor, heads: list[int], group_size: int) -> Tensor:
    """One token's attention ``(1, H, 1, D)`` for the query heads ``heads`` only (ascending;
    zeros for the others), over ``k, v`` ``(1, H_kv, S, D)``: inactive heads are not computed,
    a KV head is read once per call for all its active query heads, and K/V are only ever
    sliced (views), never gathered."""
    if len(heads) == q.shape[1]:
        return sdpa(q, k, v)
    y = q.new_zeros(q.shape)
    for groups, select in plan_head_calls(tuple(heads), group_size, cpu_threads(), q.device):
        q_rows = q[:, select] if isinstance(select, slice) else q.index_select(1, select)
        out = sdpa(q_rows, k[:, groups], v[:, groups])
        if isinstance(select, slice):
            y[:, select] = out
        else:
            y.index_copy_(1, select, out)
    return y
