import logging
import math

import pytest
import torch

from attnlab.config import ConfigError, ModelConfig
from attnlab.model import GPT
from tests.conftest import TINY_MODEL


def test_gpt2_initialisation():
    model = GPT.from_config({**TINY_MODEL, "d_model": 256, "n_heads": 4, "d_ff": 1024, "n_layers": 8}, "mha")
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert math.isclose(std(model.tok_emb.weight), 0.02, rel_tol=0.05)
    assert math.isclose(std(model.blocks[0].attn.qkv_proj.weight), 0.02, rel_tol=0.05)
    residual = 0.02 / math.sqrt(2 * 8)
    assert math.isclose(std(model.blocks[3].attn.out_proj.weight), residual, rel_tol=0.05)
    assert math.isclose(std(model.blocks[3].mlp.down.weight), residual, rel_tol=0.05)
    assert torch.all(model.blocks[0].attn_norm.weight == 1)


def test_initial_loss_is_near_uniform():
    """With GPT-2 init the untrained model predicts close to uniformly: loss ~ ln(V)."""
    model = GPT.from_config({**TINY_MODEL, "vocab_size": 1000}, "mha")
    idx = torch.randint(0, 1000, (4, 64))
    loss = model(idx, targets=idx.roll(-1, 1)).loss.item()
    assert abs(loss - math.log(1000)) < 0.1


def test_tied_and_untied_embeddings():
    tied = GPT.from_config(TINY_MODEL, "mha")
    untied = GPT.from_config({**TINY_MODEL, "tie_embeddings": False}, "mha")
    assert tied.lm_weight is tied.tok_emb.weight
    assert untied.parameter_counts()["lm_head"] == 97 * 64
    assert untied.parameter_counts()["total"] == tied.parameter_counts()["total"] + 97 * 64


def test_parameter_breakdown_adds_up():
    model = GPT.from_config({**TINY_MODEL, "pos_encoding": "learned", "tie_embeddings": False}, "gqa_2")
    c = model.parameter_counts()
    assert c["total"] == c["embeddings"] + c["attention"] + c["feed_forward"] + c["norms"] + c["lm_head"]
    assert c["embeddings"] == 97 * 64 + 64 * 64
    assert c["feed_forward"] == 2 * (64 * 2 * 128 + 128 * 64)  # SwiGLU: fused gate+up, down
    assert c["attention"] == 2 * (2 * 64 * 64 + 2 * 64 * 2 * 16)


