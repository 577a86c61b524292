"""The MQAR generator against a naive reading of its sequences, and its data module."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnlab.config import ConfigError
from attnlab.data import MQARDataModule, MQARTask, MQARTokenizer
from attnlab.data.mqar import FILLER, SPLITS, generate, split_of
from attnlab.loss import IGNORE_INDEX


def naive_answers(x: np.ndarray, task: MQARTask) -> dict[int, tuple[int, int]]:
    """Read a sequence the slow way: ``{position: (answer, distance)}`` for every query, where a
    query is a key after the block whose pair was stated earlier."""
    pairs, value_position, answers = {}, {}, {}
    for t, token in enumerate(x.tolist()):
        if t < 2 * task.num_kv_pairs:
            if t % 2 == 1:
                pairs[x[t - 1]] = token
                value_position[x[t - 1]] = t
        elif token != FILLER:
            answers[t] = (pairs[token], t - value_position[token])
    return answers


@pytest.mark.parametrize("task", [MQARTask(64, 8, 0), MQARTask(32, 15, 5), MQARTask(200, 3, 40)])
def test_targets_are_the_queried_keys_values(task):
    length = task.first_query + 37
    for split in SPLITS:
        for index in range(20):
            x, y = generate(task, 3, split, index, length)
            keys, values = x[:2 * task.num_kv_pairs:2], x[1:2 * task.num_kv_pairs:2]
            assert len(set(keys.tolist())) == task.num_kv_pairs and len(set(values.tolist())) == task.num_kv_pairs
            assert ((keys >= 1) & (keys <= task.n_keys)).all()
            assert ((values >= task.vocab_size // 2) & (values < task.vocab_size)).all()
            assert (x[2 * task.num_kv_pairs:task.first_query] == FILLER).all()
            answers = naive_answers(x, task)
            # counted targets are exactly the answers, one at every position after the gap
            assert sorted(answers) == list(range(task.first_query, length))
            assert np.flatnonzero(y != IGNORE_INDEX).tolist() == sorted(answers)
            assert all(y[t] == answer for t, (answer, _) in answers.items())


def test_gap_bounds_the_distance_exactly():
    """Every answer lies more than ``gap`` tokens back and the bound is attained: a window of w
    tokens (keys t-w < s <= t) sees some answers with gap = w - 2 and none with gap = w - 1."""
    window = 24
    for gap, sees_some in ((window - 2, True), (window - 1, False)):
        task = MQARTask(64, 6, gap)
        distances = [d for i in range(200) for _, d in naive_answers(generate(task, 0, "train", i, 80)[0], task).values()]
        assert min(distances) == gap + 1 and max(distances) == 80 - 2
        assert any(d < window for d in distances) is sees_some


def test_sequence_is_a_function_of_seed_split_and_index():
    task = MQARTask(64, 8, 2)
    a, b = generate(task, 7, "train", 11, 64), generate(task, 7, "train", 11, 64)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], generate(task, 8, "train", 11, 64)[0])
    assert not np.array_equal(a[0], generate(task, 7, "train", 12, 64)[0])
    # a longer sequence extends the shorter one (evaluation at other lengths)
    long_x, long_y = generate(task, 7, "train", 11, 200)
    assert np.array_equal(long_x[:64], a[0]) and np.array_equal(long_y[:64], a[1])


def test_splits_never_share_a_key_value_block():
    """Disjointness comes from the block's hash, not from the seeds: even in a block space small
    enough that every split repeats blocks, no block appears in two splits."""
    task = MQARTask(12, 2, 0)  # 5 keys, 6 values: 600 ordered blocks
    blocks = {}
    for split in SPLITS:
        seen = set()
        for index in range(400):
            x, _ = generate(task, 0, split, index, 6)
            assert split_of(x[:4]) == split
            seen.add(tuple(x[:4].tolist()))
        blocks[split] = seen
    assert len(blocks["train"]) < 400  # the space is small: training repeats blocks
    assert not blocks["train"] & blocks["validation"]
    assert not blocks["train"] & blocks["test"]
    assert not blocks["validation"] & blocks["test"]


def test_a_split_the_block_space_cannot_fill_is_an_error():
    task = MQARTask(6, 1, 0)  # 2 keys x 3 values: 6 blocks, too few for 16 hash buckets
    empty = [s for s in SPLITS if not any(split_of(np.array([k, v])) == s for k in (1, 2) for v in (3, 4, 5))]
    assert empty
    with pytest.raises(RuntimeError, match="too small to split"):
        generate(task, 0, empty[0], 0, 4)


def datamodule(**kwargs) -> MQARDataModule:
    return MQARDataModule(**{**dict(vocab_size=32, num_kv_pairs=4, block_size=24, batch_size=3, eval_sequences=7), **kwargs})


def stand_in_trainer(global_step: int, max_steps: int = 6):
    return SimpleNamespace(global_step=global_step, max_steps=max_steps, accumulate_grad_batches=1, global_rank=0,
                           world_size=1)


def test_resumed_training_continues_the_same_batches():
    dm = datamodule()
    dm.trainer = stand_in_trainer(0)
    full = [(x.clone(), y.clone()) for x, y in dm.train_dataloader()]
    assert len(full) == 6
    dm.trainer = stand_in_trainer(4)
    resumed = list(dm.train_dataloader())
    assert len(resumed) == 2
    for (x, y), (rx, ry) in zip(full[4:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # sample i is the generator's sequence i of the training split
    x, y = generate(dm.task, dm.seed, "train", 3 * 4 + 1, 24)
    assert np.array_equal(full[4][0][1].numpy(), x) and np.array_equal(full[4][1][1].numpy(), y)


def test_an_endless_stream_needs_max_steps():
    dm = datamodule()
    dm.trainer = stand_in_trainer(0, max_steps=-1)
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=-1"):
        dm.train_dataloader()


def test_eval_dataloader_at_other_lengths():
    dm = datamodule()
    short = list(dm.eval_dataloader("validation", 24))
    assert [x.shape for x, _ in short] == [(3, 24), (3, 24), (1, 24)]
    longer_batches = list(dm.eval_dataloader("validation", 100))
    assert {x.shape[0] for x, _ in longer_batches} == {1}  # about the tokens of a training-length batch
    longer = torch.cat([x for x, _ in longer_batches])
    assert longer.shape == (7, 100)
    assert torch.equal(longer[:, :24], torch.cat([x for x, _ in short]))
    assert torch.equal(torch.cat([x for x, _ in dm.val_dataloader()]), torch.cat([x for x, _ in short]))
    test_x = torch.cat([x for x, _ in dm.test_dataloader()])
    assert not any(torch.equal(test_x[i, :8], longer[j, :8]) for i in range(7) for j in range(7))
    with pytest.raises(ConfigError, match=r"block_size=8"):
        dm.eval_dataloader("test", 8)


def test_corpus_and_tokenizer_for_the_run_and_the_routing_analysis():
    dm = datamodule()
    corpus = dm.prepare_corpus()
    assert dm.vocab_size == corpus.vocab_size == 32
    assert corpus.splits["validation"].shape == (7 * 24,)
    assert np.array_equal(corpus.splits["validation"][:24], generate(dm.task, 0, "validation", 0, 24)[0])
    tokenizer = dm.tokenizer
    assert isinstance(tokenizer, MQARTokenizer) and tokenizer.vocab_size == 32
    assert tokenizer.decode([0, 1, 15, 16, 31]) == "_ k1 k15 v1 v16"
    assert tokenizer.encode("k3 v2 _").tolist() == [3, 17, 0]
    with pytest.raises(ValueError, match="'k99' is not an MQAR token"):
        tokenizer.encode("k99")


@pytest.mark.parametrize("options, field", [
    (dict(vocab_size=4), r"data\.vocab_size=4"),
    (dict(num_kv_pairs=16), r"data\.num_kv_pairs=16.*15 keys"),
    (dict(num_kv_pairs=0), r"data\.num_kv_pairs=0"),
    (dict(gap=-1), r"data\.gap=-1"),
    (dict(block_size=8, num_kv_pairs=4), r"data\.block_size=8.*> 2 \* num_kv_pairs \+ gap = 8"),
    (dict(eval_sequences=0), r"data\.eval_sequences=0"),
    (dict(batch_size=0), r"data\.batch_size=0"),
    (dict(seed=-1), r"data\.seed=-1"),
])
def test_invalid_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        datamodule(**options)


@pytest.mark.slow
def test_train_py_runs_mqar_with_the_routing_analysis(tmp_path):
    """``data=mqar`` through the unchanged train.py flow: the model is sized from the data's
    vocabulary, every counted target is an answer, and the routing analysis names MQAR tokens."""
    import json

    from tests.conftest import run_train

    run_train(["data=mqar", "model=tiny", "model.max_seq_len=40", "data.num_kv_pairs=4", "data.batch_size=4",
               "data.eval_sequences=6", "attention=moas", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "logger=none"], tmp_path)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 4 and metrics["test_loss"] > 0
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] is None  # from the data: 64
    analysis = json.loads((run / "routing_analysis.json").read_text())
    assert analysis["n_tokens"] == 6 * 40
    top = next(iter(analysis["layers"].values()))["top_tokens"]
    assert {t["token"][0] for tokens in top.values() for t in tokens} <= {"_", "k", "v"}
