"""Data loading, tokenization, the token cache and the window datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.data import (
    CharTokenizer,
    ContiguousWindows,
    DataNotFoundError,
    LMDataModule,
    RandomWindows,
    ShardSampler,
    synthetic,
    wikitext,
)
from attnlab.loss import IGNORE_INDEX
from tests.conftest import SHARED_DATA, has_gpt2_ranks, has_shared_data


def write_wikitext(root, variant="raw", seed=0):
    """Small WikiText-shaped files of generated text, under the release's folder and file names."""
    spec = wikitext.VARIANTS[variant]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    texts = synthetic.generate_corpus(seed=seed, n_words=50, train_sentences=300, eval_sentences=40)
    texts = {k: " = Heading = \n \n" + v for k, v in texts.items()}
    for split, name in wikitext.SPLIT_FILES.items():
        (folder / f"wiki.{name}.{spec.extension}").write_text(texts[split], encoding="utf-8")
    return texts


def datamodule(tmp_path, **kwargs) -> LMDataModule:
    defaults = dict(source="wikitext2", variant="raw", tokenizer="char", block_size=16, batch_size=2,
                    data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    return LMDataModule(**{**defaults, **kwargs})


@pytest.mark.parametrize("variant", ["raw", "v1"])
def test_loads_local_files_through_datasets(tmp_path, variant):
    texts = write_wikitext(tmp_path / "data", variant)
    dm = datamodule(tmp_path, variant=variant)
    corpus = dm.prepare_corpus()
    for split in ("train", "validation", "test"):
        assert dm.tokenizer.decode(corpus.splits[split].tolist()) == texts[split]
    assert corpus.meta["variant"] == variant


def test_variant_is_never_substituted(tmp_path):
    write_wikitext(tmp_path / "data", "v1")
    with pytest.raises(DataNotFoundError) as error:
        datamodule(tmp_path, variant="raw").prepare_corpus()
    message = str(error.value)
    assert "wikitext-2-raw" in message and "data.variant=v1" in message and "ATTNLAB_DATA_DIR" in message


def test_missing_data_names_what_to_set(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"paths\.data_dir"):
        datamodule(tmp_path, data_dir=None).prepare_corpus()


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    write_wikitext(tmp_path / "data")
    first = datamodule(tmp_path).prepare_corpus()

    def fail(*args, **kwargs):
        raise AssertionError("source files were read although the cache is valid")

    monkeypatch.setattr(wikitext, "load_wikitext", fail)
    again = datamodule(tmp_path).prepare_corpus()
    assert again.cache_path == first.cache_path
    np.testing.assert_array_equal(again.splits["train"], first.splits["train"])
    monkeypatch.undo()

    # a changed source file gets a new cache entry with the new text
    train_file = tmp_path / "data" / "wikitext-2-raw" / "wiki.train.raw"
    train_file.write_text(train_file.read_text() + " zz\n")
    changed = datamodule(tmp_path).prepare_corpus()
    assert changed.cache_path != first.cache_path
    assert len(changed.splits["train"]) == len(first.splits["train"]) + 4
    # another tokenizer is another entry too
    assert datamodule(tmp_path, tokenizer="gpt2").cache_key() != datamodule(tmp_path).cache_key()


def test_validation_windows_cover_each_token_once():
    tokens = np.arange(1000, 1000 + 103)
    windows = ContiguousWindows(tokens, block_size=10)
    assert len(windows) == 11
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    counted = targets[targets != IGNORE_INDEX]
    assert counted.tolist() == tokens[1:].tolist()
    x, y = windows[3]
    assert torch.equal(x[1:], y[:-1]) and x[0].item() == tokens[30]


@pytest.mark.parametrize("block_size", [16, 7, 64, 200])
def test_eval_dataloader_covers_each_target_once_at_any_length(tmp_path, block_size):
    """Windows of any length cover the split's targets once (the training block size is 16);
    batches keep about eval_batch_size * 16 tokens (at least one window)."""
    write_wikitext(tmp_path / "data")
    dm = datamodule(tmp_path, eval_batch_size=4, max_eval_tokens=500)
    tokens = np.asarray(dm.prepare_corpus().splits["validation"][:500], dtype=np.int64)
    batches = list(dm.eval_dataloader("validation", block_size))
    assert all(x.shape[1] == y.shape[1] == block_size for x, y in batches)
    assert batches[0][0].shape[0] == max(1, 4 * 16 // block_size)
    x = torch.cat([b[0] for b in batches]).reshape(-1)
    y = torch.cat([b[1] for b in batches]).reshape(-1)
    counted = y != IGNORE_INDEX
    assert counted.sum() == len(tokens) - 1
    assert torch.equal(y[counted], torch.from_numpy(tokens[1:]))
    assert torch.equal(x[counted], torch.from_numpy(tokens[:-1]))
    first = next(iter(dm.val_dataloader()))
    assert first[0].shape == (4, 16)


def test_random_windows_are_a_function_of_seed_and_index():
    tokens = np.arange(500)
    a = RandomWindows(tokens, 8, seed=3, length=100)
    b = RandomWindows(tokens, 8, seed=3, length=100)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(20))
    x, y = a[7]
    assert torch.equal(y, x + 1)  # contiguous: targets are the next tokens
    assert not torch.equal(a[0][0], RandomWindows(tokens, 8, seed=4, length=100)[0][0])


def test_shard_sampler_splits_a_global_order_without_duplicates():
    shards = [list(ShardSampler(20, start=4, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(4, 20))
    assert len(ShardSampler(20, 4, 1, 3)) == len(shards[1])


def test_char_tokenizer_round_trip_and_unknown():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("hello").tolist()) == "hello"
    assert tok.encode("hex").tolist()[-1] == 0  # 'x' is outside the alphabet


def test_synthetic_corpus_is_deterministic_and_learnable_shape():
    a, b = synthetic.generate_corpus(seed=1), synthetic.generate_corpus(seed=1)
    assert a == b and a != synthetic.generate_corpus(seed=2)
    assert len(a["train"]) > 5 * len(a["validation"]) > 0


def test_invalid_data_options():
    from attnlab.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.variant='raw2'.*allowed: 'raw' \| 'v1'"):
        LMDataModule(variant="raw2")
    with pytest.raises(ConfigError, match=r"data\.tokenizer='bpe'"):
        LMDataModule(tokenizer="bpe")
    with pytest.raises(ConfigError, match=r"data\.batch_size=0"):
        LMDataModule(batch_size=0)


@pytest.mark.skipif(not has_gpt2_ranks(), reason="GPT-2 ranks file not present (../shared/data/tokenizers)")
def test_gpt2_ids_from_tiktoken(tmp_path, monkeypatch):
    from attnlab.data import load_gpt2

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    tok = load_gpt2([SHARED_DATA], tmp_path / "tiktoken")
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_gpt2_without_ranks_or_network_explains(tmp_path, monkeypatch):
    from attnlab.data import TokenizerError, load_gpt2

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr("tiktoken.load.read_file", lambda url: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(TokenizerError, match=r"paths\.data_dir.*data\.tokenizer=char"):
        load_gpt2([tmp_path])


@pytest.mark.skipif(not (has_shared_data() and has_gpt2_ranks()), reason="real WikiText-2 files not present")
def test_real_wikitext2_v1_with_gpt2(tmp_path):
    dm = LMDataModule(variant="v1", tokenizer="gpt2", data_dir=str(SHARED_DATA), cache_dir=str(tmp_path / "cache"))
    corpus = dm.prepare_corpus()
    # the counts documented with the files (GPT-2 BPE of each whole file)
    assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 2448382, "validation": 258659, "test": 295877}
    assert corpus.vocab_size == 50257
    assert dm.tokenizer.decode(corpus.splits["train"][:8].tolist()).startswith(" \n = Valkyria")
    # the raw variant is not there and is not replaced by v1
    with pytest.raises(DataNotFoundError, match="data.variant=v1"):
        LMDataModule(variant="raw", data_dir=str(SHARED_DATA), cache_dir=str(tmp_path / "cache")).prepare_corpus()


def test_stream_decoder_emits_characters_split_across_byte_level_tokens_once_complete():
    """A byte-level BPE whose one merge joins the last byte of 'é' with the first of '€': the
    stream emits 'é' with that token and '€' with its last byte, never a partial character."""
    import tiktoken

    from attnlab.data import GPT2Tokenizer, StreamDecoder

    ranks = {bytes([i]): i for i in range(256)} | {b"\xa9\xe2": 256}
    tok = GPT2Tokenizer(tiktoken.Encoding("bytes-test", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                                           special_tokens={"<|endoftext|>": 257}))
    ids = tok.encode("aé€").tolist()
    assert ids == [ord("a"), 0xC3, 256, 0x82, 0xAC]
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["a", "", "é", "", "€"]
    assert decoder.flush() == ""
    # an unfinished character at the end becomes U+FFFD, as in decode()
    cut = StreamDecoder(tok)
    assert "".join(cut.push(i) for i in ids[:4]) + cut.flush() == tok.decode(ids[:4]) == "aé\ufffd"


def test_char_tokenizer_spec_rebuilds_it_and_unknown_names_are_refused():
    from attnlab.data import StreamDecoder, TokenizerError, tokenizer_from_spec

    tok = CharTokenizer.from_text("héllo wörld")
    rebuilt = tokenizer_from_spec(tok.spec())
    assert rebuilt.itos == tok.itos and rebuilt.fingerprint == tok.fingerprint
    decoder = StreamDecoder(rebuilt)
    assert "".join(decoder.push(i) for i in tok.encode("wörld").tolist()) == "wörld"
    with pytest.raises(TokenizerError, match="unknown tokenizer 'bpe'; known: gpt2, char"):
        tokenizer_from_spec({"name": "bpe"})
    with pytest.raises(TokenizerError, match="is not the recorded one"):
        tokenizer_from_spec({**tok.spec(), "fingerprint": "char-0000"})


def test_datamodule_records_its_tokenizer_without_loading_it(tmp_path):
    write_wikitext(tmp_path / "data")
    dm = datamodule(tmp_path)
    assert dm.tokenizer_spec() == dm.tokenizer.spec()


@pytest.mark.skipif(not has_gpt2_ranks(), reason="GPT-2 ranks file not present (../shared/data/tokenizers)")
def test_stream_decoder_with_gpt2_bpe(tmp_path, monkeypatch):
    from attnlab.data import StreamDecoder, load_gpt2, tokenizer_from_spec

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    tok = load_gpt2([SHARED_DATA], tmp_path / "tiktoken")
    assert tokenizer_from_spec(tok.spec(), [SHARED_DATA], tmp_path / "tiktoken").fingerprint == tok.fingerprint
    text = "Café 👋🏽 naïve — 東京"
    ids = tok.encode(text).tolist()
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces  # some characters span several tokens: nothing is printed until they are complete
    assert all("\ufffd" not in piece for piece in pieces)