@pytest.mark.parametrize("overrides", [{"pos_encoding": "learned"}, {"norm": "layernorm", "mlp": "gelu", "bias": True}])
def test_model_variants_decode_like_full_forward(overrides):
    model = GPT.from_config({**TINY_MODEL, **overrides}, "gqa").eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.init_cache(2, 20)
        steps = [model(idx[:, :8], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 11)
    seq = prompt
    for _ in range(6):  # the slow way: full forward each step
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_top_k_sampling_stays_in_top_k():
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    prompt = torch.randint(0, 97, (1, 4))
    g = torch.Generator().manual_seed(0)
    out = model.generate(prompt, 1, temperature=1.0, top_k=3, generator=g)
    top3 = model(prompt).logits[0, -1].topk(3).indices
    assert out[0, -1] in top3


def test_learned_positions_limit():
    model = GPT.from_config({**TINY_MODEL, "pos_encoding": "learned"}, "mha")
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_cache_reports_bytes():
    model = GPT.from_config(TINY_MODEL, "mqa")
    cache = model.init_cache(1, 32)
    # 2 layers x (K and V) x 1 KV head x 16 dims x 32 positions x 4 bytes
    assert cache.nbytes() == 2 * 2 * 1 * 16 * 32 * 4 == model.cache_bytes(1, 32)


@pytest.mark.parametrize("field,value,allowed", [
    ("n_heads", 5, r"must divide model\.d_model; allowed: divisors of model\.d_model=64"),
    ("pos_encoding", "alibi", r"allowed: 'rope' \| 'learned'"),
    ("dropout", 1.5, r"allowed: a probability in \[0, 1\)"),
    ("d_model", 0, r"allowed: an integer >= 1"),
])
def test_invalid_model_config_names_field_value_and_allowed(field, value, allowed):
    from attnlab.config import from_dict

    with pytest.raises(ConfigError, match=rf"model\.{field}={value!r}.*{allowed}"):
        from_dict(ModelConfig, {**TINY_MODEL, field: value}, "model")


def test_unknown_model_field():
    from attnlab.config import from_dict

    with pytest.raises(ConfigError, match=r"model\.n_layer=4: unknown option for model; allowed: the fields"):
        from_dict(ModelConfig, {**TINY_MODEL, "n_layer": 4}, "model")


#: One preset per decode_step implementation, with windows and top-k small enough that the
#: steps cross them (the rolling buffer wraps, the indexer starts selecting).
STATIC_STEP_ATTENTION = ["mha", "gqa_2", "mla", "linear", "identity", "static_moas", "moas", "moh",
                         {"name": "sliding", "window": 5}, {"name": "sparse", "top_k": 5, "index_head_dim": 16}]


@pytest.mark.parametrize("attention", STATIC_STEP_ATTENTION, ids=lambda a: a if isinstance(a, str) else a["name"])
def test_compiled_static_step_is_one_graph_for_every_position(attention):
    """Traced with fullgraph=True (no graph breaks) and counted: one frame compiled for 22 steps
    whose position, window fill and top-k selection change, with the full forward's logits."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(GPT.static_step, backend=counter, fullgraph=True)
    model = GPT.from_config(TINY_MODEL, attention).eval()
    idx = torch.randint(0, 97, (2, 24))
    cache = model.init_cache(2, 24)
    with torch.no_grad():
        full = model(idx).logits
        model(idx[:, :2], cache=cache)
        steps = []
        for t in range(2, 24):
            steps.append(step(model, idx[:, t:t + 1], cache))
            cache.advance(1)
    assert counter.frame_count == 1
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 2:], atol=2e-5, rtol=1e-4)


def test_generate_compiled_equals_eager_and_compiles_once():
    """generate(compile=True) through inductor: one graph for all steps (dynamo's own counter),
    the same greedy tokens as eager decoding, and a second call with the same shapes reuses it;
    other lengths (other cache sizes) compile one more graph, for any length, and no other."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = GPT.from_config(TINY_MODEL, "gqa_2").eval()
    prompt = torch.randint(0, 97, (1, 5))
    eager = model.generate(prompt, max_new_tokens=20, temperature=0)
    graphs = counters["stats"]["unique_graphs"]
    compiled = model.generate(prompt, max_new_tokens=20, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert torch.equal(compiled, eager)
    again = model.generate(prompt.flip(1), max_new_tokens=20, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert torch.equal(again, model.generate(prompt.flip(1), max_new_tokens=20, temperature=0))
    for length in (9, 31):
        longer = model.generate(prompt, max_new_tokens=length, temperature=0, compile=True)
        assert torch.equal(longer, model.generate(prompt, max_new_tokens=length, temperature=0))
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_steps_with_trusted_guards_equal_checked_steps():
    """trust_guards=True (what stream uses after its first step) runs the graph the checked first
    step compiled, with the same logits at every later position, and compiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = GPT.from_config(TINY_MODEL, {"name": "sliding", "window": 4}).eval()
    idx = torch.randint(0, 97, (2, 16))
    checked, trusted = model.init_cache(2, 16), model.init_cache(2, 16)
    with torch.no_grad():
        full = model(idx).logits
        for cache in (checked, trusted):
            model(idx[:, :3], cache=cache)
        first = model.step(idx[:, 3:4], trusted, compile=True)  # compiles, guards checked
        graphs = counters["stats"]["unique_graphs"]
        logits = [first] + [model.step(idx[:, t:t + 1], trusted, compile=True, trust_guards=True) for t in range(4, 16)]
        reference = [model.step(idx[:, t:t + 1], checked, compile=True) for t in range(3, 16)]
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(torch.stack(logits, 1), torch.stack(reference, 1), atol=0, rtol=0)
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 3:], atol=2e-5, rtol=1e-4)


def test_cpu_steps_run_precompiled_checking_guards_unless_trusted(monkeypatch):
    """On CPU, step(compile=True) runs the step compiled ahead of time: checked steps ask its
    guards, trusted ones do not; where they fail (here: told so) the step is compiled again; the
    logits are those of the eager static step; the model is not kept alive by it."""
    import gc
    import weakref

    from attnlab import model as model_module

    model = GPT.from_config(TINY_MODEL, "gqa_2").eval()
    idx = torch.randint(0, 97, (1, 12))
    compiled_cache, eager_cache = model.init_cache(1, 12), model.init_cache(1, 12)
    checks = []
    with torch.no_grad():
        for cache in (compiled_cache, eager_cache):
            model(idx[:, :4], cache=cache)
        first = model.step(idx[:, 4:5], compiled_cache, compile=True)
        precompiled = model_module._PRECOMPILED_STEPS[model]
        assert type(precompiled).__name__ == "AOTCompiledFunction"
        monkeypatch.setattr(precompiled, "guard_check",
                            lambda *a, check=precompiled.guard_check: checks.append(1) or check(*a))
        logits = [first] + [model.step(idx[:, t:t + 1], compiled_cache, compile=True, trust_guards=t % 2 == 0)
                            for t in range(5, 12)]
        assert len(checks) == 4  # positions 5, 7, 9, 11: checked; 6, 8, 10: trusted
        eager = [model.step(idx[:, t:t + 1], eager_cache) for t in range(4, 12)]
        torch.testing.assert_close(torch.stack(logits), torch.stack(eager), atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(precompiled, "guard_check", lambda *a: False)
        again = [model.init_cache(1, 12) for _ in range(2)]
        for cache in again:
            model(idx[:, :4], cache=cache)
        recompiled = model.step(idx[:, 4:5], again[0], compile=True)
        torch.testing.assert_close(recompiled, model.step(idx[:, 4:5], again[1]), atol=1e-5, rtol=1e-5)
    assert model_module._PRECOMPILED_STEPS[model] is not precompiled
    model.forget_compiled_step()
    assert model not in model_module._PRECOMPILED_STEPS
    alive = weakref.ref(model)
    monkeypatch.undo()
    del model, precompiled
    gc.collect()
    assert alive() is None


def test_precompiling_after_the_same_seed_never_loads_another_models_step(monkeypatch, tmp_path):
    """A program that seeds Python's `random` the same way before each precompiled step (as
    Lightning's seed_everything does in every run) gets each model's own step: the precompiled
    step stays out of AOTAutograd's cache, whose key for it falls back to a nonce drawn from
    `random` (here: two models of different vocabularies and attention, one cache directory)."""
    import random

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing from other runs
    later_tests_stream = random.getstate()
    logits = []
    try:
        for vocab_size, attention in ((23, "gqa_2"), (97, "mha")):
            torch._dynamo.reset()
            model = GPT.from_config({**TINY_MODEL, "vocab_size": vocab_size}, attention).eval()
            idx = torch.randint(0, vocab_size, (1, 6))
            caches = model.init_cache(1, 12), model.init_cache(1, 12)
            with torch.no_grad():
                for cache in caches:
                    model(idx[:, :4], cache=cache)
                random.seed(0)
                compiled = model.step(idx[:, 4:5], caches[0], compile=True)
                torch.testing.assert_close(compiled, model.step(idx[:, 4:5], caches[1]), atol=1e-5, rtol=1e-5)
            logits.append(compiled)
            model.forget_compiled_step()
    finally:
        random.setstate(later_tests_stream)
    assert [t.shape[-1] for t in logits] == [23, 97]
    assert not list(tmp_path.glob("aotautograd/*/*"))  # nothing filed under a nonce


def test_a_step_that_cannot_be_precompiled_runs_through_dynamo(monkeypatch, caplog):
    from attnlab import model as model_module

    compiled = model_module.compiled_static_step("cpu")

    def refuse(*args, **kwargs):
        raise RuntimeError("no precompiling here")

    monkeypatch.setattr(compiled, "aot_compile", refuse)
    model = GPT.from_config(TINY_MODEL, "mha").eval()
    idx = torch.randint(0, 97, (1, 8))
    caches = model.init_cache(1, 8), model.init_cache(1, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="attnlab.model"):
        for cache in caches:
            model(idx[:, :4], cache=cache)
        steps = [model.step(idx[:, t:t + 1], caches[0], compile=True, trust_guards=t > 4) for t in range(4, 8)]
        eager = [model.step(idx[:, t:t + 1], caches[1]) for t in range(4, 8)]
    assert caplog.text.count("could not be compiled ahead of time") == 1  # tried once per model
    assert model_module._PRECOMPILED_STEPS[model] is None
    torch.testing.assert_close(torch.stack(steps), torch.stack(eager), atol=1e-5, rtol=1e-5)


def test_step_checks_the_cache_and_position_limits():
    model = GPT.from_config({**TINY_MODEL, "pos_encoding": "learned"}, "mha").eval()
    cache = model.init_cache(1, 3)
    with torch.no_grad():
        for _ in range(3):
            model.step(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="sequence of 4 positions exceeds the limit of 3"):
            model.step(torch.zeros(1, 1, dtype=torch.long), cache)
    assert cache.pos == 3 and int(cache.position) == 3


def test_generate_with_compile_falls_back_to_eager_without_a_static_step(caplog):
    model = GPT.from_config(TINY_MODEL, "moas_top1").eval()
    prompt = torch.randint(0, 97, (1, 4))
    with caplog.at_level("WARNING", logger="attnlab.model"):
        out = model.generate(prompt, max_new_tokens=5, temperature=0, compile=True)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=5, temperature=0))
    assert "decoding eagerly" in caplog.text and "routed top_k=1" in caplog.text


@pytest.mark.parametrize("attention", STATIC_STEP_ATTENTION, ids=lambda a: a if isinstance(a, str) else a["name"])
def test_static_step_under_bf16_autocast_matches_eager_decoding(attention):
    """16-bit rows written into a float32 cache (both paths), to bf16 rounding."""
    model = GPT.from_config(TINY_MODEL, attention).eval()
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager, static = model.init_cache(2, 24), model.init_cache(2, 24)
        model(idx[:, :8], cache=eager)
        model(idx[:, :8], cache=static)
        expected = [model(idx[:, t:t + 1], cache=eager).logits[:, -1] for t in range(8, 24)]
        steps = [model.step(idx[:, t:t + 1], static) for t in range(8, 24)]
    torch.testing.assert_close(torch.stack(steps), torch.stack(expected), atol=0.05, rtol=0.05)
