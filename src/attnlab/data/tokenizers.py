"""Tokenizers: GPT-2 byte-level BPE through ``tiktoken``, and a character-level vocabulary.

Offline, ``tiktoken.get_encoding`` only works from its cache. When a local GPT-2 ranks file
is found (``gpt2.tiktoken``, e.g. in ``<data_dir>/tokenizers/``), it is placed in a private
tiktoken cache exactly as tiktoken would have downloaded it, so the real loader runs and
verifies the file's sha256.

A trained run records its tokenizer as a small :func:`Tokenizer.spec` (name, size, fingerprint and,
for characters, the alphabet) in its checkpoints; :func:`tokenizer_from_spec` rebuilds it for
sampling. :class:`StreamDecoder` turns generated ids into text as they come.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.errors import InputError
from attnlab.io import atomic_write

# tiktoken's download URL for the GPT-2 ranks; its cache file is named by the URL's SHA-1.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_RANKS_FILENAME = "gpt2.tiktoken"
TOKENIZER_NAMES = ("gpt2", "char")


class TokenizerError(InputError, RuntimeError):
    """The tokenizer cannot be built from what was given (a name, a checkpoint's record, local files)."""


class Tokenizer:
    """What the data pipeline needs: ids out, text back, a size and a fingerprint for caches."""

    name: str
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes token ``token_id`` stands for (a byte-level BPE token may hold part of a
        character)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """What rebuilds this tokenizer (:func:`tokenizer_from_spec`): plain values for a checkpoint."""
        return {"name": self.name, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}


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

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except KeyError:  # an id of a vocabulary padded beyond the encoding's
            return CharTokenizer.UNKNOWN.encode("utf-8")


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

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode("utf-8")

    @property
    def alphabet(self) -> str:
        return "".join(self.itos[1:])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "alphabet": self.alphabet}


class StreamDecoder:
    """Text of a growing sequence of token ids, piece by piece: each token's bytes go through an
    incremental UTF-8 decoder, so a character whose bytes are split across byte-level BPE tokens
    is emitted once, when its last byte arrives. The pieces and :meth:`flush` join to
    ``tokenizer.decode(ids)`` (invalid bytes become U+FFFD in both)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by ``token_id`` (possibly empty)."""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever an unfinished character left behind (U+FFFD), at the end of the stream."""
        return self._utf8.decode(b"", final=True)


def tokenizer_from_spec(spec: dict[str, Any], search_dirs: Iterable[str | Path | None] = (),
                        cache_dir: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.spec`; the GPT-2 encoding is loaded with
    :func:`load_gpt2` from ``search_dirs``. Raises :class:`TokenizerError` for an unknown name or
    a tokenizer that differs from the recorded one."""
    name = spec.get("name")
    if name == "gpt2":
        tokenizer: Tokenizer = load_gpt2(search_dirs, cache_dir)
    elif name == "char":
        if not isinstance(spec.get("alphabet"), str):
            raise TokenizerError("the character tokenizer's record has no alphabet")
        tokenizer = CharTokenizer(spec["alphabet"])
    else:
        raise TokenizerError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZER_NAMES)}")
    expected = spec.get("fingerprint")
    if expected is not None and tokenizer.fingerprint != expected:
        raise TokenizerError(f"the {name} tokenizer found here ({tokenizer.fingerprint}) is not the recorded one "
                             f"({expected})")
    return tokenizer


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
        with ranks.open("rb") as source:
            atomic_write(cached, lambda handle: shutil.copyfileobj(source, handle))
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
