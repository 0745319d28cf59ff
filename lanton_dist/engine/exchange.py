"""The all-to-all :class:`~lanton_dist.engine.core.MatrixExchange` every framework adapter
(:class:`~lanton_dist.engine.optimizer.PieceOptimizer`) shares.

Framework-free: it sees only torch tensors, a process group and, for every hidden parameter,
which flat element range ``[start, stop)`` of its row-major flattening each rank holds (a
*piece*; empty pieces are allowed). FSDP2 row shards, DeepSpeed ZeRO-1/2 flat partitions that
cut across parameters, ZeRO-3 per-parameter partitions and whole parameters (fairscale OSS)
are all such layouts; :mod:`lanton_dist.engine.ranges` computes them (torch-free, the planner
uses them too).

:class:`AllToAllExchange` moves pieces to each matrix's owner (the FLOP-balanced
:func:`~lanton_dist.engine.ownership.plan_ownership` plan, so every Newton–Schulz and
nuclear norm runs once per matrix per step across the job) and the owner's result back:

* matrices are grouped into **buckets** of about ``bucket_mb`` (canonical parameter order,
  the same on every rank); each bucket is ONE ``all_to_all_single`` towards the owners and
  ONE back;
* :meth:`AllToAllExchange.apply` pipelines: the gathers of ``window`` buckets are in flight
  while the owner runs Newton–Schulz on the bucket that arrived, and that bucket's results go
  back asynchronously at once (the issue order is fixed, so every rank posts the same
  collectives in the same order);
* :meth:`AllToAllExchange.launch_gather` posts all gathers and returns a
  :class:`PendingGather` whose owner-side work (the nuclear norms) can run on a background
  thread while the caller goes on (the deferred variance of the core);
* a bucket whose pieces all sit on their owners already (whole parameters, fairscale OSS)
  posts no collective at all;
* uneven and empty pieces are sent as they are: torch's gloo and NCCL ``all_to_all_single``
  accept unequal splits (``tests/test_fsdp2.py`` checks gloo). ``pad=True`` pads every split of
  a bucket to the bucket's largest (dion's scheme, for backends that need equal splits); the
  padding is real traffic and the meter counts it.

Host work: the routing and the copies that pack and unpack each bucket are planned once (per
bucket and element size); a step copies only the pieces that move, a matrix arriving from
every rank in rank order is one copy, and no Python work is done per rank that sends or
receives nothing (``docs/scale_costs.md``).

Per rank and step the exchange sends its pieces of matrices owned elsewhere and, as owner,
each other rank's piece of the result: ``Σ_X≠owned |piece_r(X)| + Σ_X owned (numel_X −
|piece_r(X)|)`` elements, about 2 × the owned matrices' bytes — the all-to-all optimum.
Nothing is ever all-gathered to every rank.

Every rank must pass pieces of the same matrices in each call (possibly empty ones): the
adapters build a (possibly empty) piece of every parameter on every rank for that reason.

Replicas and permuted storage (FSDP2 on 2-D meshes): with ``held``, a rank holds (and passes,
and gets results for) a range that may contain more than its gather range — several replicas
hold the same range, each gathers a disjoint sub-range of it, and the owner's result goes
back to every holder. With ``orders``, a matrix's pieces are ranges of a storage flattening
other than row-major (:class:`~lanton_dist.engine.ranges.BlockLayout`); the owner converts
between it and the matrix.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lanton_dist.engine import phases
from lanton_dist.engine.core import LocalPiece, OwnerWork
from lanton_dist.engine.meter import Collectives
from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.engine.ranges import BlockLayout, Ranges, check_ranges
from lanton_dist.groups import Geometry, ParamSpec


#: One copy of a bucket's packing: ``(name, lo, hi, at)`` — elements ``[lo, hi)`` of the
#: name's tensor and ``[at, at + hi − lo)`` of the bucket's flat buffer.
_Copy = tuple[str, int, int, int]


def _coalesced(copies: list[_Copy]) -> tuple[_Copy, ...]:
    """``copies`` with each run of adjacent ranges of one tensor to adjacent buffer places merged
    (a matrix arriving from every rank in rank order is ONE copy, whatever the world size)."""
    out: list[_Copy] = []
    for n, lo, hi, at in copies:
        if out and out[-1][0] == n and out[-1][2] == lo and out[-1][3] + out[-1][2] - out[-1][1] == at:
            out[-1] = (n, out[-1][1], hi, out[-1][3])
        else:
            out.append((n, lo, hi, at))
    return tuple(out)


@dataclass(frozen=True)
class _BucketPlan:
    """Static routing of one bucket for this rank (element counts; gather direction), and the
    copies that pack and unpack its buffers — non-empty ones only, so a step's host work is
    per piece that moves, never per rank (``docs/scale_costs.md``)."""

    names: tuple[str, ...]
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    back_send_splits: tuple[int, ...]       # scatter: per destination, its held pieces of my results
    back_recv_splits: tuple[int, ...]       # scatter: per source owner, my held pieces of its results
    padded: int                             # common split size when padding, else 0
    local: bool                             # every piece already sits on its owner: no collective
    pack_gather: tuple[_Copy, ...]          # my held tensor [lo, hi) → gather send buffer
    unpack_gather: tuple[_Copy, ...]        # gather recv buffer → owned matrix [lo, hi) (storage order)
    pack_scatter: tuple[_Copy, ...]         # owned result [lo, hi) (storage order) → scatter send buffer
    unpack_scatter: tuple[tuple[str, int, int], ...]  # (name, at, numel) of my held piece in the recv buffer


class _Done:
    """The handle of a bucket that needed no collective."""

    def wait(self) -> None:
        return None


class _Launched:
    """One posted gather bucket: its plan, receive buffer and handle."""

    def __init__(self, plan: _BucketPlan, recv: torch.Tensor, handle) -> None:
        self.plan, self.recv, self.handle = plan, recv, handle


class PendingGather(OwnerWork):
    """Gathers posted by :meth:`AllToAllExchange.launch_gather`; the owner's work runs per bucket
    as each arrives, in the caller's thread (:meth:`map`) or a background one (:meth:`start`)."""

    def __init__(self, exchange: "AllToAllExchange", launched: list[_Launched]) -> None:
        self._ex, self._launched = exchange, launched

    def map(self, fn: Callable[[list[str], list[torch.Tensor]], list[Any]]) -> dict[str, Any]:
        """``fn(names, whole matrices)`` on every bucket this rank owns matrices of; ``{name: result}``."""
        out: dict[str, Any] = {}
        for item in self._launched:
            owned = self._ex._assemble(item)
            if owned:
                names = list(owned)
                out.update(zip(names, fn(names, [owned[n] for n in names])))
        self._launched = []
        return out


