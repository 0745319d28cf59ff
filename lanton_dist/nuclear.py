"""Nuclear-norm estimators ‖D‖_* = Σ σᵢ(D) for whole matrices (the hidden group's dual norm).

=========  ==============================================  ====================================
name       method                                          use
=========  ==============================================  ====================================
exact      ``torch.linalg.svdvals`` in fp32                CPU default, the reference
ns         ⟨D, polar(D)⟩, polar by Newton–Schulz with the  GPU default: ≤ 1e-3 relative error
           Gram-norm start and the Polar Express schedule  at ≤ 1.5× one NS5 call (below)
rsvd       randomized range finder, rank r, q power its    **unusable for full-rank D** (it
                                                           sees the top-r subspace only: −40…
                                                           −98% on full-rank differences); kept
                                                           for rank(D) ≤ r, where it is exact
=========  ==============================================  ====================================

‖D‖_* = ⟨D, polar(D)⟩ exactly, so ``ns``'s error is Σσᵢ(φ(σᵢ) − 1)/Σσᵢ, with φ the scalar map of
the iteration. The default :data:`NS_ESTIMATE` (Gram-norm start ‖(DDᵀ)²‖_F^¼, then Polar Express
steps, :mod:`lanton_dist.newton_schulz`) was chosen from the table of ``launch/bench_ns.py``
(``launch/results/bench_ns.json``): the fewest steps whose worst error over the three test
spectra (Gaussian, decaying logspace(0, −4), rank 16 + noise) at 512×1376 and 1024×2752 stays
≤ 1e-3 in fp32 and in bf16 — see the table quoted in ``tests/test_nuclear.py``. Process-local:
callers pass whole matrices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lanton_dist.names import ESTIMATORS
from lanton_dist.newton_schulz import (
    ESTIMATE_REFINE_STEPS,
    ESTIMATE_STEPS,
    SCHEDULES,
    STARTS,
    newton_schulz,
    newton_schulz_flops,
)

Estimator = Literal["exact", "ns", "rsvd"]


@dataclass(frozen=True)
class NSEstimate:
    """The Newton–Schulz run behind the ``ns`` estimator (``dtype=None``: bf16 on GPU, fp32 on CPU)."""

    steps: int = ESTIMATE_STEPS
    refine_steps: int = ESTIMATE_REFINE_STEPS
    schedule: str = "polar_express"
    start: str = "gram"
    dtype: torch.dtype | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES or self.start not in STARTS:
            raise ValueError(f"schedule must be one of {SCHEDULES} and start one of {STARTS}")
        if self.steps < 1 or self.refine_steps < 0:
            raise ValueError("NSEstimate needs steps >= 1 and refine_steps >= 0")

    def cost(self, m: int, n: int) -> float:
        """FLOPs relative to one plain 5-step Newton–Schulz call (the LMO's) on ``m × n``."""
        return newton_schulz_flops(m, n, self.steps, self.refine_steps) / newton_schulz_flops(m, n)


#: The default ``ns`` estimate (measured choice, module docstring).
NS_ESTIMATE = NSEstimate()


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
    ns: NSEstimate = NS_ESTIMATE,
    refine_steps: int | None = None,
    rank: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Nuclear norm of each matrix of ``d`` (``(..., m, n)`` → ``(...)``, fp32, or fp64 for fp64 input).

    Args:
        estimator: see the module table.
        ns: the ``ns`` estimator's Newton–Schulz run; ``refine_steps`` (if given) replaces its
            cubic step count.
        rank, power_iters, generator: ``rsvd`` parameters (rank is capped at min(m, n)).
    """
    if d.ndim < 2:
        raise ValueError(f"nuclear_norm needs (..., m, n), got {tuple(d.shape)}")
    d32 = d.to(torch.promote_types(d.dtype, torch.float32))
    if estimator == "exact":
        return torch.linalg.svdvals(d32).sum(-1)
    if estimator == "ns":
        polar = newton_schulz(d, ns.steps, ns.refine_steps if refine_steps is None else refine_steps, ns.dtype,
                              schedule=ns.schedule, start=ns.start, symmetric=ns.symmetric)
        return (d32 * polar.to(d32.dtype)).sum(dim=(-2, -1))
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
