"""``lanton-dist prepare-data``: text or JSONL files → a Megatron indexed dataset (no torch)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lanton_dist.data.documents import FORMATS, encoded_documents, file_documents, input_files
from lanton_dist.data.indexed import IndexedWriter
from lanton_dist.data.tokenizer import load_tokenizer, token_dtype


@dataclass
class PrepareStats:
    """What :func:`prepare_data` wrote."""

    prefix: str
    documents: int
    tokens: int  # end-of-document tokens included
    vocab_size: int
    eod: int
    dtype: str
    tokenizer: str

    def summary(self) -> str:
        return (f"wrote {self.prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.dtype}; tokenizer {self.tokenizer}, vocab {self.vocab_size}, end-of-document id {self.eod})")


def input_format(inputs: list[str]) -> str:
    """``jsonl`` when every input is JSONL (by suffix; a directory: holds JSONL files), ``text`` when none is."""
    is_jsonl = [_is_jsonl(i) for i in inputs]
    if all(is_jsonl):
        return "jsonl"
    if not any(is_jsonl):
        return "text"
    raise ValueError("inputs mix JSONL and other files; pass --format text|jsonl or prepare them separately")


def _is_jsonl(pattern: str) -> bool:
    path = Path(pattern)
    if path.is_dir():
        return any(f.name.endswith(FORMATS["jsonl"]) for f in path.rglob("*"))
    return pattern.endswith(FORMATS["jsonl"])


def prepare_data(inputs: list[str], output: str | Path, fmt: str = "", text_key: str = "text", tokenizer: str = "",
                 eod_token: str = "", sample_by: str = "auto") -> PrepareStats:
    """Tokenize the documents of ``inputs`` (files, directories or globs; ``fmt`` ``text``/``jsonl``,
    empty: from the suffixes) and write ``output.bin``/``output.idx``, one sequence per document,
    each followed by the tokenizer's end-of-document token. ``sample_by`` as ``data.sample_by``
    (``auto`` counts the files of all ``inputs`` together)."""
    if not inputs:
        raise ValueError("give at least one --input")
    fmt = fmt or input_format(inputs)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {tuple(FORMATS)}")
    tok = load_tokenizer(tokenizer, eod_token)
    dtype = token_dtype(tok.vocab_size)
    files = [f for pattern in inputs for f in input_files(pattern, fmt)]  # sample_by auto counts them all
    with IndexedWriter(output, dtype) as writer:
        for ids in encoded_documents(file_documents(files, fmt, text_key, sample_by), tok):
            writer.add_document(ids)
        if not writer.lengths:
            raise ValueError(f"{', '.join(inputs)}: no documents (every file or line was empty)")
    return PrepareStats(str(output), len(writer.lengths), writer.n_tokens, tok.vocab_size, tok.eod,
                        dtype.__name__, tok.name)
