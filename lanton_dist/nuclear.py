"""Nuclear-norm estimators ‖D‖_* = Σ σᵢ(D) for whole matrices (the hidden group's dual norm).

=========  ==============================================  =============================
name       method                                          use
=========  ==============================================  =============================
exact      ``torch.linalg.svdvals`` in fp32                CPU default, test reference
ns         ⟨D, polar(D)⟩, polar = NS5 + ``refine`` cubic   GPU default (≈1.5 NS calls)
rsvd       randomized range finder, rank r, q power its    low-rank differences only
=========  ==============================================  =============================

‖D‖_* = ⟨D, polar(D)⟩ exactly, so ``ns``'s error is the Newton–Schulz error: the plain
quintic leaves singular values in ≈[0.7, 1.2] (9–20% low); cubic refinement removes it
(errors measured in ``tests/test_nuclear.py``). ``rsvd`` sees only the top-r subspace and
is biased low on full-rank inputs. Process-local: callers pass whole matrices.
"""
from __future__ import annotations

from typing import Literal

import torch

from lanton_dist.newton_schulz import newton_schulz

Estimator = Literal["exact", "ns", "rsvd"]
ESTIMATORS: tuple[str, ...] = ("exact", "ns", "rsvd")


def resolve_estimator(name: str, device: torch.device) -> Estimator:
    """``auto`` → ``exact`` on CPU, ``ns`` on GPU (exact costs ~100× an NS call there)."""
    if name == "auto":
        return "ns" if device.type == "cuda" else "exact"
    if name not in ESTIMATORS:
        raise ValueError(f"unknown nuclear_estimator {name!r}; choose auto, {', '.join(ESTIMATORS)}")
    return name  # type: ignore[return-value]


def nuclear_norm(
    d: torch.Tensor,
    estimator: Estimator = "exact",
    *,
    refine_steps: int | None = None,
    rank: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Nuclear norm of each matrix of ``d`` (``(..., m, n)`` → ``(...)``, fp32, or fp64 for fp64 input).

    Args:
        estimator: see the module table.
        refine_steps: cubic steps for ``ns``; default 3 in bf16 (GPU) and 6 in fp32 (CPU).
        rank, power_iters, generator: ``rsvd`` parameters (rank is capped at min(m, n)).
    """
    if d.ndim < 2:
        raise ValueError(f"nuclear_norm needs (..., m, n), got {tuple(d.shape)}")
    d32 = d.to(torch.promote_types(d.dtype, torch.float32))
    if estimator == "exact":
        return torch.linalg.svdvals(d32).sum(-1)
    if estimator == "ns":
        if refine_steps is None:
            refine_steps = 3 if d.device.type == "cuda" else 6
        polar = newton_schulz(d, refine_steps=refine_steps).to(d32.dtype)
        return (d32 * polar).sum(dim=(-2, -1))
    if estimator == "rsvd":
        m, n = d.shape[-2:]
        r = min(rank, m, n)
        omega = torch.randn(*d.shape[:-2], n, r, device=d.device, dtype=d32.dtype, generator=generator)
        y = d32 @ omega
        for _ in range(power_iters):
            q, _ = torch.linalg.qr(y)
            y = d32 @ (d32.mT @ q)
        q, _ = torch.linalg.qr(y)
        return torch.linalg.svdvals(q.mT @ d32).sum(-1)
    raise ValueError(f"unknown nuclear estimator {estimator!r}")
