"""Tokenizers: GPT-2 byte-level BPE through ``tiktoken``, and a character-level vocabulary.

Offline, ``tiktoken.get_encoding`` only works from its cache. When a local GPT-2 ranks file
is found (``gpt2.tiktoken``, e.g. in ``<data_dir>/tokenizers/``), it is placed in a private
tiktoken cache exactly as tiktoken would have downloaded it, so the real loader runs and
verifies the file's sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# tiktoken's download URL for the GPT-2 ranks; its cache file is named by the URL's SHA-1.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_RANKS_FILENAME = "gpt2.tiktoken"


class TokenizerError(RuntimeError):
    pass


class Tokenizer:
    """What the data pipeline needs: ids out, text back, a size and a fingerprint for caches."""

    name: str
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE (50,257 ids, ``<|endoftext|>`` = 50256)."""

    name = "gpt2"

    def __init__(self, encoding):
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.fingerprint = f"tiktoken-gpt2-{encoding.n_vocab}"
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> np.ndarray:
        # Text that happens to contain "<|endoftext|>" is encoded as ordinary text.
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


class CharTokenizer(Tokenizer):
    """Characters of the training text; id 0 stands for any character outside it."""

    name = "char"
    UNKNOWN = "\ufffd"

    def __init__(self, alphabet: str):
        chars = sorted(set(alphabet) - {self.UNKNOWN})
        self.itos = [self.UNKNOWN] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.fingerprint = "char-" + hashlib.sha256("".join(self.itos).encode()).hexdigest()[:16]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lookup = {ord(c): i for c, i in self.stoi.items()}
        unique, inverse = np.unique(codes, return_inverse=True)
        mapped = np.array([lookup.get(int(u), 0) for u in unique], dtype=np.int64)
        return mapped[inverse]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] if 0 <= i < len(self.itos) else self.UNKNOWN for i in ids)

    @property
    def alphabet(self) -> str:
        return "".join(self.itos[1:])


def find_gpt2_ranks(search_dirs: Iterable[str | Path | None]) -> Path | None:
    """The first ``gpt2.tiktoken`` in ``<dir>/`` or ``<dir>/tokenizers/`` of ``search_dirs``."""
    for directory in search_dirs:
        if not directory:
            continue
        for candidate in (Path(directory) / GPT2_RANKS_FILENAME, Path(directory) / "tokenizers" / GPT2_RANKS_FILENAME):
            if candidate.is_file():
                return candidate
    return None


def load_gpt2(search_dirs: Iterable[str | Path | None] = (), cache_dir: str | Path | None = None) -> GPT2Tokenizer:
    """GPT-2 BPE via ``tiktoken.get_encoding``: from a local ranks file when one is found, else
    from tiktoken's own cache or download."""
    import tiktoken

    search_dirs = list(search_dirs)
    ranks = find_gpt2_ranks(search_dirs)
    if ranks is None:
        try:
            return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
        except Exception as error:  # network or cache failure
            looked = ", ".join(str(Path(d) / "tokenizers" / GPT2_RANKS_FILENAME) for d in search_dirs if d) or "nowhere"
            raise TokenizerError(
                "The GPT-2 encoding could not be loaded: tiktoken could not download it "
                f"({type(error).__name__}) and no local '{GPT2_RANKS_FILENAME}' was found (looked in {looked}). "
                "Set paths.data_dir (or ATTNLAB_DATA_DIR) to a folder whose tokenizers/ holds gpt2.tiktoken, "
                "set TIKTOKEN_CACHE_DIR to a filled tiktoken cache, or use data.tokenizer=char."
            ) from error
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "attnlab-tiktoken"
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / hashlib.sha1(R50K_URL.encode()).hexdigest()
    if not cached.exists() or cached.stat().st_size != ranks.stat().st_size:
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(ranks, tmp)
        os.replace(tmp, cached)
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        # r50k_base is GPT-2's encoding (same ranks, regex and special token) from one file.
        encoding = tiktoken.get_encoding("r50k_base")
    except Exception as error:
        raise TokenizerError(f"{ranks} is not a valid GPT-2 ranks file: {error}") from error
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
    return GPT2Tokenizer(encoding)
