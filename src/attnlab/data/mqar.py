"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), generated from the seed.

One sequence of ``T`` positions (``x`` inputs, ``y`` targets, both ``(T,)``)::

    x:  k1 v1 k2 v2 ... kN vN  _ _ ... _  k7 k2 k7 k1 ...      (N pairs, `gap` fillers, queries)
    y:  -100 ...                    -100  v7 v2 v7 v1 ...

* The key-value block holds ``num_kv_pairs`` distinct keys, each with its own value (values distinct
  too), at positions ``0 .. 2N-1``. Keys are ids ``1 .. vocab_size//2 - 1``, values the upper half
  ``vocab_size//2 .. vocab_size-1``, id 0 is the filler.
* ``gap`` filler tokens follow, then every remaining position is a query: one of the N keys,
  drawn uniformly. Its target is that key's value; every other target is ``-100`` (not counted),
  so a model's loss and accuracy are exactly the answers'.
* The *distance* of a query at position ``t`` is ``t - s``, ``s`` the position of the answer (its
  value token in the block). A causal sliding window of ``w`` tokens (keys ``t-w < s <= t``) sees
  the answer exactly when the distance is below ``w``; distances lie in ``[gap + 1, T - 2]``.
  There is no nearer copy of the answer: queries do not echo their value.

Determinism and splits: sequence ``i`` of a split is a pure function of ``(seed, split, i)`` and
the task options (its own ``numpy`` generator, seeded with ``(seed, split, i)``). A sequence
belongs to the split that a hash of its key-value block assigns (:func:`split_of`: 1/16 of all
blocks are validation, 1/16 test, the rest training); each split draws blocks from its generator
until one of its own comes up. So no key-value block - and hence no sequence - can appear in two
splits, whatever the seeds, lengths or indices. The queries come from the same generator after the
block, so a longer sequence ``i`` (evaluation at another length) extends the shorter one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from attnlab.config import ConfigError, require
from attnlab.loss import IGNORE_INDEX

from .datamodule import SampledDataModule, TokenizedCorpus
from .tokenizers import Tokenizer

FILLER = 0
SPLITS = ("train", "validation", "test")
#: Hash buckets of a key-value block: bucket 0 is validation, 1 is test, the other 14 training.
N_BUCKETS = 16
_SPLIT_BUCKET = {"validation": 0, "test": 1}
#: Draws of a key-value block before a split is declared (nearly) empty: at 1/16 acceptance
#: 1,000 failures have probability 1e-28 unless the block space is tiny.
MAX_DRAWS = 1000


@dataclass(frozen=True)
class MQARTask:
    """The task's options. ``vocab_size`` ids: filler 0, keys ``1 .. vocab_size//2 - 1``, values
    ``vocab_size//2 .. vocab_size - 1``."""

    vocab_size: int = 64
    num_kv_pairs: int = 8
    gap: int = 0

    @property
    def n_keys(self) -> int:
        return self.vocab_size // 2 - 1

    @property
    def n_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def first_query(self) -> int:
        """Position of the first query."""
        return 2 * self.num_kv_pairs + self.gap

    def validate(self, field: str = "data") -> None:
        require(isinstance(self.vocab_size, int) and self.vocab_size >= 6, f"{field}.vocab_size", self.vocab_size,
                "an integer >= 6 (filler, at least 2 keys and 3 values)")
        require(isinstance(self.num_kv_pairs, int) and 1 <= self.num_kv_pairs <= self.n_keys, f"{field}.num_kv_pairs", self.num_kv_pairs,
                f"an integer from 1 to the {self.n_keys} keys of vocab_size={self.vocab_size} (vocab_size // 2 - 1)")
        require(isinstance(self.gap, int) and self.gap >= 0, f"{field}.gap", self.gap, "an integer >= 0")

    def check_length(self, length: int, field: str = "data.block_size") -> None:
        """A sequence must hold the block, the gap and at least one query."""
        require(isinstance(length, int) and length > self.first_query, field, length,
                f"an integer > 2 * num_kv_pairs + gap = {self.first_query} (room for the key-value block, the gap "
                "and at least one query)")


