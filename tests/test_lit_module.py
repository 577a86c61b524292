import math

import pytest
import torch

from attnlab.config import OptimConfig
from attnlab.lit_module import LitLM, lr_schedule
from tests.conftest import TINY_MODEL


def test_warmup_then_cosine_to_min_ratio():
    f = lr_schedule(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


class _FakeTrainer:
    max_steps = 100


def test_weight_decay_only_on_matrices():
    module = LitLM({**TINY_MODEL, "bias": True, "pos_encoding": "learned", "tie_embeddings": False}, "mha",
                   {"weight_decay": 0.1, "fused": False})
    module.trainer = _FakeTrainer()  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv_proj.weight" in decayed and "lm_head.weight" in decayed
    assert {"tok_emb.weight", "pos_emb.weight", "blocks.0.attn_norm.weight", "blocks.0.attn.qkv_proj.bias"} <= not_decayed
    assert len(decayed) + len(not_decayed) == len(list(module.parameters()))


def test_aux_losses_are_added_to_the_task_loss(monkeypatch):
    """Whatever a mechanism puts in the aux-loss channel reaches the optimised loss."""
    module = LitLM(TINY_MODEL, "mha", {})
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module._trainer = type("T", (), {"log_every_n_steps": 1, "global_step": 0})()  # noqa: SLF001
    attn = module.model.blocks[0].attn
    original = attn.forward

    def with_aux(x, ctx, cache=None):
        ctx.add_aux_loss("probe", torch.tensor(2.5))
        return original(x, ctx, cache)

    monkeypatch.setattr(attn, "forward", with_aux)
    x = torch.randint(0, 97, (2, 16))
    total = module.training_step((x, x.roll(-1, 1)), 0)
    task = module.model(x, x.roll(-1, 1)).loss
    assert total.item() == pytest.approx(task.item() + 2.5, abs=1e-5)


def test_training_steps_pass_the_optimizer_step_to_every_attention_layer(monkeypatch):
    module = LitLM(TINY_MODEL, "mha", {})
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module._trainer = type("T", (), {"log_every_n_steps": 1, "global_step": 7})()  # noqa: SLF001
    seen = []
    for block in module.model.blocks:
        original = block.attn.forward

        def spy(x, ctx, cache=None, original=original):
            seen.append(ctx.step)
            return original(x, ctx, cache)

        monkeypatch.setattr(block.attn, "forward", spy)
    x = torch.randint(0, 97, (2, 16))
    module.training_step((x, x.roll(-1, 1)), 0)
    assert seen == [7] * TINY_MODEL["n_layers"]
    seen.clear()
    module.model(x)  # outside training: no step
    assert seen == [None] * TINY_MODEL["n_layers"]
