"""Megatron's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), read and written without
torch or megatron-core.

``PREFIX.bin`` holds the token ids of every sequence back to back. ``PREFIX.idx`` is::

    b"MMIDIDX\\x00\\x00"  <Q version = 1  <B dtype code  <Q sequence count S  <Q document count D+1
    int32[S] sequence lengths   int64[S] sequence byte offsets in .bin   int64[D+1] document indices

(document ``d`` is sequences ``[doc_idx[d], doc_idx[d+1])``; the first entry is 0), as
``megatron.core.datasets.indexed_dataset`` writes it. :class:`IndexedWriter` stores one sequence
per document and produces the same bytes as its ``IndexedDatasetBuilder``; :func:`read_indexed`
memory-maps a dataset (any number of sequences per document) as :class:`Documents`.
"""
from __future__ import annotations

import struct
from pathlib import Path
from types import TracebackType

import numpy as np

from lanton_dist.data.documents import Documents
from lanton_dist.data.errors import DataError

HEADER: bytes = b"MMIDIDX\x00\x00"
VERSION: int = 1
#: Megatron's dtype codes (``indexed_dataset.DType``).
DTYPE_CODES: dict[type[np.number], int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8,
}
_HEAD = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequence count, document count


def index_paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)``."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


class IndexedWriter:
    """Stream documents into ``PREFIX.bin``; ``close`` (or leaving the ``with``) writes ``.idx``.

    Each :meth:`add_document` call is one sequence and one document; ids must fit ``dtype``.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.integer]) -> None:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype} is not one of Megatron's index dtypes {sorted(d.__name__ for d in DTYPE_CODES)}")
        self.bin_path, self.idx_path = index_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.lengths: list[int] = []
        self._bin = open(self.bin_path, "wb")

    def add_document(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < np.iinfo(self.dtype).min or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids [{ids.min()}, {ids.max()}] do not fit {self.dtype.name}")
        self._bin.write(ids.astype(self.dtype).tobytes(order="C"))
        self.lengths.append(int(ids.size))

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    def close(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.idx_path, "wb") as f:
            f.write(_HEAD.pack(HEADER, VERSION, DTYPE_CODES[self.dtype.type], len(lengths), len(doc_idx)))
            f.write(lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes())

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # never leave a half-written dataset (or an old .idx beside a new .bin)
            self._bin.close()
            self.bin_path.unlink(missing_ok=True)
            self.idx_path.unlink(missing_ok=True)


def read_indexed(prefix: str | Path) -> Documents:
    """The documents of the indexed dataset at ``prefix``, tokens memory-mapped (copy-on-write, never written)."""
    bin_path, idx_path = index_paths(prefix)
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise FileNotFoundError(f"indexed dataset {prefix}: {p} does not exist (give the prefix, without extension)")
    raw = idx_path.read_bytes()
    if len(raw) < _HEAD.size:
        raise DataError(f"{idx_path} is too short to be a Megatron index")
    header, version, code, n_seq, n_doc_idx = _HEAD.unpack_from(raw)
    codes = {c: d for d, c in DTYPE_CODES.items()}
    if header != HEADER or version != VERSION or code not in codes:
        raise DataError(f"{idx_path} is not a Megatron index (header {header!r}, version {version}, dtype code {code})")
    dtype = np.dtype(codes[code])
    off = _HEAD.size
    lengths = np.frombuffer(raw, np.int32, n_seq, off).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_doc_idx, off + 12 * n_seq)
    seq_starts = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_starts[1:])
    n_tokens = int(seq_starts[-1])
    if not np.array_equal(pointers, seq_starts[:-1] * dtype.itemsize):
        raise DataError(f"{idx_path}: sequences are not stored back to back in {bin_path.name}; not supported")
    if n_doc_idx < 2 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or (np.diff(doc_idx) < 0).any():
        raise DataError(f"{idx_path}: bad document indices (need 0 = d_0 <= d_1 <= ... = {n_seq} sequences)")
    if bin_path.stat().st_size != n_tokens * dtype.itemsize:
        raise DataError(f"{bin_path} has {bin_path.stat().st_size} bytes; its index describes {n_tokens} {dtype.name} tokens")
    tokens = np.memmap(bin_path, dtype=dtype, mode="c", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    return Documents(tokens, seq_starts[doc_idx])
