"""A small generated corpus for smoke runs and tests.

Words are built from random syllables; sentences follow a sparse first-order Markov chain over
the words, so the text has learnable structure (a model's loss falls well below the unigram
entropy within a few hundred steps) while containing no text copied from anywhere.
Deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "validation", "test")
_CONSONANTS = list("bdfgklmnprstvz")
_VOWELS = list("aeiou")


def _vocabulary(rng: np.random.Generator, n_words: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n_words:
        n_syllables = int(rng.integers(1, 4))
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n_syllables)))
    return sorted(words)


def generate_corpus(seed: int = 0, n_words: int = 300, train_sentences: int = 6000,
                    eval_sentences: int = 600, successors: int = 4) -> dict[str, str]:
    """Text for the three splits; each sentence is a line ending in ``" .\\n"``."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, n_words)
    # each word is followed by one of a few successors, with Zipf-like preferences
    next_words = rng.integers(0, n_words, size=(n_words, successors))
    weights = 1.0 / np.arange(1, successors + 1)
    weights /= weights.sum()
    starts = rng.integers(0, n_words, size=max(4, n_words // 10))

    def sentences(count: int, split_rng: np.random.Generator) -> str:
        lines = []
        for _ in range(count):
            word = int(split_rng.choice(starts))
            length = int(split_rng.integers(4, 14))
            out = [vocab[word]]
            for _ in range(length - 1):
                word = int(next_words[word, split_rng.choice(successors, p=weights)])
                out.append(vocab[word])
            lines.append(" " + " ".join(out) + " .\n")
        return "".join(lines)

    counts = {"train": train_sentences, "validation": eval_sentences, "test": eval_sentences}
    return {split: sentences(counts[split], np.random.default_rng((seed, i + 1))) for i, split in enumerate(SPLITS)}
