"""Data: WikiText-2 and a synthetic corpus, tokenized, cached and served to Lightning."""

from .datamodule import ContiguousWindows, LMDataModule, RandomWindows, ShardSampler, TokenizedCorpus
from .tokenizers import CharTokenizer, GPT2Tokenizer, StreamDecoder, TokenizerError, load_gpt2, tokenizer_from_spec
from .wikitext import DataNotFoundError

__all__ = [
    "CharTokenizer", "ContiguousWindows", "DataNotFoundError", "GPT2Tokenizer", "LMDataModule", "RandomWindows",
    "ShardSampler", "StreamDecoder", "TokenizedCorpus", "TokenizerError", "load_gpt2", "tokenizer_from_spec",
]
