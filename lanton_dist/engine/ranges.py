"""Which flat element range of each parameter every rank holds: the piece layouts of the framework
sharding schemes the all-to-all exchange (:mod:`lanton_dist.engine.exchange`) works over.

A parameter's *ranges* are one ``(start, stop)`` per rank, in elements of its row-major
flattening; empty ranges are allowed. FSDP2 row shards (:func:`row_ranges`), DeepSpeed ZeRO-1/2
flat partitions that cut across parameters (:func:`flat_partition_ranges`), ZeRO-3
per-parameter partitions (:func:`padded_partition_ranges`) and whole parameters on one rank
(fairscale OSS, :func:`whole_ranges`) are all such layouts; :func:`check_ranges` validates one.

Multi-dimensional device meshes (HSDP, FSDP × TP) give each rank a rectangular *block* of a
matrix, and several ranks the same block (replicas). :class:`BlockLayout` orders the distinct
blocks into a *storage flattening* in which every block is one flat range (row-major when every
block spans all columns); :func:`replica_ranges` splits a range held by R replicas into R
disjoint sub-ranges, so the sub-ranges tile the matrix over the whole job.

Pure Python (no torch): the planner (:mod:`lanton_dist.plan`) computes the same layouts from
parameter shapes alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: One ``(start, stop)`` per rank: flat elements of one parameter.
Ranges = tuple[tuple[int, int], ...]
#: A rectangular block of a matrix: ``((row_start, row_stop), (col_start, col_stop))``.
Block = tuple[tuple[int, int], tuple[int, int]]


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


@dataclass(frozen=True)
class BlockLayout:
    """Where each rank's block of a ``(rows, cols)`` matrix sits in its storage flattening.

    The distinct non-empty blocks are ordered by (first column, first row) and concatenated,
    each row-major inside: every block is one flat range ``[offset, offset + size)``. When every
    block spans all columns (dim-0 sharding, HSDP, FSDP2 over a column-parallel weight) this is
    the row-major flattening itself (``row_major``); a row-parallel (column-sharded) weight gets
    its column bands one after the other (as Megatron's TP-rank-major order).

    ``rows × cols`` is the matrix view: ``shape[0] × prod(shape[1:])`` (only dim 0 and, for 2-D
    parameters, dim 1 may be split). Build with :meth:`from_blocks`.
    """

    rows: int
    cols: int
    blocks: tuple[Block, ...]   # distinct non-empty blocks, storage order
    offsets: tuple[int, ...]    # storage offset of each block
    row_major: bool

    @classmethod
    def from_blocks(cls, name: str, shape: tuple[int, ...], per_rank: list[tuple[tuple[int, ...], tuple[int, ...]]]
                    ) -> tuple["BlockLayout", Ranges]:
        """The layout of a parameter of ``shape`` from each rank's ``(global offset, local shape)``
        (DTensor's ``compute_local_shape_and_global_offset``), and each rank's storage range.

        Raises ``ValueError`` unless the blocks are column bands each split into row ranges that
        tile the matrix (what Shard/Replicate placements of dims 0 and 1 produce)."""
        rows = shape[0] if shape else 1
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        blocks: list[Block | None] = []
        for offset, local in per_rank:
            if len(offset) != len(shape) or len(local) != len(shape):
                raise ValueError(f"{name}: block {offset}/{local} does not match shape {shape}")
            if math.prod(local) == 0:
                blocks.append(None)
                continue
            if any(o != 0 or n != d for o, n, d in zip(offset[2:], local[2:], shape[2:])) or (
                    len(shape) > 2 and (offset[1], local[1]) != (0, shape[1])):
                raise ValueError(f"{name}: a {len(shape)}-D parameter may only be split along dim 0 "
                                 f"(block at {offset} of shape {local})")
            r0, c0 = (offset[0], offset[1]) if len(shape) == 2 else (offset[0] if shape else 0, 0)
            r1 = r0 + (local[0] if shape else 1)
            c1 = c0 + (local[1] if len(shape) == 2 else cols)
            blocks.append(((r0, r1), (c0, c1)))
        distinct = sorted({b for b in blocks if b is not None}, key=lambda b: (b[1][0], b[0][0]))
        bands: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, c in distinct:
            bands.setdefault(c, []).append(r)
        pos = 0
        for c, rs in bands.items():
            if c[0] != pos or any(a != (rs[i - 1][1] if i else 0) for i, (a, _) in enumerate(rs)) or rs[-1][1] != rows:
                raise ValueError(f"{name}: blocks {distinct} are not column bands tiled by row ranges of a "
                                 f"{rows}×{cols} matrix (unsupported placements)")
            pos = c[1]
        if distinct and pos != cols:
            raise ValueError(f"{name}: column bands {list(bands)} do not cover {cols} columns")
        offsets, at = [], 0
        for (r0, r1), (c0, c1) in distinct:
            offsets.append(at)
            at += (r1 - r0) * (c1 - c0)
        layout = cls(rows, cols, tuple(distinct), tuple(offsets), all(c == (0, cols) for c in bands))
        where = dict(zip(distinct, offsets))
        numel = rows * cols
        ranges = tuple((where[b], where[b] + (b[0][1] - b[0][0]) * (b[1][1] - b[1][0])) if b is not None
                       else (numel, numel) for b in blocks)
        return layout, ranges

    def to_matrix(self, flat: Any) -> Any:
        """A ``(rows, cols)`` tensor from its storage flattening ``flat`` (1-D, ``rows·cols``)."""
        if self.row_major:
            return flat.view(self.rows, self.cols)
        out = flat.new_empty(self.rows, self.cols)
        for ((r0, r1), (c0, c1)), o in zip(self.blocks, self.offsets):
            out[r0:r1, c0:c1] = flat[o : o + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        return out

    def to_flat(self, matrix: Any) -> Any:
        """The storage flattening (1-D) of a ``(rows, cols)``-viewable tensor."""
        matrix = matrix.reshape(self.rows, self.cols)
        if self.row_major:
            return matrix.reshape(-1)
        out = matrix.new_empty(self.rows * self.cols)
        for ((r0, r1), (c0, c1)), o in zip(self.blocks, self.offsets):
            out[o : o + (r1 - r0) * (c1 - c0)] = matrix[r0:r1, c0:c1].reshape(-1)
        return out

    def signature(self) -> tuple[int, ...]:
        """The column-band boundaries of a non-row-major layout (checkpoint guard); ``()`` if row-major."""
        return () if self.row_major else tuple(sorted({c for _, band in self.blocks for c in band}))


def replica_ranges(held: Ranges) -> tuple[Ranges, tuple[float, ...]]:
    """Split every non-empty range that several ranks hold (replicas, e.g. HSDP's replicate
    dim) into one disjoint sub-range per replica, in rank order (``torch.chunk`` sizes, trailing
    ones possibly empty): the result tiles the parameter over all ranks when ``held`` covers it.
    Also each rank's weight in scalar sums: 1 for the first replica of a range, 0 for the others."""
    replicas: dict[tuple[int, int], list[int]] = {}
    for r, (a, b) in enumerate(held):
        if b > a:
            replicas.setdefault((a, b), []).append(r)
    out = list(held)
    weights = [1.0] * len(held)
    for (a, b), ranks in replicas.items():
        c = -(-(b - a) // len(ranks))
        for i, r in enumerate(ranks):
            out[r] = (min(a + i * c, b), min(a + (i + 1) * c, b))
            weights[r] = 1.0 if i == 0 else 0.0
    return tuple(out), tuple(weights)
