"""Evaluation statistics (loss and accuracy, in total and by position) against naive per-token
computations, and evaluation at other window lengths through a real trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.evaluation import TokenMetrics, bucket_of_position, evaluate_lengths, position_buckets
from attnlab.lit_module import LitLM
from attnlab.loss import IGNORE_INDEX
from tests.conftest import TINY_MODEL


def test_position_buckets_are_log2_spaced_up_to_the_window():
    assert position_buckets(1) == [[1, 1]]
    assert position_buckets(2) == [[1, 1], [2, 2]]
    assert position_buckets(64) == [[1, 1], [2, 3], [4, 7], [8, 15], [16, 31], [32, 63], [64, 64]]
    assert position_buckets(100)[-2:] == [[32, 63], [64, 100]]
    for window in (1, 2, 3, 63, 64, 65, 1000, 4096):
        expected = [p.bit_length() - 1 for p in range(1, window + 1)]  # floor(log2 p) in integers
        assert bucket_of_position(window).tolist() == expected
        buckets = position_buckets(window)
        assert all(buckets[b][0] <= p <= buckets[b][1] for p, b in zip(range(1, window + 1), expected))


def naive_by_position(model, batches):
    """Loss and accuracy per position bucket from full logits, one token at a time."""
    sums: dict[int, list[float]] = {}
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).logits.double()
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    if y[b, t] == IGNORE_INDEX:
                        continue
                    loss = F.cross_entropy(logits[b, t], y[b, t]).item()
                    correct = float(logits[b, t].argmax().item() == y[b, t].item())
                    entry = sums.setdefault((t + 1).bit_length() - 1, [0.0, 0.0, 0])
                    entry[0] += loss
                    entry[1] += correct
                    entry[2] += 1
    return sums


@pytest.mark.parametrize("max_batch_tokens", [None, 40])
def test_evaluation_by_position_matches_a_naive_per_token_computation(max_batch_tokens):
    module = LitLM({**TINY_MODEL, "loss_chunk_size": 7}, "gqa_2").eval()
    module.eval_max_batch_tokens = max_batch_tokens  # 40 tokens: the batches of 3 windows are split
    torch.manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randint(0, 97, (3, 20))
        y = torch.randint(0, 97, (3, 20))
        with torch.no_grad():  # about half of the predictions are right
            y[:, 1::2] = module.model(x).logits.argmax(-1)[:, 1::2]
        y[:, 3::6] = IGNORE_INDEX
        batches.append((x, y))
    batches[-1][1][1:, 11:] = IGNORE_INDEX  # a split's end: padded targets
    with torch.no_grad():
        for batch in batches:
            module._eval_step(batch, module.val_metrics)
    result = module.val_metrics.compute()

    naive = naive_by_position(module.model, batches)
    n_total = sum(e[2] for e in naive.values())
    assert result["n_tokens"] == n_total
    assert result["loss"] == pytest.approx(sum(e[0] for e in naive.values()) / n_total, rel=1e-6)
    assert result["acc"] == pytest.approx(sum(e[1] for e in naive.values()) / n_total, abs=1e-12)
    by_position = result["by_position"]
    assert by_position["positions"] == [[1, 1], [2, 3], [4, 7], [8, 15], [16, 20]]
    for b, (loss, acc, n) in enumerate(zip(by_position["loss"], by_position["acc"], by_position["n_tokens"])):
        assert n == naive[b][2]
        assert loss == pytest.approx(naive[b][0] / n, rel=1e-6)
        assert acc == pytest.approx(naive[b][1] / n, abs=1e-12)


def test_token_metrics_empty_buckets_and_window():
    metric = TokenMetrics()
    counted = torch.zeros(2, 5, dtype=torch.bool)
    counted[:, 4] = True  # only position 5 is counted (answer positions of a recall task)
    metric.update(torch.where(counted, 2.0, 0.0), counted & torch.tensor([True, False])[:, None], counted)
    result = metric.compute()
    assert result["by_position"]["positions"] == [[1, 1], [2, 3], [4, 5]]
    assert result["by_position"]["n_tokens"] == [0, 0, 2]
    assert result["by_position"]["loss"] == [None, None, 2.0] and result["by_position"]["acc"] == [None, None, 0.5]
    assert (result["loss"], result["acc"], result["n_tokens"]) == (2.0, 0.5, 2)


@pytest.fixture
def tiny_run(tmp_path):
    """A trainer, an untrained tiny module and a synthetic data module (block size 32)."""
    import lightning as L

    from attnlab.data import LMDataModule

    def make(**model):
        datamodule = LMDataModule(source="synthetic", tokenizer="char", block_size=32, batch_size=4, eval_batch_size=4,
                                  cache_dir=str(tmp_path / "cache"), max_eval_tokens=300,
                                  synthetic_options={"n_words": 30, "train_sentences": 50, "eval_sentences": 20})
        vocab = datamodule.prepare_corpus().vocab_size
        module = LitLM({**TINY_MODEL, "max_seq_len": 32, "vocab_size": vocab, **model}, "mha")
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
        trainer.validate(module, datamodule=datamodule, verbose=False)  # attaches the data module
        return trainer, module, datamodule

    return make


def test_evaluation_at_twice_the_context_equals_a_direct_forward(tiny_run):
    trainer, module, datamodule = tiny_run()
    results = evaluate_lengths(trainer, module, datamodule, [64, 16], trained_length=32)
    tokens = torch.as_tensor(datamodule.prepare_corpus().splits["validation"][:300].astype("int64"))
    for length in (64, 16):
        # the direct way: consecutive windows of `length` tokens over the same targets
        loss_sum, n = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(tokens) - 1, length):
                x = tokens[start:start + length][None]
                y = tokens[start + 1:start + length + 1][None]
                x = x[:, :y.shape[1]]
                out = module.model(x, y)
                loss_sum, n = loss_sum + out.loss_sum.item(), n + out.n_tokens.item()
        result = results[str(length)]
        assert result["status"] == "ok" and result["n_tokens"] == n == len(tokens) - 1
        assert result["val_loss"] == pytest.approx(loss_sum / n, rel=1e-5)
        assert result["val_ppl"] == pytest.approx(math.exp(loss_sum / n), rel=1e-5)
        assert result["loss_by_position"]["positions"][-1][1] == length
    assert module.eval_length is None and not module.length_results


def test_learned_positions_beyond_the_training_context_are_not_applicable(tiny_run):
    trainer, module, datamodule = tiny_run(pos_encoding="learned")
    results = evaluate_lengths(trainer, module, datamodule, [64, 16], trained_length=32)
    assert results["64"]["status"] == "not_applicable"
    assert "learned absolute positions" in results["64"]["reason"]
    assert results["16"]["status"] == "ok"
