"""Newton–Schulz polar factor: the whole-matrix kernel of the hidden-group LMO.

polar(X) = U Vᵀ for X = U Σ Vᵀ. Muon's quintic iteration (Keller Jordan) drives the
singular values of X/‖X‖_F into roughly [0.7, 1.2] in 5 steps; ``refine_steps`` cubic
steps ``X ← 1.5X − 0.5(XXᵀ)X`` afterwards drive them to 1 (the accurate polar used by
the nuclear-norm estimator, see :mod:`lanton_dist.nuclear`).

Everything here is process-local: callers hand in whole matrices.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the FLOP count and constants are torch-free
    import torch

QUINTIC_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
DEFAULT_STEPS = 5
_EPS = 1e-7


def default_ns_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 on GPU (tensor-core rate); on CPU fp32, or fp64 for fp64 input (CPU bf16 is slow and inexact)."""
    import torch

    if x.device.type == "cuda":
        return torch.bfloat16
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def newton_schulz(
    x: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    refine_steps: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor of each matrix in ``x``.

    Args:
        x: ``(..., m, n)``; leading dimensions are a batch of same-shape matrices.
        steps: quintic steps (coefficients :data:`QUINTIC_COEFFS`).
        refine_steps: cubic steps after the quintic ones (0 for the Muon/Scion update).
        dtype: compute dtype; default :func:`default_ns_dtype` of ``x``.

    Returns:
        ``(..., m, n)`` in ``x.dtype``. The iteration runs on the wide orientation
        (a contiguous transpose when ``m > n``) so the Gram matrix is ``min(m,n)²``.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs (..., m, n) matrices, got shape {tuple(x.shape)}")
    if steps < 0 or refine_steps < 0:
        raise ValueError("steps and refine_steps must be >= 0")
    out_dtype = x.dtype
    dtype = dtype or default_ns_dtype(x)
    tall = x.size(-2) > x.size(-1)
    X = x.mT.contiguous() if tall else x
    X = X.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + _EPS)
    a, b, c = QUINTIC_COEFFS
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    for _ in range(refine_steps):
        A = X @ X.mT
        X = 1.5 * X - 0.5 * (A @ X)
    if tall:
        X = X.mT
    return X.to(out_dtype).contiguous()


def newton_schulz_flops(m: int, n: int, steps: int = DEFAULT_STEPS, refine_steps: int = 0) -> int:
    """Multiply-add FLOPs (2 per MAC) of :func:`newton_schulz` on one ``m × n`` matrix.

    With s = min(m, n), l = max(m, n): a quintic step is X Xᵀ (2s²l), A·A (2s³) and B·X
    (2s²l); a cubic step is X Xᵀ and A·X (4s²l). This is the cost the ownership plan balances.
    """
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s**3) + refine_steps * 4 * s * s * l
