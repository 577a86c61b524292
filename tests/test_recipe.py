import dataclasses
import math

import pytest
import torch

from attnlab.attention import preset_names, resolve_layer_attention
from attnlab.config import ModelConfig, OptimConfig
from attnlab.lit_module import LitLM
from attnlab.recipe import build_optimizer, lr_schedule, match_parameters, model_recipe, training_loss
from tests.conftest import TINY_MODEL


def test_warmup_then_cosine_to_min_ratio():
    f = lr_schedule(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


@pytest.mark.parametrize("preset", preset_names())
def test_parameter_matching_within_two_percent_on_exp10(preset):
    model = ModelConfig(n_layers=4, d_model=128, n_heads=4, d_ff=512, max_seq_len=1024, match_params="mha")
    matching = match_parameters(model, resolve_layer_attention(preset, model), "mha")
    assert abs(matching["relative_diff"]) <= 0.02, matching
    assert matching["reference_params"] == 1_049_728  # exp10 MHA without embeddings


def test_matched_model_counts_what_the_matching_promised():
    recipe = model_recipe({**TINY_MODEL, "match_params": "mha"}, "identity")
    assert recipe.param_matching is not None and recipe.model.d_ff == recipe.param_matching["d_ff"] > TINY_MODEL["d_ff"]
    assert recipe.build().parameter_counts()["non_embedding"] == recipe.param_matching["params"]


def test_checkpoint_hyperparameters_rebuild_the_matched_model_without_matching_again():
    """The saved groups hold the matched d_ff; matching them again (against that d_ff) would
    give another width, so loading must take them as they are."""
    recipe = model_recipe({**TINY_MODEL, "match_params": "mha"}, "mqa")
    module = LitLM(recipe, optim=OptimConfig(lr=1e-3))
    reloaded = LitLM(**module.hparams)
    assert reloaded.model_cfg == recipe.model
    assert reloaded.optim_cfg == OptimConfig(lr=1e-3)
    assert reloaded.model.parameter_counts() == module.model.parameter_counts()
    reloaded.load_state_dict(module.state_dict())  # same names and shapes


@pytest.mark.parametrize("attention", ["moas", "gqa_2", "sparse_256", {"name": "static_moas", "branches": ["mha", "mqa"]}])
def test_saved_attention_resolves_to_the_same_spec(attention):
    recipe = model_recipe(TINY_MODEL, attention)
    again = resolve_layer_attention(recipe.attention_config(), recipe.model)
    assert [s.name for s in again] == [s.name for s in recipe.attention]
    assert [dataclasses.asdict(s.config) for s in again] == [dataclasses.asdict(s.config) for s in recipe.attention]


def test_mixture_branches_are_resolved_once(monkeypatch):
    import attnlab.attention.moas as moas

    calls = []
    original = moas.resolve_branches
    monkeypatch.setattr(moas, "resolve_branches", lambda *a, **k: calls.append(a) or original(*a, **k))
    recipe = model_recipe({**TINY_MODEL, "n_layers": 3}, "moas")
    recipe.build()
    assert len(calls) == 1  # validation resolved them; the three layers reused them



@pytest.fixture(scope="module")
def synthetic_batches():
    """Batches of 8 x 64 characters of the synthetic corpus (the smoke experiment's data)."""
    from attnlab.data import CharTokenizer, RandomWindows
    from attnlab.data.synthetic import generate_corpus

    text = generate_corpus(seed=0, train_sentences=1000)["train"]
    tokenizer = CharTokenizer.from_text(text)
    windows = RandomWindows(tokenizer.encode(text), block_size=64, seed=0, length=8 * 40)
    loader = torch.utils.data.DataLoader(windows, batch_size=8)
    return tokenizer.vocab_size, list(loader)


@pytest.mark.parametrize("preset", preset_names())
def test_training_lowers_the_loss_for_every_preset(preset, synthetic_batches):
    """40 steps of the run's optimizer and loss (the task loss plus aux losses) on the synthetic
    corpus: the held-out batch's loss falls well below its start (ln of the ~30 characters)."""
    vocab_size, batches = synthetic_batches
    torch.manual_seed(0)
    model = model_recipe({**TINY_MODEL, "vocab_size": vocab_size}, preset).build()
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, fused=False), torch.device("cpu"))
    held_out = batches[-1]

    def held_out_loss() -> float:
        with torch.no_grad():
            return model.eval()(*held_out).loss.item()

    before = held_out_loss()
    model.train()
    for x, y in batches[:-1]:
        optimizer.zero_grad(set_to_none=True)
        training_loss(model(x, y, step=0)).backward()
        optimizer.step()
    after = held_out_loss()
    assert math.isfinite(after) and after < before - 0.5, (before, after)
