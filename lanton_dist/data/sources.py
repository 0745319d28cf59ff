"""``build_dataset``: the :class:`~lanton_dist.data.dataset.TokenDataset` of ``DataConfig.source``.

``stdlib``/``synthetic`` are the built-in corpora (:mod:`lanton_dist.data.builtin`); ``text``
and ``jsonl`` read, tokenize and pack the documents at ``data.path`` in memory
(:mod:`lanton_dist.data.documents`); ``indexed`` (also ``megatron``) memory-maps a Megatron
``.bin``/``.idx`` pair (:mod:`lanton_dist.data.indexed`). The last three split by document
exactly as Megatron's ``GPTDataset`` does, so ``text`` files, the indexed dataset that
``lanton-dist prepare-data`` writes from them, and Megatron's own ``GPTDataset`` see the same
validation documents.
"""
from __future__ import annotations

import sysconfig

import torch

from lanton_dist.config import DATA_SOURCES, DataConfig
from lanton_dist.data.builtin import (
    SYNTH_BRANCHING,
    SYNTH_TRAIN_TOKENS,
    SYNTH_VAL_TOKENS,
    STDLIB_MAX_BYTES,
    _stdlib_corpus,
    synthetic_tokens,
)
from lanton_dist.data.dataset import TokenDataset
from lanton_dist.data.documents import Documents, documents, encoded_documents, train_document_count
from lanton_dist.data.errors import DataError
from lanton_dist.data.indexed import read_indexed
from lanton_dist.data.tokenizer import load_tokenizer, token_dtype

SOURCES: tuple[str, ...] = DATA_SOURCES
INDEXED_SOURCES: tuple[str, ...] = ("indexed", "megatron")


def build_dataset(cfg: DataConfig, vocab_size: int) -> TokenDataset:
    """The dataset of ``cfg.source`` for a model with ``vocab_size`` tokens."""
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.source == "stdlib":
        _check_vocab(256, vocab_size, "stdlib data is byte-level")
        root = sysconfig.get_paths()["stdlib"]
        train, val, tn, vn = _stdlib_corpus(root, STDLIB_MAX_BYTES, float(cfg.val_fraction))
        return TokenDataset(train, val, cfg.seq_len, cfg.seed, 256, "stdlib", tn, vn, val_seed=cfg.val_seed)
    if cfg.source == "synthetic":
        if vocab_size < SYNTH_BRANCHING:
            raise ValueError(f"synthetic data needs vocab_size >= {SYNTH_BRANCHING}, got {vocab_size}")
        train = synthetic_tokens(SYNTH_TRAIN_TOKENS, vocab_size, cfg.seed, 0)
        val = synthetic_tokens(SYNTH_VAL_TOKENS, vocab_size, cfg.seed, 1)
        return TokenDataset(train, val, cfg.seq_len, cfg.seed, vocab_size, "synthetic", val_seed=cfg.val_seed)
    if cfg.source in ("text", "jsonl"):
        tok = load_tokenizer(cfg.tokenizer, cfg.eod_token)
        _check_vocab(tok.vocab_size, vocab_size, f"tokenizer {tok.name} has {tok.vocab_size} tokens")
        docs = Documents.from_encoded(encoded_documents(documents(cfg.path, cfg.source, cfg.text_key, cfg.sample_by), tok),
                                      token_dtype(tok.vocab_size), f"{cfg.source} data at {cfg.path}")
        return _split(docs, cfg, tok.vocab_size)
    if cfg.source in INDEXED_SOURCES:
        if not cfg.path:
            raise ValueError(f"data.source {cfg.source} needs data.path: the prefix of an indexed dataset (<path>.bin/<path>.idx)")
        docs = read_indexed(cfg.path)
        if docs.tokens.dtype.kind not in "iu":
            raise DataError(f"indexed dataset {cfg.path} stores {docs.tokens.dtype.name} values, not token ids")
        if docs.tokens.size and not 0 <= int(docs.tokens.min()) <= int(docs.tokens.max()) < vocab_size:
            raise DataError(f"indexed dataset {cfg.path} has token ids in [{docs.tokens.min()}, {docs.tokens.max()}]; "
                            f"model.vocab_size is {vocab_size}: token ids must be < model.vocab_size "
                            f"(set model.vocab_size >= {int(docs.tokens.max()) + 1}, or prepare the data with the "
                            "model's tokenizer)")
        return _split(docs, cfg, vocab_size)
    raise ValueError(f"unknown data.source {cfg.source!r}; choose one of {SOURCES}")


def _check_vocab(data_vocab: int, model_vocab: int, what: str) -> None:
    """The data's ids reach ``data_vocab - 1``: refuse a model vocabulary that cannot hold them."""
    if model_vocab < data_vocab:
        raise DataError(f"{what}: token ids up to {data_vocab - 1}, but model.vocab_size is {model_vocab} (ids must be "
                        f"< model.vocab_size): set model.vocab_size >= {data_vocab}")


def _fraction_hint(n_docs: int, val_fraction: float) -> str:
    """``", or set data.val_fraction >= V"`` for the smallest ``V`` (in thousandths) whose split
    of ``n_docs`` documents leaves one on each side; empty when none does."""
    v = next((k / 1000 for k in range(1, 1000) if 0 < train_document_count(n_docs, k / 1000) < n_docs), None)
    return "" if v is None or v <= val_fraction else f", or set data.val_fraction >= {v:g}"


def _split(docs: Documents, cfg: DataConfig, vocab_size: int) -> TokenDataset:
    """Megatron's document split of ``docs`` (at least one document on each side)."""
    train, val = docs.split(cfg.val_fraction)
    if train.size == 0 or val.size == 0:
        raise DataError(
            f"{cfg.source} data at {cfg.path}: {docs.n_docs} document(s) with data.val_fraction {cfg.val_fraction} leave "
            f"the {'training' if train.size == 0 else 'validation'} split empty; add documents"
            + (" or split files further (data.sample_by paragraph|line)" if cfg.source == "text" and cfg.sample_by != "line" else "")
            + (_fraction_hint(docs.n_docs, cfg.val_fraction) if train.size else "")
        )
    # torch.from_numpy shares the memory: a memory-mapped dataset is not copied
    return TokenDataset(torch.from_numpy(train), torch.from_numpy(val), cfg.seq_len, cfg.seed, vocab_size, cfg.source,
                        val_seed=cfg.val_seed)
