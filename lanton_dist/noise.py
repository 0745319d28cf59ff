"""LANTON's noise tracker and layerwise learning-rate factors (Algorithm 1, steps 4–6).

Per logical layer ℓ: ``H ← β₂·H + (1−β₂)·‖G_t − G̃_t‖_*²`` on estimation steps
(``t mod k == 0``), ``α^ℓ = α/√(α² + H^ℓ)``, and the rate factor
``√(α^ℓ / α^m)`` with m the layer of the same geometry group with the largest α^ℓ
(``ratio_anchor='max'``, the least noisy layer runs at the scheduled rate) or the smallest
(``'min'``) — the anchor is one of the spec's [verify] points, so it is an option. The anchor
runs only over layers with a noise estimate (H updated at least once): H = 0 means "not
measured", so an unestimated layer runs at factor 1 and does not pin its group's anchor.

Step numbering starts at t = 1. Option I compares with the previous step's gradient, so it
keeps G_t only when t+1 is an estimation step; at t = 1 with k = 1 there is no previous
gradient and H is left unchanged; likewise a parameter that had no gradient at t−1 (never
compare with an older gradient). Pure tensor math, no host syncs: callers supply whole-model
vectors.
"""
from __future__ import annotations

import torch

from lanton_dist.groups import Geometry

ANCHORS = ("max", "min")
GEOMETRY_INDEX = {Geometry.HIDDEN: 0, Geometry.EMBED_HEAD: 1, Geometry.VECTOR: 2}  # group id of a layer
N_GROUPS = len(GEOMETRY_INDEX)


def is_estimation_step(t: int, k: int) -> bool:
    return t % k == 0


def keeps_previous_gradient(t: int, k: int) -> bool:
    """Option I: store G_t at step t iff step t+1 estimates."""
    return (t + 1) % k == 0


def update_tracker(h: torch.Tensor, sq_dual: torch.Tensor, beta2: float) -> torch.Tensor:
    """``β₂·H + (1−β₂)·sq_dual`` (fp32, same shape as ``h``)."""
    return h * beta2 + sq_dual.to(h.dtype) * (1.0 - beta2)


def noise_alpha(h: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """α^ℓ = α/√(α² + H^ℓ); equals 1 where H = 0. ``alpha``: a number, or a tensor broadcast
    against ``h`` on its device (a number stays a kernel argument: no host→device copy)."""
    return alpha / torch.sqrt(alpha * alpha + h)


def lr_factors(alphas: torch.Tensor, group_ids: torch.Tensor, anchor: str = "max",
               estimated: torch.Tensor | None = None, n_groups: int = N_GROUPS) -> torch.Tensor:
    """√(α^ℓ / α^m) per layer, m the max-α (or min-α) estimated layer of ℓ's group; 1 for
    layers without an estimate (and for every layer of a group without one).

    Args:
        alphas: ``(L,)`` α^ℓ of every layer in the whole model.
        group_ids: ``(L,)`` int64 geometry-group index of each layer, in ``[0, n_groups)``.
        estimated: ``(L,)`` bool, layers whose H was updated at least once (``None``: all).
        n_groups: number of geometry groups (a constant, so no host sync is needed).
    """
    if anchor not in ANCHORS:
        raise ValueError(f"ratio_anchor must be one of {ANCHORS}, got {anchor!r}")
    fill = float("-inf") if anchor == "max" else float("inf")
    src = alphas if estimated is None else torch.where(estimated, alphas, torch.full_like(alphas, fill))
    ref = torch.full((n_groups,), fill, dtype=alphas.dtype, device=alphas.device)
    ref = ref.scatter_reduce(0, group_ids, src, reduce="amax" if anchor == "max" else "amin")
    factors = torch.sqrt(alphas / ref[group_ids])
    return factors if estimated is None else torch.where(estimated, factors, torch.ones_like(factors))
