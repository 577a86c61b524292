"""Data: WikiText-2 and a synthetic corpus, tokenized, cached and served to Lightning."""

from .datamodule import ContiguousWindows, LMDataModule, RandomWindows, ShardSampler, TokenizedCorpus
from .tokenizers import CharTokenizer, GPT2Tokenizer, TokenizerError, load_gpt2
from .wikitext import DataNotFoundError

__all__ = [
    "CharTokenizer", "ContiguousWindows", "DataNotFoundError", "GPT2Tokenizer", "LMDataModule", "RandomWindows",
    "ShardSampler", "TokenizedCorpus", "TokenizerError", "load_gpt2",
]