def split_of(block: np.ndarray) -> str:
    """The split a key-value block ``(2N,)`` belongs to: a fixed hash of its ids, not of any seed."""
    digest = hashlib.blake2b(np.ascontiguousarray(block, dtype="<i8").tobytes(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % N_BUCKETS
    return {0: "validation", 1: "test"}.get(bucket, "train")


def generate(task: MQARTask, seed: int, split: str, index: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ``index`` of ``split``: inputs and targets, each ``(length,)`` int64."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    n = task.num_kv_pairs
    for _ in range(MAX_DRAWS):
        block = np.empty(2 * n, dtype=np.int64)
        block[0::2] = 1 + rng.choice(task.n_keys, size=n, replace=False)
        block[1::2] = task.vocab_size // 2 + rng.choice(task.n_values, size=n, replace=False)
        if split_of(block) == split:
            break
    else:
        raise RuntimeError(f"no key-value block of {n} pairs over vocab_size={task.vocab_size} fell into the "
                           f"{split} split in {MAX_DRAWS} draws: the space of blocks is too small to split; "
                           "raise data.vocab_size or data.num_kv_pairs")
    x = np.full(length, FILLER, dtype=np.int64)
    y = np.full(length, IGNORE_INDEX, dtype=np.int64)
    x[:2 * n] = block
    start = task.first_query
    which = rng.integers(0, n, size=max(0, length - start))
    x[start:] = block[0::2][which]
    y[start:] = block[1::2][which]
    return x, y


class MQARSequences(Dataset):
    """``count`` sequences of one split at ``length`` positions: ``(x, y)`` each ``(length,)``."""

    def __init__(self, task: MQARTask, seed: int, split: str, length: int, count: int):
        require(split in SPLITS, "split", split, " | ".join(SPLITS))
        task.check_length(length)
        self.task, self.seed, self.split, self.length, self.count = task, seed, split, length, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(f"sequence {index} of {self.count}")
        x, y = generate(self.task, self.seed, self.split, index, self.length)
        return torch.from_numpy(x), torch.from_numpy(y)


class MQARTokenizer(Tokenizer):
    """Readable names for the ids: ``_`` (filler), ``k1 .. kK`` (keys), ``v1 .. vV`` (values)."""

    name = "mqar"

    def __init__(self, task: MQARTask):
        self.task = task
        self.vocab_size = task.vocab_size
        self.fingerprint = f"mqar-{task.vocab_size}"
        self.itos = ["_"] + [f"k{j}" for j in range(1, task.n_keys + 1)] + [f"v{j}" for j in range(1, task.n_values + 1)]
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def encode(self, text: str) -> np.ndarray:
        """Space-separated names, e.g. ``"k3 v1 _ k3"``."""
        try:
            return np.asarray([self.stoi[s] for s in text.split()], dtype=np.int64)
        except KeyError as error:
            raise ValueError(f"{error.args[0]!r} is not an MQAR token: '_', k1..k{self.task.n_keys}, "
                             f"v1..v{self.task.n_values}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids)


class MQARDataModule(SampledDataModule):
    """Multi-query associative recall sequences (see the module docstring), generated on the fly.

    Args:
        vocab_size: ids of the task: filler, ``vocab_size // 2 - 1`` keys, the rest values.
        num_kv_pairs: key-value pairs per sequence.
        gap: filler tokens between the key-value block and the first query: every answer lies
            more than ``gap`` tokens back.
        block_size: positions per training sequence (the model's context).
        eval_sequences: sequences in the validation and in the test split (at any length).
        seed: sequence ``i`` of each split depends only on ``(seed, split, i)``.
    """

    def __init__(self, vocab_size: int = 64, num_kv_pairs: int = 8, gap: int = 0, block_size: int = 512,
                 batch_size: int = 8, eval_batch_size: int | None = None, eval_sequences: int = 256,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(block_size, batch_size, eval_batch_size, num_workers, seed)
        self.task = MQARTask(vocab_size, num_kv_pairs, gap)
        self.task.validate("data")
        self.task.check_length(block_size, "data.block_size")
        require(isinstance(eval_sequences, int) and eval_sequences >= 1, "data.eval_sequences", eval_sequences,
                "an integer >= 1")
        require(isinstance(seed, int) and seed >= 0, "data.seed", seed, "an integer >= 0")
        self.eval_sequences = eval_sequences
        self.corpus: TokenizedCorpus | None = None

    @property
    def tokenizer(self) -> MQARTokenizer:
        return MQARTokenizer(self.task)

    def prepare_corpus(self) -> TokenizedCorpus:
        """The vocabulary and, per split, the tokens of its first ``eval_sequences`` sequences at
        ``block_size`` (what evaluation reads; for training a sample of the endless stream), for
        token statistics such as the routing analysis' frequencies. Nothing is written to disk."""
        if self.corpus is None:
            splits = {}
            for split in SPLITS:
                sequences = self.sequences(split, self.block_size)
                splits[split] = torch.stack([sequences[i][0] for i in range(len(sequences))]).reshape(-1).numpy()
            meta = {"source": "mqar", **asdict(self.task), "block_size": self.block_size, "seed": self.seed,
                    "n_tokens": {split: int(len(tokens)) for split, tokens in splits.items()}}
            self.corpus = TokenizedCorpus(splits, self.task.vocab_size, "mqar", None, meta)
        return self.corpus

    def sequences(self, split: str, length: int, count: int | None = None) -> MQARSequences:
        return MQARSequences(self.task, self.seed, split, length, self.eval_sequences if count is None else count)

    def train_dataset(self, length: int) -> MQARSequences:
        return self.sequences("train", self.block_size, length)

    def steps_per_pass(self, world_size: int) -> int:
        raise ConfigError("trainer.max_steps", -1, "an integer >= 1",
                          reason="data=mqar generates an endless training stream, so a pass has no length")

    def eval_dataset(self, split: str, block_size: int) -> MQARSequences:
        """The ``eval_sequences`` sequences of ``split`` at ``block_size`` positions. The same
        sequence ``i`` at a longer length keeps its block and first queries and adds queries
        further from the block."""
        require(split in ("validation", "test"), "split", split, "'validation' | 'test'")
        self.task.check_length(block_size, "block_size")
        return self.sequences(split, block_size)
