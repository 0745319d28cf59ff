"""Text → token ids for the ``text``/``jsonl`` sources and ``lanton-dist prepare-data`` (no torch).

* :class:`ByteTokenizer` — the UTF-8 bytes of the text (vocabulary 256), the default. Its
  end-of-document token is byte 0 (NUL, :data:`BYTE_EOD`), which text does not contain; a
  document that does is refused.
* :class:`JsonTokenizer` — a Hugging Face ``tokenizer.json`` through the optional
  ``tokenizers`` package (``pip install 'lanton_dist[data]'``), encoded without special
  tokens; its end-of-document token is ``eod_token`` or the first of :data:`EOD_CANDIDATES`
  in its vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

BYTE_EOD: int = 0
EOD_CANDIDATES: tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class Tokenizer(Protocol):
    """What the data module needs of a tokenizer."""

    name: str
    vocab_size: int
    eod: int

    def encode(self, text: str) -> np.ndarray:
        """``(n,)`` integer token ids of ``text`` (no end-of-document token)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``eod`` = :data:`BYTE_EOD`."""

    name = "bytes"
    vocab_size = 256
    eod = BYTE_EOD

    def encode(self, text: str) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if (ids == BYTE_EOD).any():
            raise ValueError("text contains a NUL byte, the byte tokenizer's end-of-document token")
        return ids


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package)."""

    def __init__(self, path: str | Path, eod_token: str = "") -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ImportError(
                f"data.tokenizer {path}: reading a tokenizer.json needs the 'tokenizers' package "
                "(pip install 'lanton_dist[data]'); leave data.tokenizer empty for byte tokens"
            ) from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self._tok = HFTokenizer.from_file(str(path))
        self.name = str(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        found = [n for n in names if n in vocab]
        if not found:
            raise ValueError(
                f"tokenizer {path} has no end-of-document token "
                + (f"{eod_token!r}" if eod_token else f"(looked for {', '.join(EOD_CANDIDATES)}); name one with eod_token")
            )
        self.eod = int(vocab[found[0]])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def load_tokenizer(path: str = "", eod_token: str = "") -> Tokenizer:
    """:class:`JsonTokenizer` of ``path``, or :class:`ByteTokenizer` when ``path`` is empty."""
    if not path:
        if eod_token:
            raise ValueError(f"eod_token {eod_token!r} needs a tokenizer; byte tokens end documents with byte {BYTE_EOD}")
        return ByteTokenizer()
    return JsonTokenizer(path, eod_token)


def token_dtype(vocab_size: int) -> type[np.integer]:
    """The smallest dtype Megatron's indexed format stores ids below ``vocab_size`` in."""
    if vocab_size <= 256:
        return np.uint8
    return np.uint16 if vocab_size <= 65536 else np.int32
