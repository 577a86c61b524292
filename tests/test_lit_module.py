import pytest
import torch

from attnlab.lit_module import LitLM
from tests.conftest import TINY_MODEL


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


class _StepTrainer:
    """A stand-in trainer: a step counter, a strategy whose reduce is counted, should_stop."""

    log_every_n_steps = 1000
    should_stop = False

    def __init__(self):
        self.global_step = 0
        self.reads = []
        self.strategy = type("S", (), {"reduce": lambda _, t, reduce_op: self.reads.append(self.global_step) or t})()


def test_divergence_is_recorded_on_the_device_and_read_every_few_steps():
    from attnlab.lit_module import DIVERGENCE_CHECK_EVERY

    module = LitLM(TINY_MODEL, "mha", {})
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    trainer = _StepTrainer()
    module._trainer = trainer  # noqa: SLF001
    x = torch.randint(0, 97, (2, 16))
    for step in range(1, 3 * DIVERGENCE_CHECK_EVERY + 1):
        if step == 11:  # from the 11th optimizer step on the loss is NaN
            with torch.no_grad():
                module.model.final_norm.weight.fill_(float("nan"))
        module.training_step((x, x.roll(-1, 1)), step - 1)
        trainer.global_step = step
        module.on_train_batch_end(None, (x, x), step - 1)
        if trainer.should_stop:
            break
    # read at steps 8 and 16 only (no synchronisation on the others); found at the second read
    assert trainer.reads == [DIVERGENCE_CHECK_EVERY, 2 * DIVERGENCE_CHECK_EVERY]
    assert module.diverged_at_step == 11 and trainer.should_stop
    assert module.check_divergence() == 11 and len(trainer.reads) == 2  # known: not read again


def test_training_steps_pass_the_optimizer_step_to_every_attention_layer(monkeypatch):
    module = LitLM(TINY_MODEL, "mha", {})
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    trainer = _StepTrainer()
    trainer.global_step = 7
    module._trainer = trainer  # noqa: SLF001
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
