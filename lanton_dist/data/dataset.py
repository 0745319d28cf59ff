"""Train/validation token streams and their deterministic, world-size-independent batches.

Batches are deterministic functions of ``(seed, split, step)``: :meth:`TokenDataset.get_batch`
draws the *global* batch's window start positions with a ``torch.Generator`` seeded from
those three numbers and returns the rows ``[rank·b, (rank+1)·b)`` of it (``b =
global_batch / world``), so concatenating the ranks' rows gives the same global batch for any
world size (the Megatron backend feeds each data-parallel replica's rows to its pipeline schedule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lanton_dist.data.errors import DataError

SPLITS: dict[str, int] = {"train": 0, "val": 1}
MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for seed mixing
_BINCOUNT_CHUNK = 1 << 24  # tokens per bincount in unigram_baseline (bounds its int64 copy)


@dataclass
class TokenDataset:
    """Train and validation token streams (``(N,)`` integer CPU tensors, possibly memory-mapped)
    plus window sampling.

    ``get_batch`` returns ``(x, y)``, both ``(global_batch // world, seq_len)`` int64, with
    ``y`` the next-token targets of ``x``. ``train_files``/``val_files`` name the held-out
    units where the source has names (stdlib files).
    """

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    seed: int
    vocab_size: int
    source: str
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    val_seed: int | None = None  # the validation windows' seed (None: ``seed``)

    def __post_init__(self) -> None:
        for name, t in (("train", self.train), ("validation", self.val)):
            if t.ndim != 1 or t.numel() < self.seq_len + 2:
                raise DataError(f"{self.source} {name} split has {t.numel()} tokens; need more than data.seq_len+1 = "
                                f"{self.seq_len + 1} (add data or lower data.seq_len)")

    def tokens(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
        return self.train if split == "train" else self.val

    def batch_generator(self, step: int, split: str) -> torch.Generator:
        """The generator that draws the global batch of ``(split, step)``."""
        seed = self.seed if split == "train" or self.val_seed is None else self.val_seed
        return torch.Generator().manual_seed((seed * MIX + 2 * step + SPLITS[split]) % 2**63)

    def global_starts(self, step: int, global_batch: int, split: str = "train") -> torch.Tensor:
        """``(global_batch,)`` window start offsets of the global batch of ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        n_starts = self.tokens(split).numel() - self.seq_len  # windows of seq_len + 1 tokens
        return torch.randint(n_starts, (global_batch,), generator=self.batch_generator(step, split))

    def get_batch(
        self, step: int, global_batch: int, rank: int = 0, world: int = 1, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of ``step``: ``x, y`` of shape ``(global_batch // world, seq_len)``.

        The global batch depends only on ``(seed, split, step, global_batch)``; rank ``r``
        gets rows ``[r·b, (r+1)·b)``, ``b = global_batch // world``.
        """
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if global_batch % world:
            raise ValueError(f"global_batch {global_batch} is not divisible by world size {world}")
        b = global_batch // world
        starts = self.global_starts(step, global_batch, split)[rank * b : (rank + 1) * b]
        data = self.tokens(split)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        win = data[idx].long()
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def unigram_baseline(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int = 256) -> float:
    """Cross-entropy (nats/token) of ``val_tokens`` under the add-one-smoothed unigram
    distribution of ``train_tokens`` (both ``(N,)`` integer tensors with values < ``vocab_size``;
    counted in chunks, so a memory-mapped stream is never copied whole)."""
    if train_tokens.numel() == 0 or val_tokens.numel() == 0:
        raise ValueError("unigram_baseline needs non-empty train and validation tokens")
    counts = _counts(train_tokens, vocab_size, "train") + 1.0
    logp = torch.log(counts / counts.sum())
    val_counts = _counts(val_tokens, vocab_size, "validation")
    return float(-(val_counts * logp).sum() / val_counts.sum())


def _counts(tokens: torch.Tensor, vocab_size: int, name: str) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for chunk in tokens.split(_BINCOUNT_CHUNK):
        c = torch.bincount(chunk.long(), minlength=vocab_size)
        if c.numel() > vocab_size:
            raise ValueError(f"{name} tokens exceed vocab_size {vocab_size}")
        counts += c
    return counts
