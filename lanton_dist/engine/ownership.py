"""Ownership plan: each whole hidden matrix is assigned to one rank, balancing Newton–Schulz FLOPs
while keeping every rank's owned elements near its equal share.

Longest-processing-time greedy on the per-parameter NS cost (sum over its logical blocks of
:func:`~lanton_dist.newton_schulz.newton_schulz_flops`), not on numel: a 4096×11008 matrix
costs ~2.7× a 4096×4096 one in FLOPs but 2.7× in bytes only by coincidence of shape.

The owner of a matrix also holds it whole in its chunk of the bucket layout
(:mod:`lanton_dist.engine.layout`), keeps its optimizer state and receives its reduced gradient.
FLOP balance alone can leave one rank with far more *elements* than its share (TP shards of
different aspect ratios) — more memory and fewer bytes sent than the others — so ranks get an
element cap ``C = ⌈Σ numel / world⌉ + k·⌈largest/CAP_STEPS⌉`` (Σ over *all* parameters: the
elementwise ones balance the rest), tried for k = 0, 1, 2, …: first the FLOP greedy (each
matrix, by decreasing NS cost, to the least-loaded rank that stays within C), then, if some
matrix fits nowhere, element best-fit-decreasing (each matrix, by decreasing size, to the
fullest rank that stays within C); the first pass that places every matrix within C is the
plan. So holdings are (near) as even as whole matrices allow, and NS FLOPs are balanced as
well as that permits — whole-matrix ownership cannot balance both at scale (13B on 64 ranks:
even holdings need ranks of three FFN matrices next to ranks of attention matrices only); the
engine splits large matrices' Newton–Schulz over a team of ranks for that
(:mod:`lanton_dist.plan.splitns`). The loop ends by ``C = share + largest matrix``, where the
FLOP greedy always fits (some rank is below the share while matrices remain).
Deterministic from names and shapes alone, so every rank computes the same plan with no
communication. Ties go to the rank with fewer owned elements, then the lowest rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.newton_schulz import DEFAULT_STEPS, newton_schulz_flops

#: The element cap per rank grows from the equal share in steps of (largest matrix)/CAP_STEPS (module doc).
CAP_STEPS = 200


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


def plan_ownership(specs: list[ParamSpec], world: int, ns_steps: int = DEFAULT_STEPS, *,
                   balance_numel: bool = True) -> OwnershipPlan:
    """Assignment of the hidden parameters in ``specs`` to ``world`` ranks (module doc).

    ``balance_numel=False``: pure NS-FLOP balance (for NS work that is not tied to a layout,
    e.g. the TP sub-plans of the planner's Megatron model).
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    hidden = [s for s in specs if s.geometry is Geometry.HIDDEN]
    if not balance_numel or not hidden:
        return _greedy(hidden, world, ns_steps, math.inf, by_flops=True)
    share = math.ceil(sum(s.numel for s in specs) / world)
    largest = max(s.numel for s in hidden)
    step = max(1, -(-largest // CAP_STEPS))
    k = 0
    while True:
        room = share + k * step
        for by_flops in (True, False):
            plan = _greedy(hidden, world, ns_steps, room, by_flops)
            if max(plan.numel) <= room:
                return plan
        if room >= share + largest:      # the FLOP greedy always fits here (module doc)
            raise AssertionError("unreachable: a rank below its share always has room for one more matrix")
        k += 1


def _greedy(hidden: list[ParamSpec], world: int, ns_steps: int, room: float, by_flops: bool) -> OwnershipPlan:
    """One greedy pass with at most ``room`` owned elements per rank. ``by_flops``: NS-cost order,
    least-loaded fitting rank (LPT); else element order, fullest fitting rank (best fit).
    A matrix that fits nowhere goes to the rank with the fewest elements."""
    cost = {s.name: ns_cost(s, ns_steps) for s in hidden}
    if by_flops:
        order = sorted(hidden, key=lambda s: (-cost[s.name], -s.numel, s.name))
    else:
        order = sorted(hidden, key=lambda s: (-s.numel, -cost[s.name], s.name))
    flops, numel = [0] * world, [0] * world
    owner: dict[str, int] = {}
    for s in order:
        fits = [i for i in range(world) if numel[i] + s.numel <= room]
        if not fits:
            r = min(range(world), key=lambda i: (numel[i], flops[i], i))
        elif by_flops:
            r = min(fits, key=lambda i: (flops[i], numel[i], i))
        else:
            r = min(fits, key=lambda i: (-numel[i], flops[i], i))
        owner[s.name] = r
        flops[r] += cost[s.name]
        numel[r] += s.numel
    return OwnershipPlan(world, owner, tuple(flops), tuple(numel))
