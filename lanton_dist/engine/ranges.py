"""Which flat element range of each parameter every rank holds: the piece layouts of the framework
sharding schemes the all-to-all exchange (:mod:`lanton_dist.engine.exchange`) works over.

A parameter's *ranges* are one ``(start, stop)`` per rank, in elements of its row-major
flattening; empty ranges are allowed. FSDP2 row shards (:func:`row_ranges`), DeepSpeed ZeRO-1/2
flat partitions that cut across parameters (:func:`flat_partition_ranges`), ZeRO-3
per-parameter partitions (:func:`padded_partition_ranges`) and whole parameters on one rank
(fairscale OSS, :func:`whole_ranges`) are all such layouts; :func:`check_ranges` validates one.

Pure Python (no torch): the planner (:mod:`lanton_dist.plan`) computes the same layouts from
parameter shapes alone.
"""
from __future__ import annotations

import math

#: One ``(start, stop)`` per rank: flat elements of one parameter.
Ranges = tuple[tuple[int, int], ...]


def row_ranges(shape: tuple[int, ...], world: int) -> Ranges:
    """Flat ranges of a dim-0 shard of ``shape`` over ``world`` ranks, torch.chunk rule (FSDP2,
    DTensor ``Shard(0)``): rank r holds rows ``[r·c, (r+1)·c) ∩ [0, d0)``, ``c = ⌈d0/world⌉``
    (trailing ranks may hold none)."""
    d0 = shape[0] if shape else 1
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    c = -(-d0 // world) if d0 else 0
    return tuple((min(r * c, d0) * row, min((r + 1) * c, d0) * row) for r in range(world))


def flat_partition_ranges(offset: int, numel: int, partition: int, world: int) -> Ranges:
    """A parameter at elements ``[offset, offset+numel)`` of a flat buffer cut into ``world``
    partitions of ``partition`` elements (DeepSpeed ZeRO-1/2): each rank's part, relative to
    the parameter (empty ranges sit at the nearest boundary)."""
    out = []
    for r in range(world):
        lo, hi = max(offset, r * partition), min(offset + numel, (r + 1) * partition)
        lo = min(max(lo - offset, 0), numel)
        out.append((lo, max(lo, hi - offset)))
    return tuple(out)


def padded_partition_ranges(numel: int, partition: int, world: int) -> Ranges:
    """Per-parameter partitions of ``partition`` elements, the last ones padded (DeepSpeed ZeRO-3):
    rank r holds ``[r·partition, (r+1)·partition) ∩ [0, numel)``."""
    return tuple((min(r * partition, numel), min((r + 1) * partition, numel)) for r in range(world))


def whole_ranges(numel: int, owner: int, world: int) -> Ranges:
    """The whole parameter on ``owner``, nothing elsewhere (fairscale OSS)."""
    return tuple((0, numel) if r == owner else (0, 0) for r in range(world))


def check_ranges(name: str, numel: int, ranges: Ranges, world: int) -> None:
    """Raise ``ValueError`` unless ``ranges`` has one range per rank and the non-empty ones tile
    ``[0, numel)`` exactly."""
    if len(ranges) != world:
        raise ValueError(f"{name}: {len(ranges)} piece ranges for {world} ranks")
    parts = sorted((a, b) for a, b in ranges if b > a)
    pos = 0
    for a, b in parts:
        if a != pos:
            raise ValueError(f"{name}: pieces {list(ranges)} do not tile [0, {numel}) (gap or overlap at {pos})")
        pos = b
    if pos != numel or any(b < a or a < 0 for a, b in ranges):
        raise ValueError(f"{name}: pieces {list(ranges)} do not cover exactly [0, {numel})")
