"""Ownership plan: each whole hidden matrix is assigned to one rank, balancing Newton–Schulz FLOPs.

Longest-processing-time greedy on the per-parameter NS cost (sum over its logical blocks of
:func:`~lanton_dist.newton_schulz.newton_schulz_flops`), not on numel: a 4096×11008 matrix
costs ~2.7× a 4096×4096 one in FLOPs but 2.7× in bytes only by coincidence of shape.
Deterministic from names and shapes alone, so every rank computes the same plan with no
communication. Ties go to the rank with fewer owned bytes, then the lowest rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.newton_schulz import DEFAULT_STEPS, newton_schulz_flops


def ns_cost(spec: ParamSpec, ns_steps: int = DEFAULT_STEPS) -> int:
    """NS FLOPs of one step of ``spec`` (0 for non-hidden parameters)."""
    if spec.geometry is not Geometry.HIDDEN:
        return 0
    return sum(newton_schulz_flops(b.d_out, spec.d_in, ns_steps) for b in spec.blocks)


@dataclass(frozen=True)
class OwnershipPlan:
    """``owner[name]`` for every hidden parameter; per-rank NS FLOPs and owned element counts."""

    world: int
    owner: dict[str, int]
    flops: tuple[int, ...]
    numel: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """max/mean of per-rank NS FLOPs (1.0 is perfect balance)."""
        mean = sum(self.flops) / self.world
        return max(self.flops) / mean if mean else 1.0

    def owned(self, rank: int) -> list[str]:
        return [n for n, r in self.owner.items() if r == rank]


def plan_ownership(specs: list[ParamSpec], world: int, ns_steps: int = DEFAULT_STEPS) -> OwnershipPlan:
    """LPT assignment of the hidden parameters in ``specs`` to ``world`` ranks."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    hidden = [s for s in specs if s.geometry is Geometry.HIDDEN]
    order = sorted(hidden, key=lambda s: (-ns_cost(s, ns_steps), -s.numel, s.name))
    flops, numel = [0] * world, [0] * world
    owner: dict[str, int] = {}
    for s in order:
        r = min(range(world), key=lambda i: (flops[i], numel[i], i))
        owner[s.name] = r
        flops[r] += ns_cost(s, ns_steps)
        numel[r] += s.numel
    return OwnershipPlan(world, owner, tuple(flops), tuple(numel))
