"""Token data for the single-process and distributed trainers: byte-level, no downloads.

Sources (``DataConfig.source``):

* ``stdlib`` — the Python standard library's own ``.py`` files (found with
  ``sysconfig.get_paths()["stdlib"]``; ``site-packages``/``dist-packages`` excluded), read
  in sorted relative-path order until :data:`STDLIB_MAX_BYTES` are collected, as byte
  tokens (vocabulary 256). Every machine with Python has it. The train/validation split is
  *by file*: a file is held out when a CRC32 of its relative path falls below
  ``val_fraction``, so validation text is never seen in training.
* ``synthetic`` — tokens drawn from a fixed random sparse Markov chain (seeded by
  ``DataConfig.seed``): each token has :data:`SYNTH_BRANCHING` possible successors, so a
  tiny model can drive the loss far below the unigram entropy. For tests.
* ``megatron`` — not handled here (Megatron runs read their own indexed datasets).

Batches are deterministic functions of ``(seed, split, step)``: :meth:`TokenDataset.get_batch`
draws the *global* batch's window start positions with a ``torch.Generator`` seeded from
those three numbers and returns the rows ``[rank·b, (rank+1)·b)`` of it (``b =
global_batch / world``), so concatenating the ranks' rows gives the same global batch for any
world size. Nothing is cached on disk; the stdlib corpus is memoised in-process.
"""
from __future__ import annotations

import functools
import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lanton_dist.config import DataConfig

SOURCES: tuple[str, ...] = ("stdlib", "synthetic")
STDLIB_MAX_BYTES: int = 8 * 2**20  # corpus cap, independent of any config: ~8 MiB loads in < 1 s
EXCLUDED_DIRS: frozenset[str] = frozenset({"site-packages", "dist-packages", "__pycache__"})
FILE_SEPARATOR: bytes = b"\n\n"
SYNTH_TRAIN_TOKENS: int = 1 << 20
SYNTH_VAL_TOKENS: int = 1 << 16
SYNTH_BRANCHING: int = 4
SPLITS: dict[str, int] = {"train": 0, "val": 1}
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for seed mixing


# ---------------------------------------------------------------------------- corpora
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Every ``.py`` file under the stdlib directory (or ``root``), sorted by relative path."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"Python standard library directory not found: {base}")
    files = [f for f in base.rglob("*.py") if f.is_file() and not EXCLUDED_DIRS & set(f.relative_to(base).parts)]
    return sorted(files, key=lambda f: f.relative_to(base).as_posix())


def is_val_file(rel_path: str, val_fraction: float) -> bool:
    """Whether the file at ``rel_path`` (posix, relative to the stdlib root) is held out."""
    return zlib.crc32(rel_path.encode()) / 2**32 < val_fraction


@functools.lru_cache(maxsize=4)
def _stdlib_corpus(root: str, max_bytes: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple[str, ...]]:
    base = Path(root)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    train_names: list[str] = []
    val_names: list[str] = []
    total = 0
    for f in stdlib_files(base):
        if total >= max_bytes:
            break
        data = f.read_bytes()
        if not data:
            continue
        total += len(data)
        rel = f.relative_to(base).as_posix()
        if is_val_file(rel, val_fraction):
            val_parts.append(data)
            val_names.append(rel)
        else:
            train_parts.append(data)
            train_names.append(rel)
    if not train_parts or not val_parts:
        raise ValueError(
            f"stdlib corpus at {base} split into {len(train_parts)} train and {len(val_parts)} validation files "
            f"with val_fraction={val_fraction}: both must be non-empty"
        )

    def to_tokens(parts: list[bytes]) -> torch.Tensor:
        buf = bytearray(FILE_SEPARATOR.join(parts))
        return torch.frombuffer(buf, dtype=torch.uint8).clone()

    return to_tokens(train_parts), to_tokens(val_parts), tuple(train_names), tuple(val_names)


def markov_chain(vocab_size: int, seed: int, branching: int = SYNTH_BRANCHING) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random sparse chain: ``(successors, probs)``, each ``(vocab_size, branching)``."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)])
    logits = torch.randn(vocab_size, branching, generator=g) * 1.5
    return successors, torch.softmax(logits, dim=-1)


