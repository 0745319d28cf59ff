"""Owner-aligned flat bucket layout for data-parallel (ZeRO-1/2) sharding.

Each bucket is one flat buffer of ``world × segment`` elements; rank r's segment is what it
receives from the bucket's reduce-scatter and contributes to its all-gather. Whole hidden
matrices lie inside their owner's segment (so the ordinary reduce-scatter hands owners
whole reduced gradients — no extra traffic for Newton–Schulz); embed_head and vector tensors
are cut elementwise into flat pieces that fill the remaining room, as in plain ZeRO, because
their LMOs are elementwise and their dual norms decompose.

Buckets follow reverse parameter order (backward order). With ``n_buckets`` buckets, each
rank's owned matrices and the elementwise stream are cut into ``n_buckets`` consecutive
chunks of about equal size, so every bucket carries a similar share for every rank.
``segment = max(⌈bucket_numel/W⌉, max_r owned_r)``; the difference is padding, reported
by :attr:`Layout.padding` (``layout='plain'`` has no owners: the plain-ZeRO AdamW layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.groups import Geometry, ParamSpec


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of parameter ``name`` (flattened), at ``offset`` in ``rank``'s segment."""

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
    index: int
    segment: int
    pieces: tuple[Piece, ...]

    def on_rank(self, rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.rank == rank]


@dataclass(frozen=True)
class Layout:
    world: int
    buckets: tuple[Bucket, ...]
    numel: int

    @property
    def padded_numel(self) -> int:
        return sum(b.segment for b in self.buckets) * self.world

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel

    def pieces_of(self, name: str) -> list[Piece]:
        return [p for b in self.buckets for p in b.pieces if p.name == name]


def _chunks(items: list[tuple[str, int]], n: int) -> list[list[tuple[str, int]]]:
    """Cut whole ``(name, numel)`` items, in order, into ``n`` runs of about equal size."""
    total = sum(k for _, k in items)
    out: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    acc = 0
    for name, k in items:
        b = min(n - 1, int(acc * n // total)) if total else 0
        out[b].append((name, k))
        acc += k
    return out


MAX_PADDING = 0.01


def build_layout(specs: list[ParamSpec], plan: OwnershipPlan | None, world: int, bucket_numel: int) -> Layout:
    """The layout of ``specs`` (model parameter order) for ``world`` ranks.

    Uses ``⌈total/bucket_numel⌉`` buckets, or fewer when whole-matrix granularity would pad
    more than :data:`MAX_PADDING` of the elements (down to one bucket, the least padding).
    ``plan=None`` gives the plain ZeRO layout (every tensor elementwise).
    """
    total = sum(s.numel for s in specs)
    n = max(1, min(len(specs), math.ceil(total / max(1, bucket_numel))))
    while True:
        layout = _build(specs, plan, world, n)
        if n == 1 or layout.padding <= MAX_PADDING * total:
            return layout
        n = max(1, n // 2)


def _build(specs: list[ParamSpec], plan: OwnershipPlan | None, world: int, n_buckets: int) -> Layout:
    order = list(reversed(specs))
    total = sum(s.numel for s in specs)
    owned: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    stream: list[tuple[str, int]] = []
    for s in order:
        if plan is not None and s.geometry is Geometry.HIDDEN:
            owned[plan.owner[s.name]].append((s.name, s.numel))
        else:
            stream.append((s.name, s.numel))
    owned_chunks = [_chunks(o, n_buckets) for o in owned]
    stream_total = sum(k for _, k in stream)
    stream_pos = [(name, 0, k) for name, k in stream]  # (name, next start, numel)
    buckets = []
    for b in range(n_buckets):
        hidden = [owned_chunks[r][b] for r in range(world)]
        loads = [sum(k for _, k in h) for h in hidden]
        stream_share = stream_total * (b + 1) // n_buckets - stream_total * b // n_buckets
        segment = max(math.ceil((sum(loads) + stream_share) / world), max(loads), 1)
        pieces: list[Piece] = []
        for r in range(world):
            off = 0
            for name, k in hidden[r]:
                pieces.append(Piece(name, 0, k, r, off))
                off += k
            room = min(segment - off, stream_share)
            while room > 0 and stream_pos:
                name, start, k = stream_pos[0]
                take = min(room, k - start)
                pieces.append(Piece(name, start, start + take, r, off))
                off, room, stream_share = off + take, room - take, stream_share - take
                if start + take == k:
                    stream_pos.pop(0)
                else:
                    stream_pos[0] = (name, start + take, k)
        buckets.append(Bucket(b, segment, tuple(pieces)))
    if stream_pos:
        raise AssertionError(f"layout left elements unplaced: {stream_pos[:3]}")
    return Layout(world, tuple(buckets), total)
