"""The precompiled CPU decoding step's inductor graph, called without the Python around it.

A call of the function :func:`attnlab.model.precompile_static_step` returns reaches the graph
inductor compiled only after dynamo's frame wrappers, the bytecode that gathers the graph's
inputs from the model and the cache attribute by attribute (36 tensors for a 4-layer MHA model)
and AOTAutograd's runtime wrapper: 55-75 µs of Python per token, 7-9% of an ``mha`` step at
context 4,096 (width 128, 2 threads). Between two steps of one model and one cache the graph's
inputs are the same tensors but the token, and for this graph (inference under ``no_grad``, no
random state, the cache written in place by the graph itself, one output) the wrappers do
nothing else but bump the version counters of the tensors it wrote.

:func:`record_graph_call` calls the function once, recording what reaches the graph and what
comes back; :class:`DirectGraphCall` then calls the graph with those inputs and a new token, and
bumps the cache's version counters itself. Where the call is not as described (not exactly one
inductor graph behind the function, the token not among its inputs exactly once, an input that
is neither a tensor nor one of their sizes, an output the wrappers replace or add to), nothing is
recorded and every step goes through the function. Inductor's size and stride asserts stay in
the graph, so a token of another shape still stops with an error.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab.attention import ModelCache

#: Objects visited at most while looking for the graph behind a compiled function (it sits 4 deep).
_MAX_VISITED = 64


def compiled_graph(fn: Any) -> Any | None:
    """The one inductor graph (``CompiledFxGraph``) behind ``fn``, an ``aot_compile`` function:
    found from the function its bytecode calls (``fn._artifacts.compiled_fn``) through the
    wrappers' ``compiled_fn`` / ``__wrapped__`` attributes and closures; None unless exactly one."""
    from torch._inductor.output_code import CompiledFxGraph

    start = getattr(getattr(fn, "_artifacts", None), "compiled_fn", None)
    todo = [start] if start is not None else []
    graphs, seen = [], set()
    while todo and len(seen) < _MAX_VISITED:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CompiledFxGraph):
            graphs.append(obj)
            continue
        for attr in ("compiled_fn", "__wrapped__"):
            inner = getattr(obj, attr, None)
            if callable(inner):
                todo.append(inner)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(inner):
                todo.append(inner)
    unique = {id(graph): graph for graph in graphs}
    return next(iter(unique.values())) if len(unique) == 1 else None


class DirectGraphCall:
    """The inputs a precompiled step passed its inductor graph for one model and cache, called
    again with another token: ``call(token)`` gives the logits ``(B, V)`` and writes the cache at
    its position, as the precompiled function would. It holds the cache's tensors and the model's
    weights (the graph's inputs), not the cache or the model."""

    def __init__(self, graph_call: Callable[[list], list], inputs: list[Tensor], token_slot: int,
                 token_dtype: torch.dtype, cache: ModelCache):
        self.token_dtype = token_dtype
        self._graph_call = graph_call
        self._inputs = inputs
        self._token_slot = token_slot
        # what the step writes (a superset: every state tensor of the cache), for autograd's checks
        self._written = [t for layer in cache.layers for t in layer.tensors()]

    def __call__(self, token: Tensor) -> Tensor:
        inputs = self._inputs.copy()  # the graph empties the list it is given
        inputs[self._token_slot] = token
        (logits,) = self._graph_call(inputs)
        torch.autograd.graph.increment_version(self._written)
        return logits


def record_graph_call(fn: Any, model: torch.nn.Module, token: Tensor, cache: ModelCache
                      ) -> tuple[Tensor, DirectGraphCall | None]:
    """``fn(model, token, cache)`` (a precompiled step), and the :class:`DirectGraphCall` that
    repeats it for another token, or None where the call is not one that can be repeated so."""
    graph = compiled_graph(fn)
    if graph is None:
        return fn(model, token, cache), None
    graph_call = graph.current_callable
    seen: list[list] = []

    def recording(inputs: list) -> list:
        seen.append(list(inputs))
        outputs = graph_call(inputs)
        seen.append(list(outputs))
        return outputs

    graph.current_callable = recording  # this graph's instance only, for this one call
    try:
        logits = fn(model, token, cache)
    finally:
        graph.current_callable = graph_call
    if len(seen) != 2:
        return logits, None
    inputs, outputs = seen
    token_slots = [i for i, x in enumerate(inputs) if x is token]
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    sizes = {size for x in tensors for size in x.shape}
    # the other inputs may only be sizes of these tensors: the symbolic cache length dynamo gives a
    # step compiled again for another cache length (its value is this cache's for as long as it lives)
    if (len(token_slots) != 1 or not all(type(x) is int and x in sizes for x in inputs if not isinstance(x, Tensor))
            or len(outputs) != 1 or outputs[0] is not logits):
        return logits, None
    return logits, DirectGraphCall(graph_call, inputs, token_slots[0], token.dtype, cache)


#: Per cache: the precompiled function its last checked step called, and that call recorded
#: (None: it cannot be repeated directly). Dropped with the cache.
_RECORDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def call_precompiled(fn: Any, model: torch.nn.Module, token: Tensor, cache: ModelCache, trusted: bool) -> Tensor:
    """``fn(model, token, cache)`` for the precompiled step ``fn``. A ``trusted`` call (nothing
    about the model and cache changed since the last step of ``fn`` on ``cache`` but values)
    calls the graph directly with that step's inputs; any other call goes through ``fn`` and is
    recorded for the trusted calls that follow it."""
    if trusted:
        recorded = _RECORDED.get(cache)
        if recorded is not None and recorded[0] is fn:
            direct = recorded[1]
            if direct is None:
                return fn(model, token, cache)
            if token.dtype == direct.token_dtype:
                return direct(token)
    logits, direct = record_graph_call(fn, model, token, cache)
    _RECORDED[cache] = (fn, direct)
    return logits
