"""Shared cases for the sharded-engine and adapter tests: a tiny LLaMA, fixed global batches,
and the single-process reference run they are all compared with.

Global batch rows are split evenly over ranks (rank r takes rows ``[r·R, (r+1)·R)``); with
Option II each rank's rows are split again into two halves, and the reference's half A is
the concatenation of every rank's first half — the same two half-batches, globally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lanton_dist.config import ModelConfig, OptimConfig
from lanton_dist.factory import build_optimizer
from lanton_dist.model import Transformer

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
GLOBAL_BATCH = 24  # divisible by 1, 2, 3, 4 and, halved, by each of them


def svd_polar(x: torch.Tensor, steps: int = 5, refine_steps: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The exact polar factor U·Vᵀ (fp64 SVD), with Newton–Schulz's signature: tests swap it in for the kernel."""
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u @ vh).to(x.dtype)


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY).to(dtype)


def batches(steps: int, global_batch: int = GLOBAL_BATCH, seq: int = 16, seed: int = 123) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (global_batch, seq + 1), generator=g) for _ in range(steps)]


def loss_fn(model, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    r = x.shape[0] // world
    return x[rank * r : (rank + 1) * r]


def halves(x: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global half-batches A and B: every rank's first / second half of its rows."""
    parts = [rows(x, r, world) for r in range(world)]
    h = parts[0].shape[0] // 2
    return torch.cat([p[:h] for p in parts]), torch.cat([p[h:] for p in parts])


def backward_step(model, opt, x: torch.Tensor) -> None:
    """Gradients of batch ``x`` on ``model``: two weighted half-batch passes when the
    optimizer asks for Option II, else one pass; then ``opt.step()``."""
    if getattr(opt, "needs_two_half_batches", lambda: False)():
        h = x.shape[0] // 2
        (0.5 * loss_fn(model, x[:h])).backward()
        opt.stash_half_gradient()
        (0.5 * loss_fn(model, x[h:])).backward()
    else:
        loss_fn(model, x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def reference_run(cfg: OptimConfig, steps: int, world: int = 1, dtype: torch.dtype = torch.float32,
                  delay: bool = False) -> dict[str, torch.Tensor]:
    """Parameters after ``steps`` single-process steps on the full global batches (Option II
    half-batches arranged as ``world`` ranks would split them)."""
    model = make_model(dtype)
    cfg = OptimConfig(**{**cfg.__dict__, "delay_lr_factor": delay})
    opt = build_optimizer(model, cfg)
    for x in batches(steps):
        a, b = halves(x, world)
        backward_step(model, opt, torch.cat([a, b]))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sharded_run(rank: int, world: int, opt, model, steps: int) -> dict[str, torch.Tensor]:
    """The same run on this rank's rows through ``opt`` (a sharded optimizer)."""
    for x in batches(steps):
        backward_step(model, opt, rows(x, rank, world))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[n].double() - b[n].double()).norm() / b[n].double().norm()).item() for n in b)