def synthetic_tokens(n_tokens: int, vocab_size: int, seed: int, stream: int, n_chains: int = 4096) -> torch.Tensor:
    """``(n_tokens,)`` int64 tokens of the chain of ``seed``: ``n_chains`` walks concatenated.

    ``stream`` selects independent walks (0 train, 1 validation) of the same chain.
    """
    successors, probs = markov_chain(vocab_size, seed)
    cum = probs.cumsum(-1)
    cum[:, -1] = 1.0
    g = torch.Generator().manual_seed((seed * _MIX + 7919 * (stream + 1)) % 2**63)
    length = math.ceil(n_tokens / n_chains)
    uniforms = torch.rand(n_chains, length, generator=g)
    out = torch.empty(n_chains, length, dtype=torch.long)
    cur = torch.randint(vocab_size, (n_chains,), generator=g)
    for i in range(length):
        out[:, i] = cur
        choice = (uniforms[:, i : i + 1] >= cum[cur]).sum(-1).clamp_(max=cum.shape[1] - 1)
        cur = successors[cur, choice]
    return out.reshape(-1)[:n_tokens]


# ---------------------------------------------------------------------------- dataset
@dataclass
class TokenDataset:
    """Train and validation token streams (``(N,)`` integer tensors) plus window sampling.

    ``get_batch`` returns ``(x, y)``, both ``(global_batch // world, seq_len)`` int64, with
    ``y`` the next-token targets of ``x``.
    """

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    seed: int
    vocab_size: int
    source: str
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, t in (("train", self.train), ("validation", self.val)):
            if t.ndim != 1 or t.numel() < self.seq_len + 2:
                raise ValueError(f"{self.source} {name} split has {t.numel()} tokens; need more than seq_len+1 = {self.seq_len + 1}")

    def tokens(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
        return self.train if split == "train" else self.val

    def batch_generator(self, step: int, split: str) -> torch.Generator:
        """The generator that draws the global batch of ``(split, step)``."""
        return torch.Generator().manual_seed((self.seed * _MIX + 2 * step + SPLITS[split]) % 2**63)

    def global_starts(self, step: int, global_batch: int, split: str = "train") -> torch.Tensor:
        """``(global_batch,)`` window start offsets of the global batch of ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        n_starts = self.tokens(split).numel() - self.seq_len  # windows of seq_len + 1 tokens
        return torch.randint(n_starts, (global_batch,), generator=self.batch_generator(step, split))

    def get_batch(self, step: int, global_batch: int, rank: int = 0, world: int = 1, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
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


def build_dataset(cfg: DataConfig, vocab_size: int) -> TokenDataset:
    """The dataset of ``cfg.source`` for a model with ``vocab_size`` tokens."""
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.source == "megatron":
        raise ValueError(
            "data.source 'megatron' is read by the Megatron integration, not by lanton_dist.data; "
            f"this trainer supports {SOURCES}"
        )
    if cfg.source == "stdlib":
        if vocab_size < 256:
            raise ValueError(f"stdlib data is byte-level (256 tokens); model.vocab_size is {vocab_size}")
        root = sysconfig.get_paths()["stdlib"]
        train, val, tn, vn = _stdlib_corpus(root, STDLIB_MAX_BYTES, float(cfg.val_fraction))
        return TokenDataset(train, val, cfg.seq_len, cfg.seed, 256, "stdlib", tn, vn)
    if cfg.source == "synthetic":
        if vocab_size < SYNTH_BRANCHING:
            raise ValueError(f"synthetic data needs vocab_size >= {SYNTH_BRANCHING}, got {vocab_size}")
        train = synthetic_tokens(SYNTH_TRAIN_TOKENS, vocab_size, cfg.seed, 0)
        val = synthetic_tokens(SYNTH_VAL_TOKENS, vocab_size, cfg.seed, 1)
        return TokenDataset(train, val, cfg.seq_len, cfg.seed, vocab_size, "synthetic")
    raise ValueError(f"unknown data.source {cfg.source!r}; choose one of {SOURCES} (megatron: Megatron runs only)")


def unigram_baseline(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int = 256) -> float:
    """Cross-entropy (nats/token) of ``val_tokens`` under the add-one-smoothed unigram
    distribution of ``train_tokens`` (both ``(N,)`` integer tensors with values < ``vocab_size``)."""
    if train_tokens.numel() == 0 or val_tokens.numel() == 0:
        raise ValueError("unigram_baseline needs non-empty train and validation tokens")
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    if counts.numel() > vocab_size:
        raise ValueError(f"train tokens exceed vocab_size {vocab_size}")
    logp = torch.log(counts / counts.sum())
    val_counts = torch.bincount(val_tokens.long(), minlength=vocab_size).double()
    if val_counts.numel() > vocab_size:
        raise ValueError(f"validation tokens exceed vocab_size {vocab_size}")
    return float(-(val_counts * logp).sum() / val_counts.sum())
