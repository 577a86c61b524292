"""Trusted compiled CPU steps call inductor's graph directly (``attnlab.direct_step``): the same
logits and cache writes as the precompiled function they were recorded from and as the eager
static step, and a fall back to that function wherever the recording does not stand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._inductor.output_code import CompiledFxGraph

from attnlab import direct_step
from attnlab.model import _PRECOMPILED_STEPS, GPT
from tests.conftest import TINY_MODEL


def prefilled(model: GPT, prompt: torch.Tensor, copies: int, max_len: int):
    caches = [model.init_cache(prompt.shape[0], max_len) for _ in range(copies)]
    for cache in caches:
        model(prompt, cache=cache)
    return caches


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own steps from scratch: after other models, dynamo would compile a
    step with symbolic widths, whose derived numbers (half a head) a recording does not replay."""
    torch._dynamo.reset()


def recorded(cache):
    entry = direct_step._RECORDED.get(cache)
    return None if entry is None else entry[1]


def decode_three_ways(model: GPT, tokens: torch.Tensor, max_len: int):
    """Logits of steps 6.. of ``tokens`` through ``GPT.step`` (compiled, trusted from the second),
    through the precompiled function on a twin cache, and eagerly; and the two compiled caches."""
    with torch.no_grad():
        direct, through, eager = prefilled(model, tokens[:, :6], 3, max_len)
        logits = [model.step(tokens[:, t:t + 1], direct, compile=True, trust_guards=t > 6)
                  for t in range(6, tokens.shape[1])]
        fn = _PRECOMPILED_STEPS[model]
        by_fn, by_eager = [], []
        for t in range(6, tokens.shape[1]):
            by_fn.append(fn(model, tokens[:, t:t + 1], through))
            through.advance(1)
            by_eager.append(model.step(tokens[:, t:t + 1], eager))
    return torch.stack(logits), torch.stack(by_fn), torch.stack(by_eager), direct, through


@pytest.mark.parametrize("attention", ["mha", "sliding", "linear", "sparse", "moh"])
def test_trusted_steps_call_the_graph_directly_and_equal_the_function_and_eager(attention):
    """Steps 2.. of a stream go straight to the graph; they equal, bit for bit, the precompiled
    function called on a twin cache (the same graph), and the eager static step within float32
    rounding; the cache state they leave equals the function's."""
    model = GPT.from_config(TINY_MODEL, attention).eval()
    logits, by_fn, by_eager, direct, through = decode_three_ways(model, torch.randint(0, 97, (1, 16)), 16)
    assert recorded(direct) is not None
    torch.testing.assert_close(logits, by_fn, atol=0, rtol=0)
    torch.testing.assert_close(logits, by_eager, atol=2e-5, rtol=1e-4)
    for mine, theirs in zip(direct.layers, through.layers):
        for a, b in zip(mine.tensors(), theirs.tensors()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_second_model_and_cache_length_compiled_with_symbolic_sizes_still_run_directly():
    """Compiled after another vocabulary and cache length, the step gets symbolic sizes, which
    reach the graph as numbers beside the tensors: sizes of them, so the recording keeps them."""
    for vocab_size, max_len in ((97, 16), (61, 24)):
        model = GPT.from_config({**TINY_MODEL, "vocab_size": vocab_size}, "mha").eval()
        logits, by_fn, by_eager, direct, _ = decode_three_ways(model, torch.randint(0, vocab_size, (1, max_len)), max_len)
        assert recorded(direct) is not None
        torch.testing.assert_close(logits, by_fn, atol=0, rtol=0)
        torch.testing.assert_close(logits, by_eager, atol=2e-5, rtol=1e-4)


def test_a_direct_step_bumps_the_caches_version_counters():
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    tokens = torch.randint(0, 97, (1, 8))
    (cache,) = prefilled(model, tokens[:, :4], 1, 16)
    with torch.no_grad():
        model.step(tokens[:, 4:5], cache, compile=True)
        state = [t for layer in cache.layers for t in layer.tensors()]
        before = [t._version for t in state]
        model.step(tokens[:, 5:6], cache, compile=True, trust_guards=True)
    assert recorded(cache) is not None
    assert all(t._version > v for t, v in zip(state, before))


def test_each_cache_keeps_its_own_recording():
    """Trusted steps alternating between two caches of one model write each its own cache."""
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        first, second, first_eager, second_eager = (
            *prefilled(model, tokens[:1, :5], 1, 16), *prefilled(model, tokens[1:, :5], 1, 16),
            *prefilled(model, tokens[:1, :5], 1, 16), *prefilled(model, tokens[1:, :5], 1, 16))
        got, want = [], []
        for t in range(5, 16):
            for row, cache, eager in ((0, first, first_eager), (1, second, second_eager)):
                got.append(model.step(tokens[row:row + 1, t:t + 1], cache, compile=True, trust_guards=t > 5))
                want.append(model.step(tokens[row:row + 1, t:t + 1], eager))
    assert recorded(first) is not None and recorded(second) is not None and recorded(first) is not recorded(second)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=2e-5, rtol=1e-4)


