"""Flat bucket layout of the ZeRO engine: whole matrices on their owners, any bucket size.

A bucket is a run of consecutive parameters in backward (reverse) order, at most ``bucket_numel``
elements, laid out as one flat range of per-rank *chunks* — rank r's chunk (``segments[r]``
elements) is what it receives from the bucket's reduction and sends back in the parameter
gather. Three kinds of placement, each keeping every parameter contiguous in the flat buffer
(so every parameter and gradient can be a view of it):

* a hidden matrix lies whole in its owner's chunk (``plan.owner``), so the owner receives its
  whole reduced gradient for Newton–Schulz and the dual norm with no extra traffic;
* a small elementwise tensor (embed_head or vector geometry, at most ``bucket_numel / world``
  elements) lies whole in the chunk of the rank holding the fewest elements so far (owned
  matrices counted first), so optimizer state stays balanced;
* a larger elementwise tensor gets buckets of its own, cut in pieces of ``bucket_numel`` rounded
  down to a multiple of ``world`` (at least ``world``), each split evenly over the ranks (plain
  ZeRO; its LMO is elementwise and its dual norm decomposes).

Chunks of one bucket may differ in size. A bucket whose chunks are all equal is reduced with
one reduce-scatter and gathered with one all-gather; any other bucket with one reduce to each
rank holding a non-empty chunk and one broadcast from it (DeepSpeed ZeRO-2's reduce-to-owner
mode; :mod:`lanton_dist.engine.buckets`). Either way a rank sends, summed over the buckets,
the model minus what it holds — within ``1/world`` of a reduce-scatter's bytes when holdings
are balanced (:mod:`lanton_dist.engine.meter`) — and the cap is honoured for every bucket but
one holding a single matrix larger than it (a matrix is never cut: :attr:`Layout.cap_honoured`).
Padding is only the rounding of the even splits (fewer than ``world`` elements per split bucket).

``plan=None`` has no owners: the plain-ZeRO AdamW layout (the traffic baseline), every tensor
a stream cut into equal chunks of ``⌈bucket_numel / world⌉`` elements, split wherever a chunk ends.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from functools import cached_property

from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.groups import Geometry, ParamSpec


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of parameter ``name`` (flattened), at ``offset`` in ``rank``'s chunk."""

    name: str
    start: int
    stop: int
    rank: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Bucket:
    """Bucket ``index``: rank r's chunk holds ``segments[r]`` elements; chunks lie in rank order.
    Derived figures (``uniform``, ``starts``, ``chunks``) are computed once: a bucket has one
    segment per rank, so recomputing them per query would cost ``O(world)`` each time."""

    index: int
    segments: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return sum(self.segments)

    @cached_property
    def uniform(self) -> bool:
        """All chunks equal: one reduce-scatter / all-gather moves the bucket."""
        return len(set(self.segments)) == 1

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Where each rank's chunk starts in the bucket."""
        return tuple(itertools.accumulate(self.segments[:-1], initial=0))

    @cached_property
    def chunks(self) -> tuple[tuple[int, int], ...]:
        """``(rank, elements)`` of every non-empty chunk, in rank order."""
        return tuple((r, n) for r, n in enumerate(self.segments) if n)

    def start_of(self, rank: int) -> int:
        """Where ``rank``'s chunk starts in the bucket."""
        return self.starts[rank]

    def on_rank(self, rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.rank == rank]


@dataclass(frozen=True)
class Layout:
    """``buckets`` over ``world`` ranks holding ``numel`` model elements; ``cap``: the requested
    ``bucket_numel`` (module doc)."""

    world: int
    buckets: tuple[Bucket, ...]
    numel: int
    cap: int = 0

    @property
    def padded_numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel

    @property
    def padding_fraction(self) -> float:
        return self.padding / self.numel if self.numel else 0.0

    @property
    def max_bucket_numel(self) -> int:
        return max((b.numel for b in self.buckets), default=0)

    @property
    def cap_honoured(self) -> bool:
        """Every bucket within the cap, but one holding a single matrix larger than it."""
        return all(b.numel <= self.cap or len(b.pieces) == 1 for b in self.buckets)

    def held(self, rank: int) -> int:
        """Elements of ``rank``'s chunks (what it reduces, updates and gathers; padding included)."""
        return sum(b.segments[rank] for b in self.buckets)

    def pieces_of(self, name: str) -> list[Piece]:
        return [p for b in self.buckets for p in b.pieces if p.name == name]

    @property
    def bucket_starts(self) -> tuple[int, ...]:
        """Where each bucket starts when the buckets lie end to end in one flat buffer."""
        starts, at = [], 0
        for b in self.buckets:
            starts.append(at)
            at += b.numel
        return tuple(starts)

    def flat_spans(self) -> dict[str, tuple[int, int] | None]:
        """Parameter name → ``(start, stop)`` in the flat buffer (buckets end to end) when its
        pieces lie there back to back in element order — a tensor view of the buffer can then be
        the parameter (or its gradient) — else ``None`` (none in the layouts built here; kept as
        the check the storage relies on). Computed once per layout; each call returns a copy."""
        return dict(self._spans)

    @cached_property
    def _spans(self) -> dict[str, tuple[int, int] | None]:
        placed: dict[str, list[tuple[int, int, int]]] = {}
        for b, base in zip(self.buckets, self.bucket_starts):
            for p in b.pieces:
                placed.setdefault(p.name, []).append((p.start, base + b.start_of(p.rank) + p.offset, p.numel))
        spans: dict[str, tuple[int, int] | None] = {}
        for name, parts in placed.items():
            parts.sort()
            first = parts[0][1]
            ok = all(at == first + start for start, at, _ in parts)
            spans[name] = (first, first + sum(n for _, _, n in parts)) if ok else None
        return spans


