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
elementwise ones balance the rest), tried for k = k₀, k₀ + 1, …: first the FLOP greedy (each
matrix, by decreasing NS cost, to the least-loaded rank that stays within C), then, if some
matrix fits nowhere, element best-fit-decreasing (each matrix, by decreasing size, to the
fullest rank that stays within C); the first pass that places every matrix within C is the
plan. ``k₀`` is the first k with ``C ≥ largest`` (no pass below it can place the largest
matrix within C, so skipping them changes nothing). So holdings are (near) as even as whole
matrices allow, and NS FLOPs are balanced as well as that permits — whole-matrix ownership
cannot balance both at scale (13B on 64 ranks: even holdings need ranks of three FFN matrices
next to ranks of attention matrices only; 7B on 1,024 ranks has 224 matrices, so 800 ranks own
none); the engine splits large matrices' Newton–Schulz over a team of ranks for that
(:mod:`lanton_dist.engine.split_plan`, ``optim.ns_split_tolerance``). The loop ends by
``C = share + largest matrix``, where the FLOP greedy always fits (some rank is below the share
while matrices remain). Deterministic from names and shapes alone, so every rank computes the
same plan with no communication. Ties go to the rank with fewer owned elements, then the lowest
rank.

Cost. A pass keeps, per distinct matrix size, a heap of the ranks that still fit one more
matrix of that size (the FLOP greedy; a rank leaves it for good once it is too full, holdings
only grow), and the ranks sorted by holdings (best fit: a bisection finds the fullest fitting
rank). So a pass costs ``O((n + W)·D·log W)`` for ``n`` matrices of ``D`` distinct sizes on ``W``
ranks, not ``O(n·W)``; the plan records its passes and rank choices (heap pops and pushes,
bisections: :attr:`OwnershipPlan.choices`), the work bound ``tests/test_ownership_scale.py``
checks. 70B on 1,024 ranks plans in well under a second (docs/planning.md).

One computation per process: plans are cached by (specs in any order, world, steps, mode), so the engine, its
adapters and the planner asking for the same model on the same world share one computation
(each caller gets its own copy of the ``owner`` dict).
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

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
    """``owner[name]`` for every hidden parameter; per-rank NS FLOPs and owned element counts;
    ``passes`` and ``choices``: the work that computed it (module doc, "Cost"; 0 when built by hand)."""

    world: int
    owner: dict[str, int]
    flops: tuple[int, ...]
    numel: tuple[int, ...]
    passes: int = field(default=0, compare=False)
    choices: int = field(default=0, compare=False)

    @property
    def imbalance(self) -> float:
        """max/mean of per-rank NS FLOPs (1.0 is perfect balance)."""
        mean = sum(self.flops) / self.world
        return max(self.flops) / mean if mean else 1.0

    def owned(self, rank: int) -> list[str]:
        return [n for n, r in self.owner.items() if r == rank]


