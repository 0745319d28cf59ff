"""LANTON's noise tracker and layerwise learning-rate factors (Algorithm 1, steps 4–6).

Per logical layer ℓ: ``H ← β₂·H + (1−β₂)·‖G_t − G̃_t‖_*²`` on estimation steps
(``t mod k == 0``), ``α^ℓ = α/√(α² + H^ℓ)``, and the rate factor
``√(α^ℓ / α^m)`` with m the layer of the same geometry group with the largest α^ℓ
(``ratio_anchor='max'``, the least noisy layer runs at the scheduled rate) or the smallest
(``'min'``) — the anchor is one of the spec's [verify] points, so it is an option. The anchor
runs only over layers with a noise estimate (H updated at least once): H = 0 means "not
measured", so an unestimated layer runs at factor 1 and does not pin its group's anchor.

Two options where the paper is silent (per param group, the same rule on every backend — this
module is the one implementation the reference and the sharded core call, :func:`rate_factors`):

* ``alpha_mode``: ``fixed`` uses the group's configured α; ``auto`` sets each geometry group's
  α once, at the first estimation step where the group has an estimated layer, to the (lower)
  median over the group's estimated layers of √H — the H the factors use, so bias-corrected
  when that is on — and keeps it (state ``alpha_auto``, saved with the optimizer). α then has
  the units of the group's own dual norm (hidden √H ~ 0.1–1, embed_head ~ 1–50 on the demo
  model), and the median layer starts at α^ℓ = 1/√2. A median of 0 (noiseless layers) leaves
  α unset until a later estimate; until it is set the configured α is used.
* ``bias_correction``: the factors read H/(1 − β₂ⁿ), n the layer's own number of estimates
  (a layer that missed estimation steps counts only its own), as Adam corrects its moments;
  the stored H stays the plain EMA.

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


def bias_corrected(h: torch.Tensor, n: torch.Tensor, beta2: torch.Tensor | float) -> torch.Tensor:
    """H/(1 − β₂ⁿ) per layer where n > 0 (n: ``(L,)`` estimates of each layer), else H."""
    corr = 1.0 - torch.as_tensor(beta2, dtype=h.dtype, device=h.device) ** n
    return torch.where(n > 0, h / corr.clamp_min(torch.finfo(h.dtype).tiny), h)


def auto_alpha(h: torch.Tensor, group_ids: torch.Tensor, estimated: torch.Tensor, n_groups: int = N_GROUPS) -> torch.Tensor:
    """``(n_groups,)``: per geometry group, the lower median of √H over its estimated layers;
    NaN for a group without one (or whose median is 0). On ``h``'s device, no host read."""
    groups = torch.arange(n_groups, device=h.device)
    member = (group_ids[None, :] == groups[:, None]) & estimated[None, :]
    roots = torch.where(member, h.clamp_min(0).sqrt()[None, :], torch.full_like(h, float("inf"))[None, :])
    count = member.sum(dim=1)
    med = roots.sort(dim=1).values.gather(1, ((count - 1).clamp_min(0) // 2)[:, None]).squeeze(1)
    return torch.where((count > 0) & (med > 0) & torch.isfinite(med), med, torch.full_like(med, float("nan")))


def rate_factors(h: torch.Tensor, n: torch.Tensor, estimated: torch.Tensor, group_ids: torch.Tensor,
                 alpha: torch.Tensor, beta2: torch.Tensor, alpha_auto: torch.Tensor, *, anchor: str,
                 auto: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 n_groups: int = N_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' rate factors and the groups' auto α after an estimation step (module doc).

    Args:
        h, n, estimated: ``(L,)`` trackers H (plain EMA), estimate counts, estimated mask.
        group_ids: ``(L,)`` geometry-group index. alpha, beta2: ``(L,)`` configured α and β₂.
        alpha_auto: ``(n_groups,)`` auto α so far (NaN: not set yet).
        auto: ``(L,)`` bool, layers whose group uses ``alpha_mode='auto'`` (``None``: none).
        bias: ``(L,)`` bool, layers whose group uses ``bias_correction`` (``None``: none).
    Returns ``(factors (L,), alpha_auto (n_groups,))``.
    """
    used = h if bias is None else torch.where(bias, bias_corrected(h, n, beta2), h)
    alphas = alpha
    if auto is not None:
        alpha_auto = torch.where(torch.isnan(alpha_auto), auto_alpha(used, group_ids, estimated, n_groups), alpha_auto)
        per_layer = alpha_auto[group_ids]
        alphas = torch.where(auto & ~torch.isnan(per_layer), per_layer, alpha)
    return lr_factors(noise_alpha(used, alphas), group_ids, anchor, estimated, n_groups), alpha_auto
