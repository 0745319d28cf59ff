"""Gradient clipping by the global L2 norm (``optim.clip_grad_norm``): the one rule every
lanton_dist optimizer applies inside its step — the single-process references
(:class:`~lanton_dist.lanton.LANTON`, :class:`~lanton_dist.dmuon.DMuon`) and the shared core
of the sharded engine and every adapter (:class:`~lanton_dist.engine.core.ShardedCore`).

With ``max_norm`` c > 0, the step's gradient G (the reduced, data-parallel mean; on an Option II
step the sum of the two half-batch gradients) is multiplied by

    coef = min(1, c / (‖G‖₂ + 1e-6)),       ‖G‖₂ over every parameter of the model,

exactly ``torch.nn.utils.clip_grad_norm_``'s coefficient, before anything reads it (momentum,
AdamW moments, the Option I stored gradient). Option II's difference D = ∇_A − ∇_B is scaled by
the same coef: both half-batch gradients are clipped by the coefficient of their sum, so the
tracker H measures the noise of the gradient the momentum receives — as Option I does, whose
G_t − G_{t−1} compares two clipped gradients. A non-finite ‖G‖ skips the step (the
``skip_nonfinite`` rule). c = 0 turns clipping off (no norm is computed).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_``.
EPS = 1e-6


def check_max_norm(max_norm: float) -> float:
    """``max_norm`` as a float; ``ValueError`` unless it is finite and >= 0 (0: off)."""
    value = float(max_norm)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"clip_grad_norm must be a finite number >= 0 (0: off), got {max_norm!r}")
    return value


def sq_sum(grads: Sequence[torch.Tensor], dtype: torch.dtype, weights: Sequence[float] | None = None) -> torch.Tensor:
    """``Σ_i w_i · Σ g_i²`` over ``grads`` (at least one tensor, all on one device; ``weights``
    default 1: a shard's share in a job-wide sum) as a 0-d ``dtype`` tensor on that device."""
    parts = [g.to(dtype).square().sum() for g in grads]
    if weights is not None:
        parts = [x * w for x, w in zip(parts, weights, strict=True)]
    return torch.stack(parts).sum()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` for the global norm ``norm`` (a 0-d tensor, kept on
    its device: no host read)."""
    return (max_norm / (norm + EPS)).clamp(max=1.0)


def certainly_unclipped(sq: float, max_norm: float) -> bool:
    """Whether ``coef`` is exactly 1 for a gradient of squared norm ``sq`` (read on the host),
    with a margin for the device's rounding of the norm: ``√sq·(1 + 1e-5) + EPS < max_norm``.
    ``max_norm`` 0 (off) is never clipped. Near the threshold it answers False, which only
    costs the caller a recomputation (the sharded core's early Newton–Schulz start)."""
    return max_norm == 0.0 or (math.isfinite(sq) and math.sqrt(sq) * (1 + 1e-5) + EPS < max_norm)