def plan_ownership(specs: list[ParamSpec], world: int, ns_steps: int = DEFAULT_STEPS, *,
                   balance_numel: bool = True) -> OwnershipPlan:
    """Assignment of the hidden parameters in ``specs`` to ``world`` ranks (module doc); the same
    object for the same arguments within a process.

    ``balance_numel=False``: pure NS-FLOP balance (for NS work that is not tied to a layout,
    e.g. the TP sub-plans of the planner's Megatron model).
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    plan = _cached_plan(tuple(sorted(specs, key=lambda s: s.name)), world, ns_steps, balance_numel)   # any order: one plan
    return replace(plan, owner=dict(plan.owner))


@lru_cache(maxsize=32)
def _cached_plan(specs: tuple[ParamSpec, ...], world: int, ns_steps: int, balance_numel: bool) -> OwnershipPlan:
    hidden = [s for s in specs if s.geometry is Geometry.HIDDEN]
    if not balance_numel or not hidden:
        return _greedy(hidden, world, ns_steps, math.inf, by_flops=True)
    passes = choices = 0
    share = math.ceil(sum(s.numel for s in specs) / world)
    largest = max(s.numel for s in hidden)
    step = max(1, -(-largest // CAP_STEPS))
    k = max(0, -(-(largest - share) // step))    # below this k the largest matrix fits no rank (module doc)
    while True:
        room = share + k * step
        for by_flops in (True, False):
            plan = _greedy(hidden, world, ns_steps, room, by_flops)
            passes, choices = passes + 1, choices + plan.choices
            if max(plan.numel) <= room:
                return replace(plan, passes=passes, choices=choices)
        if room >= share + largest:      # the FLOP greedy always fits here (module doc)
            raise AssertionError("unreachable: a rank below its share always has room for one more matrix")
        k += 1


def _greedy(hidden: list[ParamSpec], world: int, ns_steps: int, room: float, by_flops: bool) -> OwnershipPlan:
    """One greedy pass with at most ``room`` owned elements per rank. ``by_flops``: NS-cost order,
    least-loaded fitting rank (LPT); else element order, fullest fitting rank (best fit).
    A matrix that fits nowhere goes to the rank with the fewest elements (then fewest FLOPs,
    then lowest rank). Each choice equals the minimum over every rank (module doc, "Cost")."""
    cost = {s.name: ns_cost(s, ns_steps) for s in hidden}
    if by_flops:
        order = sorted(hidden, key=lambda s: (-cost[s.name], -s.numel, s.name))
    else:
        order = sorted(hidden, key=lambda s: (-s.numel, -cost[s.name], s.name))
    flops, numel = [0] * world, [0] * world
    chooser = _LeastLoaded(world, room, {s.numel for s in hidden}) if by_flops else _BestFit(world, room)
    fallback = _Fewest(world)
    owner: dict[str, int] = {}
    for s in order:
        r = chooser.choose(s.numel, flops, numel)
        if r is None:
            r = fallback.choose(flops, numel)
        owner[s.name] = r
        chooser.remove(r, flops, numel)
        flops[r] += cost[s.name]
        numel[r] += s.numel
        chooser.add(r, flops, numel)
        fallback.add(r, flops, numel)
    return OwnershipPlan(world, owner, tuple(flops), tuple(numel), 1, chooser.work + fallback.work)


class _LeastLoaded:
    """The FLOP greedy's choice: ``argmin (flops, numel, rank)`` over the ranks with
    ``numel + size ≤ room``. One lazy heap per distinct size holds the ranks that fit it; an
    entry is stale once its rank's holdings changed (they only grow)."""

    def __init__(self, world: int, room: float, sizes: set[int]) -> None:
        self.room = room
        self.heaps = {z: [(0, 0, r) for r in range(world)] for z in sizes if z <= room}   # sorted: already heaps
        self.work = 0

    def choose(self, size: int, flops: list[int], numel: list[int]) -> int | None:
        heap = self.heaps.get(size)
        while heap:
            f, n, r = heap[0]
            if (f, n) == (flops[r], numel[r]):
                return r
            heapq.heappop(heap)
            self.work += 1
        return None

    def remove(self, r: int, flops: list[int], numel: list[int]) -> None:
        """Nothing to do: ``r``'s old entries go stale when its holdings change."""

    def add(self, r: int, flops: list[int], numel: list[int]) -> None:
        for z, heap in self.heaps.items():
            if numel[r] + z <= self.room:
                heapq.heappush(heap, (flops[r], numel[r], r))
                self.work += 1


class _BestFit:
    """Best fit's choice: the fullest rank with ``numel + size ≤ room``, then the fewest FLOPs,
    then the lowest rank — the last key ``≤ (room − size, ∞)`` of the ranks sorted by
    ``(numel, −flops, −rank)``."""

    def __init__(self, world: int, room: float) -> None:
        self.room = room
        self.keys = [(0, 0, -r) for r in range(world - 1, -1, -1)]
        self.work = 0

    def choose(self, size: int, flops: list[int], numel: list[int]) -> int | None:
        self.work += 1
        i = bisect.bisect_right(self.keys, (self.room - size, math.inf)) - 1
        return -self.keys[i][2] if i >= 0 else None

    def remove(self, r: int, flops: list[int], numel: list[int]) -> None:
        self.work += 1
        del self.keys[bisect.bisect_left(self.keys, (numel[r], -flops[r], -r))]

    def add(self, r: int, flops: list[int], numel: list[int]) -> None:
        self.work += 1
        bisect.insort(self.keys, (numel[r], -flops[r], -r))


class _Fewest:
    """The fallback's choice: ``argmin (numel, flops, rank)`` over every rank (a lazy heap)."""

    def __init__(self, world: int) -> None:
        self.heap = [(0, 0, r) for r in range(world)]
        self.work = 0

    def choose(self, flops: list[int], numel: list[int]) -> int:
        while True:
            n, f, r = self.heap[0]
            if (n, f) == (numel[r], flops[r]):
                return r
            heapq.heappop(self.heap)
            self.work += 1

    def add(self, r: int, flops: list[int], numel: list[int]) -> None:
        heapq.heappush(self.heap, (numel[r], flops[r], r))
        self.work += 1
