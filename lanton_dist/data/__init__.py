"""Token data for the training loop (every backend, Megatron included): :func:`build_dataset` →
:class:`TokenDataset`; for users of Megatron's own data pipeline, its ``GPTDataset`` over the
same documents through :func:`build_gpt_datasets`.

Sources (``DataConfig.source``): the built-in ``stdlib`` and ``synthetic`` corpora
(:mod:`.builtin`); ``text`` and ``jsonl`` files (:mod:`.documents`, tokenized by
:mod:`.tokenizer`: bytes, or a ``tokenizer.json``); ``indexed``/``megatron`` datasets
(:mod:`.indexed`, the format ``lanton-dist prepare-data`` (:mod:`.prepare`) writes).
Input the run cannot use is a :class:`~.errors.DataError` naming the file and the fix
(``launch/train.py``: one ``data error:`` line, exit 2).

Names load on first access (PEP 562): ``lanton-dist prepare-data`` and the document, tokenizer
and indexed-format modules do not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lanton_dist.lazy import lazy_exports

if TYPE_CHECKING:
    from lanton_dist.data.builtin import SYNTH_BRANCHING, markov_chain, stdlib_files, synthetic_tokens
    from lanton_dist.data.dataset import TokenDataset, unigram_baseline
    from lanton_dist.data.documents import Documents
    from lanton_dist.data.errors import DataError
    from lanton_dist.data.indexed import IndexedWriter, read_indexed
    from lanton_dist.data.megatron import build_gpt_datasets
    from lanton_dist.data.prepare import prepare_data
    from lanton_dist.data.sources import INDEXED_SOURCES, SOURCES, build_dataset
    from lanton_dist.data.tokenizer import load_tokenizer

_LAZY: dict[str, str] = {
    "SYNTH_BRANCHING": "lanton_dist.data.builtin", "markov_chain": "lanton_dist.data.builtin",
    "stdlib_files": "lanton_dist.data.builtin", "synthetic_tokens": "lanton_dist.data.builtin",
    "TokenDataset": "lanton_dist.data.dataset",
    "unigram_baseline": "lanton_dist.data.dataset",
    "Documents": "lanton_dist.data.documents",
    "DataError": "lanton_dist.data.errors",
    "IndexedWriter": "lanton_dist.data.indexed", "read_indexed": "lanton_dist.data.indexed",
    "build_gpt_datasets": "lanton_dist.data.megatron",
    "prepare_data": "lanton_dist.data.prepare",
    "INDEXED_SOURCES": "lanton_dist.data.sources", "SOURCES": "lanton_dist.data.sources",
    "build_dataset": "lanton_dist.data.sources",
    "load_tokenizer": "lanton_dist.data.tokenizer",
}
_SUBMODULES = frozenset({"builtin", "dataset", "documents", "errors", "indexed", "megatron", "prepare", "sources", "tokenizer"})

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, _SUBMODULES)
