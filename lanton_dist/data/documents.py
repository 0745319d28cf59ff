"""Documents of text and JSONL files, their token stream, and the document-level split (no torch).

A corpus is :class:`Documents`: one ``(N,)`` token array in which every document is followed
by the tokenizer's end-of-document token, and ``(n_docs + 1,)`` offsets of the document starts
(so documents shorter than a training window are simply packed, as Megatron packs them).
A document of ``text`` files is a whole file, a paragraph or a line (``sample_by``); the
default ``auto`` makes it a whole file when there are several files and a paragraph (or line)
of a single file, so one file still has documents to hold out.
The validation split is the last ``val_fraction`` of the documents by count, with the rounding
of Megatron's ``GPTDataset`` split (:func:`train_document_count`), so ``text``/``jsonl`` files
and the indexed dataset ``prepare-data`` writes from them split identically.
"""
from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lanton_dist.config import SAMPLE_BY
from lanton_dist.data.errors import DataError
from lanton_dist.data.tokenizer import Tokenizer

FORMATS: dict[str, tuple[str, ...]] = {"text": (".txt",), "jsonl": (".jsonl", ".ndjson")}
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")


def input_files(pattern: str, fmt: str) -> list[Path]:
    """The files of ``pattern``: a file, a directory (its ``FORMATS[fmt]`` files, recursively,
    sorted by relative path) or a glob (sorted; ``**`` recurses)."""
    if not pattern:
        raise DataError(f"{fmt} data needs a path: a file, a directory or a glob (data.path / --input)")
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted((f for f in path.rglob("*") if f.is_file() and f.name.endswith(FORMATS[fmt])),
                       key=lambda f: f.relative_to(path).as_posix())
        if not files:
            raise DataError(f"directory {pattern} has no {'/'.join(FORMATS[fmt])} files")
        return files
    if glob.has_magic(pattern):
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{pattern} matches no files")
        return files
    raise DataError(f"{pattern} does not exist")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte offset {exc.start}); convert it to UTF-8, "
                        f"e.g. iconv -f latin1 -t utf-8") from None


def text_documents(files: list[Path], sample_by: str = "auto") -> Iterator[tuple[str, str]]:
    """``(file, document)`` for the non-blank documents of plain-text ``files``: whole files,
    paragraphs or lines; ``auto``: whole files when there are several, else the one file's
    paragraphs, or its lines when it has no blank-line paragraph break (so a single file
    still leaves documents for a validation split)."""
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"unknown sample_by {sample_by!r}; choose one of {SAMPLE_BY}")
    if sample_by == "auto" and len(files) > 1:
        sample_by = "document"
    for f in files:
        text = _read_text(f)
        if sample_by == "document":
            parts = [text]
        elif sample_by == "line":
            parts = text.splitlines()
        else:
            parts = [p for p in _PARAGRAPH.split(text) if p.strip()]
            if sample_by == "auto" and len(parts) < 2:
                parts = text.splitlines()
        yield from ((str(f), p) for p in parts if p.strip())


def jsonl_documents(files: list[Path], text_key: str = "text") -> Iterator[tuple[str, str]]:
    """``(file:line, obj[text_key])`` for the JSON objects, one per non-blank line, with non-empty text."""
    for f in files:
        for lineno, line in enumerate(_read_text(f).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{f}:{lineno}: not a JSON line ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                found = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                raise DataError(f"{f}:{lineno}: expected a JSON object with a string under {text_key!r}, found {found} "
                                f"(data.text_key / prepare-data --jsonl-key names the key)")
            if obj[text_key]:
                yield f"{f}:{lineno}", obj[text_key]


def documents(pattern: str, fmt: str, text_key: str = "text", sample_by: str = "auto") -> Iterator[tuple[str, str]]:
    """``(where, document)`` for the documents of ``pattern`` read as ``fmt`` (``text`` or ``jsonl``), in order."""
    return file_documents(input_files(pattern, fmt), fmt, text_key, sample_by)


def file_documents(files: list[Path], fmt: str, text_key: str = "text", sample_by: str = "auto") -> Iterator[tuple[str, str]]:
    """``(where, document)`` for the documents of ``files`` read as ``fmt``, in order."""
    if fmt == "text":
        return text_documents(files, sample_by)
    if sample_by not in ("auto", "document"):
        raise ValueError(f"sample_by {sample_by!r} is for text files; a JSONL line is one document")
    return jsonl_documents(files, text_key)


def encoded_documents(docs: Iterator[tuple[str, str]], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Each document's ids followed by ``tokenizer.eod``."""
    for where, doc in docs:
        try:
            ids = tokenizer.encode(doc)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        yield np.concatenate([ids, np.array([tokenizer.eod], dtype=ids.dtype)])


@dataclass
class Documents:
    """``tokens``: ``(N,)`` ids, each document followed by its end-of-document token;
    ``starts``: ``(n_docs + 1,)`` int64 offsets of the documents in ``tokens`` (last = ``N``)."""

    tokens: np.ndarray
    starts: np.ndarray

    @property
    def n_docs(self) -> int:
        return len(self.starts) - 1

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """``(train, val)`` token views: the first :func:`train_document_count` documents, the rest."""
        n_train = train_document_count(self.n_docs, val_fraction)
        cut = int(self.starts[n_train])
        return self.tokens[:cut], self.tokens[cut:]

    @classmethod
    def from_encoded(cls, encoded: Iterator[np.ndarray], dtype: type[np.integer], origin: str = "the corpus") -> Documents:
        """The documents of ``encoded`` (each already ending in its end-of-document token);
        ``origin`` names the input in the error for an empty one."""
        arrays = list(encoded)
        if not arrays:
            raise DataError(f"{origin}: no documents (every file or line is empty or blank)")
        starts = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=starts[1:])
        return cls(np.concatenate(arrays).astype(dtype, copy=False), starts)


def split_fractions(val_fraction: float) -> tuple[float, float]:
    """``(train, val)`` fractions as written into Megatron's split string (6 decimals)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    return float(f"{1.0 - val_fraction:.6f}"), float(f"{val_fraction:.6f}")


def megatron_split(val_fraction: float) -> str:
    """``GPTDatasetConfig.split`` for train / validation / no test."""
    train, val = split_fractions(val_fraction)
    return f"{train:.6f},{val:.6f},0"


def train_document_count(n_docs: int, val_fraction: float) -> int:
    """Documents ``[0, n)`` train, the rest validate: Megatron's ``round(train / (train + val) · n_docs)``."""
    train, val = split_fractions(val_fraction)
    return int(round(train / (train + val) * float(n_docs)))
