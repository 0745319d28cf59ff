"""Owner-aligned flat bucket layout for data-parallel (ZeRO-1/2) sharding.

Each bucket is one flat buffer of ``world × segment`` elements; rank r's segment is what it
receives from the bucket's reduce-scatter and contributes to its all-gather. Whole hidden
matrices lie inside their owner's segment (so the ordinary reduce-scatter hands owners
whole reduced gradients — no extra traffic for Newton–Schulz); embed_head and vector tensors
are cut elementwise into flat pieces that fill the remaining room, split wherever a segment
ends, as in plain ZeRO, because their LMOs are elementwise and their dual norms decompose.

Buckets are *rounds*: with ``n`` buckets every segment aims at ``⌈total / (n·world)⌉`` elements.
Each rank walks its owned matrices in reverse parameter order (backward order) and puts into
bucket b every next matrix that still fits (first fit, so a large matrix that does not fit
leaves room for the smaller ones after it); a segment grows only to hold a single matrix larger
than the aim; the last bucket takes what is left. The elementwise stream (reverse order too)
then fills every segment's room, bucket by bucket and rank by rank. Whatever room the stream
cannot fill is padding, reported by :attr:`Layout.padding`. A piece cut at a segment's end
continues at offset 0 of the next segment (the owned matrices follow it), so with the buckets
laid end to end in one flat buffer (:attr:`Layout.bucket_starts`) an elementwise tensor stays
contiguous there unless it runs through a whole segment that also holds matrices
(:meth:`Layout.flat_spans`; the engine keeps a separate copy of such a tensor).

Bucket size: ``bucket_numel`` is a cap on ``world × segment``. The layout uses the most buckets
— starting from ``⌈total / bucket_numel⌉``, or ``⌊total / (world·largest matrix)⌋`` if fewer
(a segment holds its largest matrix whole) — whose padding stays within ``max_padding`` of the
elements (default :data:`MAX_PADDING`, 1%), down to one bucket (the least padding whole matrices
allow). So the cap is honoured exactly when whole matrices permit it within the padding bound;
otherwise buckets are larger (:attr:`Layout.cap_honoured` is False): a segment can never be
smaller than its largest matrix, so at 70B with TP 8 on 16 DP ranks (29 M-element FFN shards,
67 M elements per rank and stage) no packing into buckets below ≈ 1 G elements pads less than
≈ 13%. ``plan=None`` has no owners: the plain-ZeRO AdamW layout, every tensor elementwise,
which honours any cap of at least ``world`` elements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.groups import Geometry, ParamSpec

#: Default bound on padding, as a fraction of the model's elements (module doc).
MAX_PADDING = 0.01


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
    """``buckets`` over ``world`` ranks holding ``numel`` model elements; ``cap``: the requested
    ``bucket_numel`` (module doc)."""

    world: int
    buckets: tuple[Bucket, ...]
    numel: int
    cap: int = 0

    @property
    def padded_numel(self) -> int:
        return sum(b.segment for b in self.buckets) * self.world

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel

    @property
    def padding_fraction(self) -> float:
        return self.padding / self.numel if self.numel else 0.0

    @property
    def max_bucket_numel(self) -> int:
        """Largest bucket, ``world × segment`` elements."""
        return max((b.segment for b in self.buckets), default=0) * self.world

    @property
    def cap_honoured(self) -> bool:
        return self.max_bucket_numel <= self.cap

    def pieces_of(self, name: str) -> list[Piece]:
        return [p for b in self.buckets for p in b.pieces if p.name == name]

    @property
    def bucket_starts(self) -> tuple[int, ...]:
        """Where each bucket starts when the buckets lie end to end in one flat buffer."""
        starts, at = [], 0
        for b in self.buckets:
            starts.append(at)
            at += b.segment * self.world
        return tuple(starts)

    def flat_spans(self) -> dict[str, tuple[int, int] | None]:
        """Parameter name → ``(start, stop)`` in the flat buffer (buckets end to end) when its
        pieces lie there back to back in element order — a tensor view of the buffer can then be
        the parameter (or its gradient) — else ``None``: the pieces are scattered (an
        elementwise piece that runs through a segment holding a whole matrix, module doc)."""
        placed: dict[str, list[tuple[int, int, int]]] = {}
        for b, base in zip(self.buckets, self.bucket_starts):
            for p in b.pieces:
                at = base + p.rank * b.segment + p.offset
                placed.setdefault(p.name, []).append((p.start, at, p.numel))
        spans: dict[str, tuple[int, int] | None] = {}
        for name, parts in placed.items():
            parts.sort()
            first = parts[0][1]
            ok = all(at == first + start for start, at, _ in parts)
            spans[name] = (first, first + sum(n for _, _, n in parts)) if ok else None
        return spans


def build_layout(specs: list[ParamSpec], plan: OwnershipPlan | None, world: int, bucket_numel: int,
                 max_padding: float = MAX_PADDING) -> Layout:
    """The layout of ``specs`` (model parameter order) for ``world`` ranks (module doc).

    ``plan=None`` gives the plain ZeRO layout (every tensor elementwise). Raises ``ValueError``
    on a world below 1, a non-positive cap or a negative ``max_padding``.
    """
    if world < 1 or bucket_numel < 1 or not max_padding >= 0:
        raise ValueError(f"need world >= 1, bucket_numel >= 1, max_padding >= 0; got {world}, {bucket_numel}, {max_padding}")
    total = sum(s.numel for s in specs)
    owned: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    stream: list[tuple[str, int]] = []
    for s in reversed(specs):
        if plan is not None and s.geometry is Geometry.HIDDEN:
            owned[plan.owner[s.name]].append((s.name, s.numel))
        else:
            stream.append((s.name, s.numel))
    if plan is None:
        per = max(1, bucket_numel // world)
        n = max(1, math.ceil(total / (per * world)))
        return _build(owned, stream, world, n, total, bucket_numel)
    largest = max((k for o in owned for _, k in o), default=1)
    n = max(1, min(len(specs), math.ceil(total / bucket_numel), total // (world * largest)))
    while True:
        layout = _build(owned, stream, world, n, total, bucket_numel)
        if n == 1 or layout.padding <= max_padding * total:
            return layout
        n -= 1


def _build(owned: list[list[tuple[str, int]]], stream: list[tuple[str, int]], world: int, n_buckets: int,
           total: int, cap: int) -> Layout:
    aim = max(1, math.ceil(total / (n_buckets * world)))
    queues = [list(o) for o in owned]
    stream_pos = [(name, 0, k) for name, k in stream]  # (name, next start, numel)
    stream_left = sum(k for _, k in stream)
    buckets = []
    for b in range(n_buckets):
        last = b == n_buckets - 1
        hidden: list[list[tuple[str, int]]] = []
        for q in queues:
            if last:
                take, q[:] = list(q), []
            else:
                take, load, rest = [], 0, []
                for name, k in q:
                    if load + k <= aim or not take and k > aim and not rest:
                        take.append((name, k))
                        load += k
                    else:
                        rest.append((name, k))
                q[:] = rest
            hidden.append(take)
        loads = [sum(k for _, k in h) for h in hidden]
        segment = max(aim, max(loads))
        if last:
            segment = max(max(loads), math.ceil((sum(loads) + stream_left) / world), 1)
        pieces: list[Piece] = []
        for r in range(world):
            off, room = 0, segment - loads[r]

            def fill(n: int) -> None:
                nonlocal off, room, stream_left
                while n > 0 and stream_pos:
                    name, start, k = stream_pos[0]
                    take_n = min(n, k - start)
                    pieces.append(Piece(name, start, start + take_n, r, off))
                    off, room, n, stream_left = off + take_n, room - take_n, n - take_n, stream_left - take_n
                    if start + take_n == k:
                        stream_pos.pop(0)
                    else:
                        stream_pos[0] = (name, start + take_n, k)
                        return

            if stream_pos and stream_pos[0][1] > 0:   # continue the piece cut at the previous segment's end
                fill(min(room, stream_pos[0][2] - stream_pos[0][1]))
            for name, k in hidden[r]:
                pieces.append(Piece(name, 0, k, r, off))
                off += k
            fill(room)
        buckets.append(Bucket(b, segment, tuple(pieces)))
    if stream_pos or any(queues):
        raise AssertionError(f"layout left elements unplaced: {stream_pos[:3]}")
    return Layout(world, tuple(buckets), total, cap)