class AllToAllExchange:
    """Bucketed all-to-all between pieces and owners (see module doc).

    Args:
        specs: every parameter (any geometry; only hidden ones are exchanged), same order on
            every rank — the canonical bucket order.
        ranges: name → one flat ``(start, stop)`` per rank of the process group, for every
            hidden parameter (computed identically on every rank).
        plan: owner of each hidden parameter (ranks of the process group).
        coll: metered collectives over the process group.
        bucket_mb: target bytes per bucket (a matrix larger than it is a bucket alone).
        pad: pad every split of a bucket to the bucket's largest (counted by the meter).
        window: gathers in flight ahead of the Newton–Schulz in :meth:`apply` (≥ 1).
        held: name → the range each rank holds, passes and gets results for, each containing
            its range in ``ranges`` (default ``ranges``; replicas hold the same range).
        orders: name → :class:`~lanton_dist.engine.ranges.BlockLayout` of a matrix whose
            ranges index a storage flattening other than row-major.

    Tensors passed in are 1-D pieces of one dtype on one device; whole matrices come out on
    that device with ``spec.shape``.
    """

    def __init__(self, specs: list[ParamSpec], ranges: dict[str, Ranges], plan: OwnershipPlan, coll: Collectives, *,
                 bucket_mb: float = 25.0, pad: bool = False, window: int = 2,
                 held: dict[str, Ranges] | None = None, orders: dict[str, BlockLayout] | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if plan.world != coll.world:
            raise ValueError(f"ownership plan is for {plan.world} ranks, the process group has {coll.world}")
        self.coll, self.plan, self.world, self.rank = coll, plan, coll.world, coll.rank
        self.bucket_bytes, self.pad, self.window = int(bucket_mb * 2**20), pad, window
        self.specs = {s.name: s for s in specs if s.geometry is Geometry.HIDDEN}
        self.order = {n: i for i, n in enumerate(self.specs)}
        for name, spec in self.specs.items():
            if name not in ranges:
                raise ValueError(f"no piece ranges given for hidden parameter {name}")
            if name not in plan.owner:
                raise ValueError(f"ownership plan has no owner for {name}")
            check_ranges(name, spec.numel, ranges[name], self.world)
        self.ranges = {n: tuple(ranges[n]) for n in self.specs}
        self.held = {n: tuple((held or ranges)[n]) for n in self.specs}
        for n, hr in self.held.items():
            if len(hr) != self.world or any(a < c or d < b for (a, b), (c, d) in zip(self.ranges[n], hr) if b > a):
                raise ValueError(f"{n}: held ranges {list(hr)} do not contain the gather ranges {list(self.ranges[n])}")
        self.orders = {n: o for n, o in (orders or {}).items() if n in self.specs and not o.row_major}
        self._plans: dict[tuple[tuple[str, ...], int], list[_BucketPlan]] = {}

    # ------------------------------------------------------------------ routing
    def _buckets(self, names: tuple[str, ...], elem: int) -> list[_BucketPlan]:
        key = (names, elem)
        if key not in self._plans:
            groups: list[list[str]] = [[]]
            size = 0
            for n in names:
                b = self.specs[n].numel * elem
                if groups[-1] and size + b > self.bucket_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append(n)
                size += b
            self._plans[key] = [self._route(tuple(g)) for g in groups if g]
        return self._plans[key]

    def _route(self, names: tuple[str, ...]) -> _BucketPlan:
        """Routing and packing of one bucket (construction only: O(W · names) here, so that a
        step does no work per rank)."""
        W, me, owner = self.world, self.rank, self.plan.owner
        by_owner: dict[int, list[str]] = {}
        for n in names:
            by_owner.setdefault(owner[n], []).append(n)
        mine = by_owner.get(me, [])
        send = tuple(tuple(by_owner.get(d, ())) for d in range(W))
        send_splits = tuple(sum(self._len(n, me) for n in send[d]) for d in range(W))
        recv_splits = tuple(sum(self._len(n, s) for n in mine) for s in range(W))
        back_send = tuple(sum(self._held_len(n, d) for n in mine) for d in range(W))
        back_recv = tuple(sum(self._held_len(n, me) for n in send[s]) for s in range(W))
        padded = 0
        if self.pad:
            padded = max(sum(size(n, s) for n in group) for size in (self._len, self._held_len)
                         for group in by_owner.values() for s in range(W))
        local = all(self._held_len(n, r) == 0 for n in names for r in range(W) if r != owner[n])
        padded = 0 if local else padded

        def starts(splits: tuple[int, ...]) -> list[int]:
            out, pos = [], 0
            for k in splits:
                out.append(pos)
                pos += padded or k
            return out

        pack_gather, unpack_gather, pack_scatter, unpack_scatter = [], [], [], []
        for d, at in enumerate(starts(send_splits)):
            for n in send[d]:
                (a, b), h = self.ranges[n][me], self.held[n][me][0]
                if b > a:
                    pack_gather.append((n, a - h, b - h, at))
                at += b - a
        for s, at in enumerate(starts(recv_splits)):
            for n in mine:
                a, b = self.ranges[n][s]
                if b > a:
                    unpack_gather.append((n, a, b, at))
                at += b - a
        for d, at in enumerate(starts(back_send)):
            for n in mine:
                a, b = self.held[n][d]
                if b > a:
                    pack_scatter.append((n, a, b, at))
                at += b - a
        for s, at in enumerate(starts(back_recv)):
            for n in send[s]:
                k = self._held_len(n, me)
                unpack_scatter.append((n, at, k))
                at += k
        return _BucketPlan(names, send_splits, recv_splits, back_send, back_recv, padded, local,
                           _coalesced(pack_gather), _coalesced(unpack_gather), _coalesced(pack_scatter),
                           tuple(unpack_scatter))

    def _len(self, name: str, rank: int) -> int:
        a, b = self.ranges[name][rank]
        return b - a

    def _held_len(self, name: str, rank: int) -> int:
        a, b = self.held[name][rank]
        return b - a

    def _index(self, pieces: list[LocalPiece], tensors: list[torch.Tensor]) -> tuple[tuple[str, ...], dict[str, int]]:
        """Validate a call's pieces; canonical name order and name → position."""
        if len(pieces) != len(tensors):
            raise ValueError(f"{len(pieces)} pieces but {len(tensors)} tensors")
        where: dict[str, int] = {}
        for i, (p, t) in enumerate(zip(pieces, tensors)):
            if p.name not in self.specs:
                raise ValueError(f"{p.name} is not a hidden parameter this exchange knows")
            if p.name in where:
                raise ValueError(f"{p.name} passed twice")
            if (p.start, p.stop) != self.held[p.name][self.rank]:
                raise ValueError(f"{p.name}: rank {self.rank} piece {p.start}:{p.stop} does not match the layout "
                                 f"{self.held[p.name][self.rank]}")
            if t.numel() != p.stop - p.start:
                raise ValueError(f"{p.name}: tensor has {t.numel()} elements, piece {p.start}:{p.stop} has {p.stop - p.start}")
            where[p.name] = i
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(f"one dtype per exchange call, got {sorted(map(str, dtypes))}")
        return tuple(sorted(where, key=self.order.__getitem__)), where

    # ------------------------------------------------------------------ one bucket
    def _splits(self, plan: _BucketPlan, splits: tuple[int, ...]) -> list[int]:
        return [plan.padded] * self.world if plan.padded else list(splits)

    @staticmethod
    def _buffer(plan: _BucketPlan, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A send buffer: zeros when padded (the padding is sent), else uninitialised (filled whole)."""
        return (torch.zeros if plan.padded else torch.empty)(numel, dtype=like.dtype, device=like.device)

    @phases.announces()
    def _post_gather(self, plan: _BucketPlan, tensors: list[torch.Tensor], where: dict[str, int], phase: str) -> _Launched:
        ref = tensors[0]
        send_splits, recv_splits = self._splits(plan, plan.send_splits), self._splits(plan, plan.recv_splits)
        send = self._buffer(plan, sum(send_splits), ref)
        for n, lo, hi, at in plan.pack_gather:
            send[at : at + hi - lo].copy_(tensors[where[n]].reshape(-1)[lo:hi])
        if plan.local:
            return _Launched(plan, send, _Done())
        recv = torch.empty(sum(recv_splits), dtype=ref.dtype, device=ref.device)
        return _Launched(plan, recv, self.coll.all_to_all(recv, send, recv_splits, send_splits, phase))

    def _assemble(self, item: _Launched) -> dict[str, torch.Tensor]:
        """Wait for a gather bucket; the whole matrices this rank owns in it."""
        item.handle.wait()
        plan, recv = item.plan, item.recv
        owned = {n: torch.empty(self.specs[n].numel, dtype=recv.dtype, device=recv.device)
                 for n in plan.names if self.plan.owner[n] == self.rank}
        for n, lo, hi, at in plan.unpack_gather:
            owned[n][lo:hi].copy_(recv[at : at + hi - lo])
        return {n: (self.orders[n].to_matrix(t) if n in self.orders else t).view(self.specs[n].shape)
                for n, t in owned.items()}

    @phases.announces()
    def _post_scatter(self, plan: _BucketPlan, results: dict[str, torch.Tensor], like: torch.Tensor, phase: str):
        """Send each rank its piece of this rank's owner results; returns (recv buffer, handle)."""
        send_splits, recv_splits = self._splits(plan, plan.back_send_splits), self._splits(plan, plan.back_recv_splits)
        send = self._buffer(plan, sum(send_splits), like)
        flat = {n: self.orders[n].to_flat(results[n]) if n in self.orders else results[n].reshape(-1)
                for n in plan.names if self.plan.owner[n] == self.rank}
        for n, lo, hi, at in plan.pack_scatter:
            send[at : at + hi - lo].copy_(flat[n][lo:hi])
        if plan.local:
            return send, _Done()
        recv = torch.empty(sum(recv_splits), dtype=like.dtype, device=like.device)
        return recv, self.coll.all_to_all(recv, send, recv_splits, send_splits, phase)

    def _unpack_scatter(self, plan: _BucketPlan, recv: torch.Tensor, handle, out: dict[str, torch.Tensor]) -> None:
        handle.wait()
        for n, at, k in plan.unpack_scatter:
            out[n] = recv[at : at + k]

    # ------------------------------------------------------------------ MatrixExchange
    def launch_gather(self, pieces: list[LocalPiece], tensors: list[torch.Tensor], phase: str) -> PendingGather:
        """Post every bucket's gather at once (async); see :class:`PendingGather`."""
        if not pieces:
            return PendingGather(self, [])
        names, where = self._index(pieces, tensors)
        plans = self._buckets(names, tensors[0].element_size())
        return PendingGather(self, [self._post_gather(p, tensors, where, phase) for p in plans])

    def gather(self, pieces: list[LocalPiece], tensors: list[torch.Tensor], phase: str) -> dict[str, torch.Tensor]:
        pending = self.launch_gather(pieces, tensors, phase)
        return pending.map(lambda names, mats: mats)

    def scatter(self, pieces: list[LocalPiece], owned: dict[str, torch.Tensor], phase: str) -> list[torch.Tensor]:
        if not pieces:
            return []
        like = next(iter(owned.values())) if owned else pieces[0].param
        names, where = self._index(pieces, [torch.empty(p.stop - p.start, dtype=like.dtype) for p in pieces])
        posted = [(plan, *self._post_scatter(plan, owned, like, phase)) for plan in self._buckets(names, like.element_size())]
        out: dict[str, torch.Tensor] = {}
        for plan, recv, handle in posted:
            self._unpack_scatter(plan, recv, handle, out)
        return [out[p.name] for p in pieces]

    def apply(self, pieces: list[LocalPiece], tensors: list[torch.Tensor],
              fn: Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]], gather_phase: str,
              scatter_phase: str) -> list[torch.Tensor]:
        """Gather → ``fn(names, whole matrices)`` on the owner → scatter, pipelined over buckets:
        ``window`` gathers are in flight while ``fn`` runs on the bucket that arrived, and each
        bucket's results are sent back at once. Returns this rank's piece of each result,
        aligned with ``pieces``."""
        if not pieces:
            return []
        names, where = self._index(pieces, tensors)
        plans = self._buckets(names, tensors[0].element_size())
        inflight: dict[int, _Launched] = {}
        for i in range(min(self.window, len(plans))):
            inflight[i] = self._post_gather(plans[i], tensors, where, gather_phase)
        scatters = []
        for i, plan in enumerate(plans):
            owned = self._assemble(inflight.pop(i))
            if i + self.window < len(plans):
                j = i + self.window
                inflight[j] = self._post_gather(plans[j], tensors, where, gather_phase)
            mine = list(owned)
            results = dict(zip(mine, fn(mine, [owned[n] for n in mine]))) if mine else {}
            scatters.append((plan, *self._post_scatter(plan, results, tensors[0], scatter_phase)))
        out: dict[str, torch.Tensor] = {}
        for plan, recv, handle in scatters:
            self._unpack_scatter(plan, recv, handle, out)
        return [out[p.name] for p in pieces]

    def owned(self, pieces: list[LocalPiece]) -> list[str]:
        """Names of the matrices among ``pieces`` this rank owns (the ownership plan's)."""
        return [p.name for p in pieces if self.plan.owner[p.name] == self.rank]

    def optimum_sent_elements(self, names: Iterable[str] | None = None) -> int:
        """Elements this rank must send per gather+scatter of ``names`` (default: all hidden)
        under any owner scheme with this layout and plan: its pieces of matrices owned
        elsewhere, plus, as owner, every other rank's held piece of its matrices."""
        total = 0
        for n in names or self.specs:
            if self.plan.owner[n] == self.rank:
                total += sum(self._held_len(n, d) for d in range(self.world) if d != self.rank)
            else:
                total += self._len(n, self.rank)
        return total
