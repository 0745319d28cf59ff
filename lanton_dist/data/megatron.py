"""Megatron-core ``GPTDataset`` train/validation pair over an indexed dataset, holding out the
same documents as the loop's ``indexed`` source — for users who feed Megatron's own data
pipeline (imports megatron-core when called; the loop itself reads :mod:`.indexed`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lanton_dist.config import DataConfig
from lanton_dist.data.documents import megatron_split
from lanton_dist.data.indexed import index_paths


class PretokenizedTokenizer:
    """What ``GPTDataset`` needs of a tokenizer for pre-tokenised data: the vocabulary size.
    Documents are not separated inside a sequence (reset_position_ids / reset_attention_mask /
    eod_mask_loss are off), so no end-of-document or pad id is needed."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = None
        # Megatron hashes the dataset configuration (tokenizer included) to name its index cache.
        self.unique_identifiers = {"class": "pretokenized", "vocab_size": vocab_size}


def build_gpt_datasets(cfg: DataConfig, vocab_size: int, train_samples: int, valid_samples: int,
                       cache_dir: str | Path) -> tuple[Any, Any]:
    """``(train, valid)`` ``GPTDataset`` of ``train_samples``/``valid_samples`` sequences of
    ``cfg.seq_len`` tokens over the indexed dataset at ``cfg.path`` (valid is None when
    ``cfg.val_fraction`` is 0). Documents split as :func:`~lanton_dist.data.documents.train_document_count`
    says; Megatron caches its sample index under ``cache_dir``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = cfg.path
    if not prefix:
        raise ValueError("data.source megatron needs data.path: the prefix of an indexed dataset (<path>.bin/<path>.idx)")
    for p in index_paths(prefix):
        if not p.exists():
            raise FileNotFoundError(f"data.path {prefix!r}: {p} does not exist (give the prefix, without extension)")
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_len,
        blend=([prefix], None),
        split=megatron_split(cfg.val_fraction),
        path_to_cache=str(cache_dir),
        tokenizer=PretokenizedTokenizer(vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [train_samples, valid_samples if cfg.val_fraction > 0 else 0, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None:
        raise ValueError(f"{prefix}: no training split was built (val_fraction {cfg.val_fraction})")
    return train, valid