def test_a_checked_step_records_again_after_a_parameter_is_replaced():
    """A parameter replaced by another tensor (not written in place) is what a recording cannot
    see: the checked step that must follow such a change records the new inputs."""
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    tokens = torch.randint(0, 97, (1, 12))
    compiled, eager = prefilled(model, tokens[:, :4], 2, 16)
    with torch.no_grad():
        for t in range(4, 7):
            model.step(tokens[:, t:t + 1], compiled, compile=True, trust_guards=t > 4)
            model.step(tokens[:, t:t + 1], eager)
        up = model.blocks[1].mlp.up
        up.weight = nn.Parameter(up.weight * 3.0)
        got = [model.step(tokens[:, t:t + 1], compiled, compile=True, trust_guards=t > 7) for t in range(7, 12)]
        want = [model.step(tokens[:, t:t + 1], eager) for t in range(7, 12)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=2e-5, rtol=1e-4)


def test_a_token_of_another_shape_still_stops_at_the_graphs_size_checks():
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    (cache,) = prefilled(model, torch.randint(0, 97, (1, 4)), 1, 16)
    with torch.no_grad():
        model.step(torch.zeros(1, 1, dtype=torch.long), cache, compile=True)
        model.step(torch.zeros(1, 1, dtype=torch.long), cache, compile=True, trust_guards=True)
        assert recorded(cache) is not None
        with pytest.raises(RuntimeError, match="size"):
            direct_step.call_precompiled(_PRECOMPILED_STEPS[model], model, torch.zeros(2, 1, dtype=torch.long),
                                         cache, trusted=True)


def test_where_no_graph_is_found_every_step_goes_through_the_function(monkeypatch):
    monkeypatch.setattr(direct_step, "compiled_graph", lambda fn: None)
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    tokens = torch.randint(0, 97, (1, 10))
    compiled, eager = prefilled(model, tokens[:, :4], 2, 16)
    calls = []
    with torch.no_grad():
        model.step(tokens[:, 4:5], compiled, compile=True)
        fn = _PRECOMPILED_STEPS[model]
        monkeypatch.setattr(fn, "fn", lambda *a, inner=fn.fn: calls.append(1) or inner(*a))
        got = [model.step(tokens[:, t:t + 1], compiled, compile=True, trust_guards=True) for t in range(5, 10)]
        want = [model.step(tokens[:, t:t + 1], eager) for t in range(4, 10)][1:]
    assert direct_step._RECORDED[compiled] == (fn, None)
    assert len(calls) == 5
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=2e-5, rtol=1e-4)


def test_the_graph_is_found_only_behind_an_aot_compiled_function():
    assert direct_step.compiled_graph(lambda: None) is None
    assert direct_step.compiled_graph(object()) is None


class FakePrecompiled:
    """An ``aot_compile`` function's shape, small: ``_artifacts.compiled_fn`` holds (in a closure)
    an inductor graph, called with ``[token, first state tensor, extra]``; ``wrap`` is what its
    wrappers do to the graph's outputs."""

    def __init__(self, extra, wrap=lambda outputs: outputs[0]):
        graph = object.__new__(CompiledFxGraph)
        graph.current_callable = lambda inputs: [inputs[1][0, 0, 0, :1] + inputs[0][0].float()]

        def compiled_fn(inputs):
            return wrap(graph.current_callable(inputs))

        self._artifacts = SimpleNamespace(compiled_fn=compiled_fn)
        self.extra = extra

    def __call__(self, model, token, cache):
        return self._artifacts.compiled_fn([token, cache.layers[0].tensors()[0], self.extra])


@pytest.mark.parametrize("extra,wrap,repeatable", [
    ("size", None, True),  # a size of an input tensor: the symbolic cache length
    (7, None, False),  # any other number: where it came from, and whether it stays, is unknown
    (7.0, None, False),
    ("size", lambda outputs: outputs[0].clone(), False),  # the wrappers replace the output
    ("size", lambda outputs: outputs, False),  # or give more than it
])
def test_only_a_call_of_tensors_and_their_sizes_with_its_output_passed_through_is_repeated(extra, wrap, repeatable):
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    cache = model.init_cache(1, 13)
    fn = FakePrecompiled(cache.layers[0].tensors()[0].shape[2] if extra == "size" else extra,
                         **({} if wrap is None else {"wrap": wrap}))
    token = torch.tensor([[3]])
    logits, direct = direct_step.record_graph_call(fn, model, token, cache)
    assert (direct is not None) == repeatable
    if repeatable:
        assert direct_step.compiled_graph(fn) is not None
        torch.testing.assert_close(direct(torch.tensor([[5]])), logits + 2)


def test_steps_compiled_with_symbolic_widths_stay_correct():
    """A step compiled after a model of other widths gets symbolic sizes and numbers derived from
    them; whichever way it is called, its logits are the eager step's."""
    tokens = torch.randint(0, 97, (1, 14))
    for width in (64, 32):
        model = GPT.from_config({**TINY_MODEL, "d_model": width}, "mha").eval()
        compiled, eager = prefilled(model, tokens[:, :4], 2, 16)
        with torch.no_grad():
            got = [model.step(tokens[:, t:t + 1], compiled, compile=True, trust_guards=t > 4) for t in range(4, 14)]
            want = [model.step(tokens[:, t:t + 1], eager) for t in range(4, 14)]
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=2e-5, rtol=1e-4)
