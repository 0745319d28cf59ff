"""The built-in corpora: ``stdlib`` (the Python standard library's source, byte tokens) and
``synthetic`` (a seeded sparse Markov chain). No downloads.

* ``stdlib`` — the standard library's own ``.py`` files (found with
  ``sysconfig.get_paths()["stdlib"]``; ``site-packages``/``dist-packages`` excluded), read
  in sorted relative-path order until :data:`STDLIB_MAX_BYTES` are collected, as byte
  tokens (vocabulary 256), files joined by :data:`FILE_SEPARATOR`. Every machine with Python
  has it. The train/validation split is *by file*: a file is held out when a CRC32 of its
  relative path falls below ``val_fraction``, so validation text is never seen in training.
  Memoised in-process.
* ``synthetic`` — tokens drawn from a fixed random sparse Markov chain (seeded by
  ``DataConfig.seed``): each token has :data:`SYNTH_BRANCHING` possible successors, so a
  tiny model can drive the loss far below the unigram entropy. For tests.
"""
from __future__ import annotations

import functools
import math
import sysconfig
import zlib
from pathlib import Path

import torch

from lanton_dist.data.dataset import MIX

STDLIB_MAX_BYTES: int = 8 * 2**20  # corpus cap, independent of any config: ~8 MiB loads in < 1 s
EXCLUDED_DIRS: frozenset[str] = frozenset({"site-packages", "dist-packages", "__pycache__"})
FILE_SEPARATOR: bytes = b"\n\n"
SYNTH_TRAIN_TOKENS: int = 1 << 20
SYNTH_VAL_TOKENS: int = 1 << 16
SYNTH_BRANCHING: int = 4


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
    g = torch.Generator().manual_seed((seed * MIX + 7919 * (stream + 1)) % 2**63)
    length = math.ceil(n_tokens / n_chains)
    uniforms = torch.rand(n_chains, length, generator=g)
    out = torch.empty(n_chains, length, dtype=torch.long)
    cur = torch.randint(vocab_size, (n_chains,), generator=g)
    for i in range(length):
        out[:, i] = cur
        choice = (uniforms[:, i : i + 1] >= cum[cur]).sum(-1).clamp_(max=cum.shape[1] - 1)
        cur = successors[cur, choice]
    return out.reshape(-1)[:n_tokens]
