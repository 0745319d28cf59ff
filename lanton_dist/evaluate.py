"""Evaluation of a checkpoint on any data, without training (``lanton-dist eval``).

:func:`evaluate_checkpoint` reads the model of a checkpoint
(:func:`lanton_dist.checkpoint_weights.read_checkpoint_model`: backends ``none``, ``ddp``,
``zero``, ``fsdp2``), builds the data of the given run config (``data.*``: any source, e.g.
another text file or indexed dataset, with its own ``val_fraction``) and computes the mean
next-token cross-entropy over *every* token of one split (``val`` or ``train``): the split is
cut into consecutive, non-overlapping windows of ``data.seq_len + 1`` tokens (stride
``seq_len``; the tail shorter than a window is left out), each predicting its last ``seq_len``
tokens, in batches of ``batch_size`` windows (``max_batches`` > 0 stops early). The result is
deterministic (no sampling) and the same for any batch size.

The model's shape always comes from the checkpoint (its ``loop.json``); the config's ``model``
section is not used. ``train.device`` and ``train.dtype`` (bf16 autocast on CUDA) apply.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lanton_dist.backends import autocast, resolve_device
from lanton_dist.checkpoint_weights import read_checkpoint_model
from lanton_dist.config import RunConfig, check_run_config
from lanton_dist.data import build_dataset
from lanton_dist.model import Transformer


@dataclass
class EvalResult:
    """Mean loss (nats/token) over ``tokens`` predicted tokens, its perplexity, and what was evaluated."""

    loss: float
    perplexity: float
    tokens: int
    windows: int
    checkpoint: str
    step: int
    source: str
    path: str
    split: str
    seq_len: int

    def line(self) -> str:
        data = f"{self.source} {self.path}".strip()
        return (f"eval {self.checkpoint} (step {self.step}) on {data} [{self.split}]: loss {self.loss:.4f} | "
                f"perplexity {self.perplexity:.3f} | tokens {self.tokens:,}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(n, seq_len + 1)`` consecutive windows of ``tokens`` ``(N,)`` with stride ``seq_len`` (a view, ``tokens``' dtype)."""
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"the split has {tokens.numel()} tokens: fewer than one window of data.seq_len + 1 = {seq_len + 1}")
    return tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # a view: a memory-mapped split is not copied


@torch.no_grad()
def evaluate_checkpoint(cfg: RunConfig, checkpoint: str | Path, *, split: str = "val", batch_size: int = 0,
                        max_batches: int = 0, say: Callable[[str], None] = print) -> EvalResult:
    """Loss of the checkpoint ``checkpoint`` names on ``split`` of ``cfg.data`` (module doc);
    ``batch_size`` 0: ``train.global_batch`` windows per batch. ``say`` gets a note when
    ``cfg.model`` differs from the checkpoint's (which is used)."""
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    if batch_size < 0 or max_batches < 0:
        raise ValueError(f"batch size and max batches must be >= 0, got {batch_size} and {max_batches}")
    ckpt = read_checkpoint_model(checkpoint)
    if cfg.model != ckpt.model:
        differ = [f.name for f in fields(ckpt.model) if getattr(cfg.model, f.name) != getattr(ckpt.model, f.name)]
        say(f"note: the model is the checkpoint's; the config's model.{', model.'.join(differ)} differ and are not used")
    cfg = replace(cfg, model=ckpt.model, parallel=replace(cfg.parallel, backend="none"))
    check_run_config(cfg)
    device = resolve_device(cfg.train.device)
    model = Transformer(ckpt.model)
    model.load_state_dict(ckpt.state_dict)
    model.to(device).eval()
    data = build_dataset(cfg.data, ckpt.model.vocab_size)
    win = windows(data.tokens(split), cfg.data.seq_len)
    per_batch = batch_size or cfg.train.global_batch
    starts = range(0, win.shape[0], per_batch)
    if max_batches:
        starts = starts[:max_batches]
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for s in starts:
        rows = win[s: s + per_batch].long().to(device)
        with autocast(device, cfg.train.dtype):
            logits = model(rows[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").double()
        count += rows.shape[0]
    loss = float(total) / (count * cfg.data.seq_len)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count * cfg.data.seq_len, windows=count,
                      checkpoint=str(ckpt.path), step=ckpt.step, source=cfg.data.source, path=cfg.data.path, split=split,
                      seq_len=cfg.data.seq_len)
