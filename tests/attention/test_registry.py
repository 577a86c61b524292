"""Contract tests run for every registered mechanism and every preset in conf/attention/.

A new mechanism is covered by these tests as soon as it is registered."""

from __future__ import annotations

import pytest
import torch

from attnlab.attention import (
    Attention,
    AttentionContext,
    get_registration,
    preset_names,
    register_attention,
    registered_names,
    resolve_attention,
)
from attnlab.attention import registry as registry_module
from attnlab.config import ConfigError, ModelConfig
from attnlab.model import GPT
from tests.conftest import TINY_MODEL

ALL_SPECS = [f"preset:{p}" for p in preset_names()] + [f"registered:{n}" for n in registered_names()]


def _spec(spec_id: str):
    kind, name = spec_id.split(":")
    if kind == "preset":
        from attnlab.attention import load_preset

        return load_preset(name)
    return {"name": name}


def _model(spec_id: str, **overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT.from_config({**TINY_MODEL, **overrides}, _spec(spec_id))
    return model.eval()


@pytest.mark.parametrize("spec_id", ALL_SPECS)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_cached_decoding_equals_full_forward(spec_id, batch_size):
    """Both decoding paths: one sequence (some mechanisms specialise it) and a batch."""
    model = _model(spec_id)
    idx = torch.randint(0, 97, (batch_size, 40))
    with torch.no_grad():
        full = model(idx).logits
        # prefill of 17 tokens, a chunk of 5, then one token at a time
        cache = model.init_cache(batch_size, 40)
        parts = [model(idx[:, :17], cache=cache).logits, model(idx[:, 17:22], cache=cache).logits]
        parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(22, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec_id", ALL_SPECS)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_static_decoding_step_equals_full_forward(spec_id, batch_size):
    """The static step (position as a tensor, whole buffers under a mask: what compiled decoding
    runs) after a prefill; a mechanism without one says why and the step refuses to run."""
    model = _model(spec_id)
    idx = torch.randint(0, 97, (batch_size, 40))
    cache = model.init_cache(batch_size, 40)
    with torch.no_grad():
        full = model(idx).logits
        parts = [model(idx[:, :17], cache=cache).logits]
        if model.decode_step_unsupported() is not None:
            with pytest.raises(ValueError, match="no static decoding step"):
                model.step(idx[:, 17:18], cache)
            return
        parts += [model.step(idx[:, t:t + 1], cache).unsqueeze(1) for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)
    assert cache.pos == 40 and int(cache.position) == 40
    assert cache.nbytes() == model.cache_bytes(batch_size, 40)


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_causality(spec_id):
    """Changing token j never changes outputs at positions before j."""
    model = _model(spec_id)
    idx = torch.randint(0, 97, (1, 48))
    changed = idx.clone()
    changed[0, 30:] = (changed[0, 30:] + 1) % 97
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :30], b[:, :30], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_gradients_reach_every_parameter(spec_id):
    model = _model(spec_id).train()
    idx = torch.randint(0, 97, (2, 48))
    out = model(idx, targets=torch.roll(idx, -1, dims=1))
    loss = out.loss + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("spec_id", ALL_SPECS)
@pytest.mark.parametrize("context", [1, 7, 40])
def test_cache_bytes_match_closed_form(spec_id, context):
    """The bytes the cache holds after ``context`` tokens equal the mechanism's closed form."""
    model = _model(spec_id)
    cache = model.init_cache(3, context)
    with torch.no_grad():
        model(torch.randint(0, 97, (3, context)), cache=cache)
    assert cache.nbytes() == model.cache_bytes(3, context)


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_batch_rows_are_independent(spec_id):
    model = _model(spec_id)
    idx = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        batched = model(idx).logits
        single = model(idx[1:2]).logits
    torch.testing.assert_close(batched[1:2], single, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_rope_models_run_beyond_their_context(spec_id):
    """With RoPE every mechanism that does not declare a length issue (none does today) runs on
    windows longer than ``max_seq_len`` (evaluation at other lengths), and the first
    ``max_seq_len`` outputs of a 2x window are those of a forward over them alone."""
    model = _model(spec_id, max_seq_len=24)
    issue = model.length_extrapolation_issue(48, trained_length=24)
    if issue is not None:
        pytest.skip(f"declares that it cannot: {issue}")
    idx = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        long = model(idx).logits
        short = model(idx[:, :24]).logits
    assert long.shape == (2, 48, 97) and torch.isfinite(long).all()
    torch.testing.assert_close(long[:, :24], short, atol=2e-5, rtol=1e-4)


def test_learned_positions_and_declared_limits_are_length_issues(monkeypatch):
    learned = _model("registered:gqa", pos_encoding="learned")
    assert learned.length_extrapolation_issue(64, trained_length=64) is None
    assert "learned absolute positions" in learned.length_extrapolation_issue(65, trained_length=64)
    # a mechanism declaring a limit (e.g. a learned parameter per position) names the layer
    mixture = _model("preset:static_moas")
    monkeypatch.setattr(mixture.blocks[1].attn.branches[2], "length_extrapolation_issue",
                        lambda: "one learned bias per position")
    assert mixture.length_extrapolation_issue(24, trained_length=64) is None
    assert mixture.length_extrapolation_issue(128, trained_length=64) == \
        f"layer 1 (static_moas): branch {mixture.blocks[1].attn.branch_names[2]}: one learned bias per position"


def test_unknown_mechanism_lists_registered_names(tiny_model_cfg):
    with pytest.raises(ConfigError) as error:
        resolve_attention({"name": "flashy"}, tiny_model_cfg)
    message = str(error.value)
    assert "attention.name='flashy'" in message
    for name in registered_names():
        assert name in message


def test_unknown_option_is_named(tiny_model_cfg):
    with pytest.raises(ConfigError, match=r"attention\.n_kv_head=2: unknown option"):
        resolve_attention({"name": "gqa", "n_kv_head": 2}, tiny_model_cfg)


def test_pinned_option_cannot_be_changed(tiny_model_cfg):
    with pytest.raises(ConfigError, match=r"attention\.n_kv_heads=2: fixed for 'mqa'"):
        resolve_attention({"name": "mqa", "n_kv_heads": 2}, tiny_model_cfg)


def test_register_a_new_mechanism_without_touching_the_model(monkeypatch):
    """A mechanism defined outside the package plugs into GPT through the registry alone."""
    # A private copy of the registry, so the test mechanism does not leak into later tests.
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_attention("test_mean_pool")
    class CausalMeanPool(Attention):
        uses_rope = False

        def __init__(self, cfg, model, layer_idx):
            super().__init__(cfg, model, layer_idx)
            self.proj = torch.nn.Linear(model.d_model, model.d_model, bias=False)

        def forward(self, x, ctx: AttentionContext, cache=None):
            counts = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
            return self.proj(x.cumsum(1) / counts)

    assert get_registration("test_mean_pool").cls is CausalMeanPool
    model = GPT.from_config(TINY_MODEL, "test_mean_pool")
    assert isinstance(model.blocks[0].attn, CausalMeanPool)
    assert model(torch.randint(0, 97, (1, 8))).logits.shape == (1, 8, 97)
    assert "test_mean_pool" in registered_names()


def test_per_layer_attention(tiny_model_cfg):
    cfg = ModelConfig(**{**TINY_MODEL, "layer_attention": ["mqa", {"name": "gqa", "n_kv_heads": 2}]})
    model = GPT.from_config(cfg)
    assert [b.attn.n_kv_heads for b in model.blocks] == [1, 2]


def test_per_layer_attention_needs_one_entry_per_layer():
    with pytest.raises(ConfigError, match=r"model\.layer_attention=.*exactly model\.n_layers=2"):
        ModelConfig(**{**TINY_MODEL, "layer_attention": ["mha"]})