def build_layout(specs: list[ParamSpec], plan: OwnershipPlan | None, world: int, bucket_numel: int) -> Layout:
    """The layout of ``specs`` (model parameter order) for ``world`` ranks (module doc).

    ``plan=None`` gives the plain ZeRO layout (every tensor elementwise). Raises ``ValueError``
    on a world below 1 or a non-positive cap.
    """
    if world < 1 or bucket_numel < 1:
        raise ValueError(f"need world >= 1 and bucket_numel >= 1; got {world}, {bucket_numel}")
    total = sum(s.numel for s in specs)
    if plan is None:
        return _plain(specs, world, bucket_numel, total)
    return _owned(specs, plan, world, bucket_numel, total)


def _even(name: str, start: int, stop: int, world: int, index: int) -> Bucket:
    """Elements ``[start, stop)`` of ``name`` split evenly (``⌈n/world⌉`` per chunk)."""
    seg = math.ceil((stop - start) / world)
    pieces = tuple(Piece(name, a, min(a + seg, stop), r, 0)
                   for r, a in enumerate(range(start, start + world * seg, seg)) if a < stop)
    return Bucket(index, (seg,) * world, pieces)


def _owned(specs: list[ParamSpec], plan: OwnershipPlan, world: int, cap: int, total: int) -> Layout:
    # (elements held, rank): its matrices first, then what it is given; the even splits add the
    # same to every rank, so they are left out (the least-held rank is the same either way)
    fewest = [(n, r) for r, n in enumerate(plan.numel)]
    heapq.heapify(fewest)
    buckets: list[Bucket] = []
    current: list[tuple[str, int, int]] = []   # (name, numel, rank) of the open bucket

    def close() -> None:
        if not current:
            return
        segments, pieces = [0] * world, []
        for name, k, r in current:
            pieces.append(Piece(name, 0, k, r, segments[r]))
            segments[r] += k
        buckets.append(Bucket(len(buckets), tuple(segments), tuple(pieces)))
        current.clear()

    for s in reversed(specs):
        hidden = s.geometry is Geometry.HIDDEN
        if not hidden and s.numel * world > cap and s.numel >= world:
            close()
            step = max(world, cap - cap % world)   # full buckets split with no padding: the tensor stays contiguous
            for a in range(0, s.numel, step):
                buckets.append(_even(s.name, a, min(a + step, s.numel), world, len(buckets)))
            continue
        if current and sum(k for _, k, _ in current) + s.numel > cap:
            close()
        if hidden:
            r = plan.owner[s.name]
        else:
            n, r = heapq.heappop(fewest)
            heapq.heappush(fewest, (n + s.numel, r))
        current.append((s.name, s.numel, r))
    close()
    return Layout(world, tuple(buckets), total, cap)


def _plain(specs: list[ParamSpec], world: int, cap: int, total: int) -> Layout:
    per = max(1, cap // world)
    stream = [(s.name, s.numel) for s in reversed(specs)]
    buckets: list[Bucket] = []
    left = total
    i, at = 0, 0   # next element: stream[i], element ``at``
    while left > 0:
        seg = min(per, math.ceil(left / world))
        pieces = []
        for r in range(world):
            off = 0
            while off < seg and i < len(stream):
                name, k = stream[i]
                n = min(seg - off, k - at)
                pieces.append(Piece(name, at, at + n, r, off))
                off, at, left = off + n, at + n, left - n
                if at == k:
                    i, at = i + 1, 0
        buckets.append(Bucket(len(buckets), (seg,) * world, tuple(pieces)))
    return Layout(world, tuple(buckets), total, cap)
