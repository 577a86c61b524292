import pytest
import torch

from attnlab.lit_module import LitLM
from attnlab.recipe import lr_schedule
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


@pytest.mark.parametrize("multiplier", [1.0, 4.0])
def test_router_lr_multiplier_group_keeps_the_decay_rule_and_follows_the_schedule(multiplier):
    """MoH's router weights (a matrix per layer) get ``lr * multiplier`` and still decay; every other
    parameter stays in the two usual groups; the schedule scales each group's own learning rate.
    A multiplier of 1 keeps exactly the two groups."""
    optim = {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 5, "fused": False}
    module = LitLM({**TINY_MODEL, "bias": True, "pos_encoding": "learned", "tie_embeddings": False},
                   {"name": "moh", "router_lr_multiplier": multiplier}, optim)
    module.trainer = _FakeTrainer()  # type: ignore[assignment]
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = {g.get("name", "decay" if g["weight_decay"] else "no_decay"): g for g in optimizer.param_groups}
    members = {key: {names[id(p)] for p in g["params"]} for key, g in groups.items()}
    routers = {n for n in names.values() if ".attn.router." in n}
    matrices = {n for n, p in module.model.named_parameters() if p.dim() >= 2 and "emb" not in n}
    assert len(routers) == TINY_MODEL["n_layers"]
    if multiplier == 1.0:
        assert set(groups) == {"decay", "no_decay"} and routers <= members["decay"]
    else:
        assert set(groups) == {"decay", "no_decay", "router"} and members["router"] == routers
        assert groups["router"]["weight_decay"] == 0.1
        assert members["decay"] == matrices - routers
    assert members["no_decay"] == set(names.values()) - matrices
    for step in range(8):  # warm-up and the start of the cosine
        factor = lr_schedule(module.optim_cfg, _FakeTrainer.max_steps)(step)
        for key, group in groups.items():
            expected = 1e-3 * (multiplier if key == "router" else 1.0) * factor
            assert group["lr"] == pytest.approx(expected, rel=1e-12), (key, step)
        optimizer.step()
        scheduler.step()


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
