"""Data: WikiText-2 and a synthetic corpus (tokenized, cached), and generated associative-recall
sequences, served to Lightning."""

from .datamodule import ContiguousWindows, LMDataModule, RandomWindows, SampledDataModule, ShardSampler, TokenizedCorpus
from .mqar import MQARDataModule, MQARTask, MQARTokenizer
from .tokenizers import CharTokenizer, GPT2Tokenizer, StreamDecoder, TokenizerError, load_gpt2, tokenizer_from_spec
from .wikitext import DataNotFoundError

__all__ = [
    "CharTokenizer", "ContiguousWindows", "DataNotFoundError", "GPT2Tokenizer", "LMDataModule", "MQARDataModule",
    "MQARTask", "MQARTokenizer", "RandomWindows", "SampledDataModule", "ShardSampler", "StreamDecoder",
    "TokenizedCorpus", "TokenizerError", "load_gpt2", "tokenizer_from_spec",
]
