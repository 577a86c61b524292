"""Token datasets, the on-disk token cache and the Lightning DataModule.

Training draws random contiguous windows; sample ``i`` is a pure function of ``(seed, i)``, so
the data order survives interruption: a resumed run starts at sample
``global_step * accumulate * batch_size * world_size`` and sees exactly the batches the
uninterrupted run would have seen. Validation and test read every token of their split once,
in non-overlapping windows, so the reported loss is the split's true per-token loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from attnlab.config import ConfigError, require
from attnlab.io import atomic_write_dir
from attnlab.loss import IGNORE_INDEX

from . import synthetic, wikitext
from .tokenizers import CharTokenizer, Tokenizer, load_gpt2

CACHE_VERSION = 1
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------------- datasets
class RandomWindows(Dataset):
    """Sample ``i`` is the window at a start drawn from ``rng(seed, i)``: ``(x, y)`` each ``(T,)``."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int, length: int):
        if len(tokens) < block_size + 2:
            raise ValueError(f"the training split has {len(tokens)} tokens, fewer than one window of {block_size + 1}")
        self.tokens, self.block_size, self.seed, self.length = tokens, block_size, seed, length

    def __len__(self) -> int:
        return self.length

    def start(self, index: int) -> int:
        return int(np.random.default_rng((self.seed, index)).integers(0, len(self.tokens) - self.block_size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.start(index)
        chunk = torch.from_numpy(np.asarray(self.tokens[s:s + self.block_size + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class ContiguousWindows(Dataset):
    """Non-overlapping windows covering targets ``tokens[1:]`` exactly once; the last window is
    padded with ``IGNORE_INDEX`` targets."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size
        self.n_targets = max(len(tokens) - 1, 0)

    def __len__(self) -> int:
        return -(-self.n_targets // self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = index * self.block_size
        n = min(self.block_size, self.n_targets - s)
        x = torch.zeros(self.block_size, dtype=torch.long)
        y = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.long)
        x[:n] = torch.from_numpy(np.asarray(self.tokens[s:s + n], dtype=np.int64))
        y[:n] = torch.from_numpy(np.asarray(self.tokens[s + 1:s + n + 1], dtype=np.int64))
        return x, y


class ShardSampler(Sampler[int]):
    """Indices ``start + rank, start + rank + world, ...`` below ``end``: each rank's share of a
    global order, without the padding/duplication of ``DistributedSampler``."""

    def __init__(self, end: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.end, self.start, self.rank, self.world_size = end, start, rank, world_size

    def __iter__(self):
        return iter(range(self.start + self.rank, self.end, self.world_size))

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.end, self.world_size))


# --------------------------------------------------------------------------------- corpus + cache
@dataclass
class TokenizedCorpus:
    splits: dict[str, np.ndarray]
    vocab_size: int
    tokenizer_name: str
    cache_path: Path | None
    meta: dict


class SampledDataModule(L.LightningDataModule):
    """What the data modules share: batch options and a resumable training stream.

    Training sample ``i`` is ``train_dataset(n)[i]``, a pure function of ``(seed, i)``; a fit
    draws samples from ``global_step * accumulate * batch_size * world_size`` on, so a resumed
    fit sees exactly the batches the uninterrupted one would have seen. Subclasses provide
    ``prepare_corpus()`` (its ``vocab_size`` sizes the model), ``train_dataset(length)`` and
    ``steps_per_pass(world_size)`` (the steps of ``trainer.max_steps=-1``).
    """

    def __init__(self, block_size: int, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int):
        super().__init__()
        p = "data"
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            require(isinstance(value, int) and value >= 1, f"{p}.{name}", value, "an integer >= 1")
        eval_batch_size = eval_batch_size or batch_size
        require(isinstance(eval_batch_size, int) and eval_batch_size >= 1, f"{p}.eval_batch_size", eval_batch_size,
                "an integer >= 1 or null")
        require(isinstance(num_workers, int) and num_workers >= 0, f"{p}.num_workers", num_workers, "an integer >= 0")
        self.block_size, self.batch_size, self.eval_batch_size = block_size, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed

    def prepare_corpus(self) -> TokenizedCorpus:
        raise NotImplementedError

    def train_dataset(self, length: int) -> Dataset:
        """Training samples ``0 .. length-1``; sample ``i`` depends only on ``(seed, i)``."""
        raise NotImplementedError

    def steps_per_pass(self, world_size: int) -> int:
        """Optimizer steps of one pass over the training data (used when ``trainer.max_steps=-1``)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.prepare_corpus().vocab_size

    def prepare_data(self) -> None:
        self.prepare_corpus()

    def setup(self, stage: str | None = None) -> None:
        self.prepare_corpus()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_samples(self) -> tuple[int, int]:
        """``(first, end)`` global sample indices this fit still has to draw."""
        trainer = self.trainer
        rank, world = self._rank_world()
        per_step = self.batch_size * world * (trainer.accumulate_grad_batches if trainer is not None else 1)
        if trainer is not None and trainer.max_steps > 0:
            steps = trainer.max_steps
        else:
            steps = self.steps_per_pass(world)
        done = trainer.global_step if trainer is not None else 0
        return done * per_step, steps * per_step

    def eval_dataset(self, split: str, block_size: int) -> Dataset:
        """What ``split`` is evaluated on, in ``(x, y)`` samples of ``block_size`` positions."""
        raise NotImplementedError

    def eval_dataloader(self, split: str, block_size: int) -> DataLoader:
        """``(x, y)`` batches ``(B, block_size)`` of :meth:`eval_dataset`, this rank's share under
        DDP. Batches hold about as many tokens as the validation batches at the training block
        size (``eval_batch_size`` samples of ``block_size``, at least one), so longer windows come
        in smaller batches."""
        dataset = self.eval_dataset(split, block_size)
        rank, world = self._rank_world()
        batch_size = max(1, self.eval_batch_size * self.block_size // block_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), 0, rank, world),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation", self.block_size)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test", self.block_size)

    def train_dataloader(self) -> DataLoader:
        first, end = self.train_samples()
        rank, world = self._rank_world()
        sampler = ShardSampler(end, first, rank, world)
        # a private generator keeps worker seeding from consuming the global RNG (exact resume)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_dataset(end), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True, generator=generator,
                          persistent_workers=self.num_workers > 0)


class LMDataModule(SampledDataModule):
    """WikiText-2 or the synthetic corpus, tokenized with GPT-2 BPE or characters.

    Args:
        source: ``wikitext2`` or ``synthetic``.
        variant: WikiText-2 ``raw`` (wikitext-2-raw-v1) or ``v1`` (word-level wikitext-2-v1).
        tokenizer: ``gpt2`` (tiktoken) or ``char``.
        block_size: tokens per window (the model's context).
        data_dir: data root searched first for local files (``paths.data_dir`` / ``ATTNLAB_DATA_DIR``).
        cache_dir: where token arrays are cached, keyed by tokenizer and source checksums.
        max_eval_tokens: evaluate on the first N tokens of validation/test (None = all).
    """

    def __init__(self, source: Literal["wikitext2", "synthetic"] = "wikitext2", variant: str = "raw",
                 tokenizer: str = "gpt2", block_size: int = 1024, batch_size: int = 4,
                 eval_batch_size: int | None = None, num_workers: int = 0, data_dir: str | None = None,
                 cache_dir: str | None = None, tokenizer_dir: str | None = None, seed: int = 0,
                 max_eval_tokens: int | None = None, synthetic_options: dict | None = None):
        p = "data"
        require(source in ("wikitext2", "synthetic"), f"{p}.source", source, "'wikitext2' | 'synthetic'")
        require(variant in wikitext.VARIANTS, f"{p}.variant", variant, " | ".join(repr(v) for v in wikitext.VARIANTS))
        require(tokenizer in ("gpt2", "char"), f"{p}.tokenizer", tokenizer, "'gpt2' | 'char'")
        super().__init__(block_size, batch_size, eval_batch_size, num_workers, seed)
        if max_eval_tokens is not None:
            require(isinstance(max_eval_tokens, int) and max_eval_tokens >= 2, f"{p}.max_eval_tokens",
                    max_eval_tokens, "null or an integer >= 2")
        self.source, self.variant, self.tokenizer_name = source, variant, tokenizer
        self.max_eval_tokens = max_eval_tokens
        self.data_dir = os.path.expanduser(data_dir) if data_dir else None
        self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else Path(tempfile.gettempdir()) / "attnlab-cache"
        self.tokenizer_dir = tokenizer_dir
        self.synthetic_options = dict(synthetic_options or {})
        self.corpus: TokenizedCorpus | None = None
        self._tokenizer: Tokenizer | None = None

    # ------------------------------------------------------------------ corpus
    def _source_key(self) -> str:
        if self.source == "synthetic":
            opts = json.dumps(self.synthetic_options, sort_keys=True)
            return f"synthetic-{hashlib.sha256(opts.encode()).hexdigest()[:16]}"
        return f"wikitext2-{self.variant}-" + wikitext.source_fingerprint(self.variant, self.data_dir)

    def _tokenizer_key(self) -> str:
        return "gpt2-tiktoken-50257" if self.tokenizer_name == "gpt2" else "char"

    def cache_key(self) -> str:
        raw = f"v{CACHE_VERSION}|{self._source_key()}|{self._tokenizer_key()}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def _load_texts(self) -> dict[str, str]:
        if self.source == "synthetic":
            return synthetic.generate_corpus(**self.synthetic_options)
        return wikitext.load_wikitext(self.variant, self.data_dir, self.cache_dir / "hf")

    def _make_tokenizer(self, train_text: str | None = None, alphabet: str | None = None) -> Tokenizer:
        if self.tokenizer_name == "gpt2":
            return load_gpt2([self.tokenizer_dir, self.data_dir], self.cache_dir / "tiktoken")
        if alphabet is not None:
            return CharTokenizer(alphabet)
        assert train_text is not None
        return CharTokenizer.from_text(train_text)

    def prepare_corpus(self) -> TokenizedCorpus:
        """Tokenized splits, from the cache when the source and tokenizer are unchanged."""
        if self.corpus is not None:
            return self.corpus
        path = self.cache_dir / "tokens" / self.cache_key()
        if not (path / "meta.json").exists():
            texts = self._load_texts()
            tokenizer = self._make_tokenizer(train_text=texts["train"])
            self._tokenizer = tokenizer
            dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
            meta = {"version": CACHE_VERSION, "source": self._source_key(), "tokenizer": tokenizer.name,
                    "tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                    "alphabet": getattr(tokenizer, "alphabet", None), "variant": self.variant,
                    "n_tokens": {}, "n_chars": {s: len(t) for s, t in texts.items()}}

            def write(tmp: Path) -> None:
                for split in SPLITS:
                    ids = tokenizer.encode(texts[split]).astype(dtype)
                    meta["n_tokens"][split] = int(len(ids))
                    np.save(tmp / f"{split}.npy", ids)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

            atomic_write_dir(path, write, marker="meta.json")
        meta = json.loads((path / "meta.json").read_text())
        splits = {s: np.load(path / f"{s}.npy", mmap_mode="r") for s in SPLITS}
        self.corpus = TokenizedCorpus(splits, meta["vocab_size"], meta["tokenizer"], path, meta)
        return self.corpus

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded on demand; a cache hit does not need it)."""
        if self._tokenizer is None:
            corpus = self.prepare_corpus()
            self._tokenizer = self._make_tokenizer(alphabet=corpus.meta.get("alphabet"))
        return self._tokenizer

    def tokenizer_spec(self) -> dict:
        """What rebuilds the tokenizer (:func:`attnlab.data.tokenizers.tokenizer_from_spec`), from
        the corpus metadata without loading it; checkpoints record it for sampling."""
        meta = self.prepare_corpus().meta
        spec = {"name": meta["tokenizer"], "vocab_size": meta["vocab_size"],
                "fingerprint": meta.get("tokenizer_fingerprint")}
        if meta.get("alphabet") is not None:
            spec["alphabet"] = meta["alphabet"]
        return spec

    # ------------------------------------------------------------------ training and evaluation
    def train_dataset(self, length: int) -> RandomWindows:
        return RandomWindows(self.prepare_corpus().splits["train"], self.block_size, self.seed, length)

    def steps_per_pass(self, world_size: int) -> int:
        tokens = len(self.prepare_corpus().splits["train"])
        return max(1, tokens // (self.block_size * self.batch_size * world_size))

    def eval_dataset(self, split: str, block_size: int | None = None) -> ContiguousWindows:
        """Every target of ``split`` (up to ``max_eval_tokens`` tokens) once, in windows of
        ``block_size`` tokens (default: the training block size)."""
        tokens = self.prepare_corpus().splits[split]
        if self.max_eval_tokens is not None:
            tokens = tokens[:self.max_eval_tokens]
        return ContiguousWindows(tokens, block_size or self.block_size)



def check_block_size(block_size: int, max_seq_len: int) -> None:
    if block_size > max_seq_len:
        raise ConfigError("data.block_size", block_size, f"at most model.max_seq_len={max_seq_len}",
                          reason="windows longer than the model's context")
