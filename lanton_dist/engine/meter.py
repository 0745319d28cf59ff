"""Communication meter and the metered collectives every engine and adapter issues.

Each collective is recorded with its op, phase, process group, element count and two byte
figures:

* ``tensor_bytes`` — size of the collective's full buffer (the reduce-scatter input, the
  all-gather output, the all-reduce tensor, the all-to-all send buffer of this rank);
* ``sent_bytes`` — bytes this rank sends under the standard algorithms: ring reduce-scatter
  and all-gather ``(W−1)·N/W``, ring all-reduce ``2·(W−1)·⌈N/W⌉``, all-to-all the send
  buffer minus the part addressed to itself, ring (chain) reduce ``N`` on every rank but the
  root, ring broadcast ``N`` on every rank but the root's ring predecessor ``(root − 1) mod W``
  (so the ring's total is ``(W−1)·N`` for both, as for a reduce-scatter of ``W·N``). All
  integers (``N`` is padded to ``W``).

Phases: ``grad_reduce``, ``param_gather``, ``lmo_gather``/``lmo_scatter`` (adapters moving
matrix shards to owners and back), and the scalar phases ``finite`` (the skip-step vote), ``norm`` (vector-group ‖B‖₂) and
``variance`` (dual-norm contributions on estimation steps); with split Newton–Schulz
(:mod:`lanton_dist.engine.splitns`) ``ns_split_scatter`` / ``ns_split_gather`` (column blocks
to a matrix's team and back) and ``ns_gram`` / ``ns_gram_gather`` (per quintic step, over the
team). :data:`SCALAR_PHASES` are the small per-layer reductions; everything else is tensor traffic.

:class:`CommMeter` holds bounded memory however many steps run: running totals per phase, the
per-phase sums of the last ``summary_window`` steps and the full records of the last ``window``
steps and of construction (``docs/scale_costs.md``).

:class:`Collectives` also turns a failure on any rank into an error on every rank that
names it: a rank that raises publishes ``rank R: <error>`` in the process group's store and
peers whose collectives then fail (or time out) re-raise with that message.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported on first use, so sent_bytes (the planner's) is torch-free
    import torch
    import torch.distributed as dist


def _dist():
    """``torch.distributed``, imported on first use."""
    import torch.distributed as dist

    return dist


# torch >= 2.12 names; older releases only have the *_tensor spellings. Resolved on first use and
# then kept as the module attributes ``_REDUCE_SCATTER`` / ``_ALL_GATHER``.
_COLLECTIVE_NAMES: dict[str, tuple[str, str]] = {
    "_REDUCE_SCATTER": ("reduce_scatter_single", "reduce_scatter_tensor"),
    "_ALL_GATHER": ("all_gather_single", "all_gather_into_tensor"),
}


def _collective(name: str):
    fn = globals().get(name)
    if fn is None:
        dist = _dist()
        new, old = _COLLECTIVE_NAMES[name]
        fn = globals()[name] = getattr(dist, new, None) or getattr(dist, old)
    return fn


def __getattr__(name: str) -> Any:
    if name in _COLLECTIVE_NAMES:
        return _collective(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SCALAR_PHASES = frozenset({"finite", "norm", "variance"})
ERROR_KEY = "lanton_dist/error"


@dataclass(frozen=True)
class CommRecord:
    step: int
    op: str
    phase: str
    group: str
    group_size: int
    numel: int
    elem_size: int
    tensor_bytes: int
    sent_bytes: int


def sent_bytes(op: str, numel: int, elem_size: int, world: int, self_numel: int = 0) -> int:
    """Bytes one rank sends for ``op`` on ``numel`` elements over ``world`` ranks (see module doc)."""
    if world == 1:
        return 0
    if op in ("reduce_scatter", "all_gather"):
        return (world - 1) * (numel // world) * elem_size
    if op == "all_reduce":
        return 2 * (world - 1) * math.ceil(numel / world) * elem_size
    if op in ("all_to_all", "reduce", "broadcast"):
        return (numel - self_numel) * elem_size
    raise ValueError(f"unknown collective {op!r}")


#: Steps whose full records a :class:`CommMeter` keeps by default (besides construction, step 0).
RECORD_WINDOW = 32
#: Steps whose per-phase sums a :class:`CommMeter` keeps by default (besides step 0).
SUMMARY_WINDOW = 1024

_FIELDS = {"count": 0, "tensor_bytes": 1, "sent_bytes": 2}


class CommMeter:
    """Records :class:`CommRecord` per step. ``step`` is set by the engine before each step.

    Memory is bounded, whatever the number of steps (``docs/scale_costs.md``):

    * the running sums over all steps (count, ``tensor_bytes``, ``sent_bytes`` per phase):
      :meth:`by_phase` / :meth:`tensor_bytes` / :meth:`scalar_bytes` with ``step=None``;
    * the per-phase sums of the last ``summary_window`` steps that recorded something:
      the same methods for one step;
    * the full records of the last ``window`` such steps: :attr:`records`, :meth:`for_step`,
      :meth:`to_json` (record-for-record comparisons with the planner).

    Construction (step 0) is always kept whole (its collectives are bounded by the model). A
    question about a step whose data was dropped raises ``KeyError`` naming the window — never
    a silently empty answer. A step is "recorded" once its first collective arrives; steps
    are evicted oldest first.
    """

    def __init__(self, window: int = RECORD_WINDOW, summary_window: int = SUMMARY_WINDOW) -> None:
        if window < 1 or summary_window < window:
            raise ValueError(f"need 1 <= window <= summary_window, got window={window}, summary_window={summary_window}")
        self.window, self.summary_window = window, summary_window
        self.step = 0
        self._records: dict[int, list[CommRecord]] = {}       # step → its records (≤ window + 1 steps)
        self._sums: dict[int, dict[str, list[int]]] = {}     # step → phase → [count, tensor, sent]
        self._total: dict[str, list[int]] = {}               # phase → [count, tensor, sent], all steps
        self._dropped = {"records": 0, "sums": 0}             # steps below this lost their records / sums

    def add(self, record: CommRecord) -> None:
        step = record.step
        recs = self._records.get(step)
        if recs is None:
            recs = self._records[step] = []
            self._evict(self._records, self.window, "records")
        recs.append(record)
        sums = self._sums.get(step)
        if sums is None:
            sums = self._sums[step] = {}
            self._evict(self._sums, self.summary_window, "sums")
        for acc in (sums.setdefault(record.phase, [0, 0, 0]), self._total.setdefault(record.phase, [0, 0, 0])):
            acc[0] += 1
            acc[1] += record.tensor_bytes
            acc[2] += record.sent_bytes

    def _evict(self, kept: dict[int, Any], limit: int, kind: str) -> None:
        """Drop the oldest steps of ``kept`` (never step 0) beyond ``limit``."""
        while len(kept) - (0 in kept) > limit:
            oldest = next(s for s in kept if s != 0)
            del kept[oldest]
            self._dropped[kind] = max(self._dropped[kind], oldest + 1)

    def _kept(self, kept: dict[int, Any], step: int, kind: str, limit: int) -> Any:
        if step in kept:
            return kept[step]
        if 0 < step < self._dropped[kind]:
            raise KeyError(f"step {step}: the meter keeps the {kind} of the last {limit} steps only "
                           f"(CommMeter(window=..., summary_window=...))")
        return None

    @property
    def records(self) -> list[CommRecord]:
        """Every kept record (construction and the last ``window`` steps), in order."""
        return [r for recs in self._records.values() for r in recs]

    def for_step(self, step: int) -> list[CommRecord]:
        return list(self._kept(self._records, step, "records", self.window) or [])

    def by_phase(self, step: int | None = None, key: str = "sent_bytes") -> dict[str, int]:
        """Sum of ``key`` (``sent_bytes``, ``tensor_bytes`` or ``count``) per phase, over one step or all."""
        if key not in _FIELDS:
            raise ValueError(f"by_phase sums one of {sorted(_FIELDS)}, not {key!r}")
        k = _FIELDS[key]
        sums = self._total if step is None else (self._kept(self._sums, step, "sums", self.summary_window) or {})
        return {phase: acc[k] for phase, acc in sums.items()}

    def tensor_bytes(self, step: int | None = None, key: str = "sent_bytes") -> int:
        """Bytes of the non-scalar phases (what the AdamW comparison is about)."""
        return sum(v for p, v in self.by_phase(step, key).items() if p not in SCALAR_PHASES)

    def scalar_bytes(self, step: int | None = None, key: str = "sent_bytes") -> int:
        return sum(v for p, v in self.by_phase(step, key).items() if p in SCALAR_PHASES)

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def reset(self) -> None:
        self._records.clear()
        self._sums.clear()
        self._total.clear()
        self._dropped = {"records": 0, "sums": 0}


class Handle:
    """An async work handle whose ``wait`` turns peer failures into named errors."""

    def __init__(self, coll: "Collectives", work, op: str) -> None:
        self._coll, self._work, self._op = coll, work, op

    def wait(self) -> None:
        if self._work is None:
            return
        try:
            self._work.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised with the failing rank's name
            self._coll.raise_peer_error(exc, self._op)
        finally:
            self._work = None


class Chunks:
    """One chunk per rank of a flat buffer, built once — a step's uneven collective
    (:meth:`Collectives.reduce_chunks` / :meth:`Collectives.broadcast_chunks`) then does Python
    work only per non-empty chunk, never per rank.

    Rank ``q``'s chunk is ``buf[start + Σ segments[:q] :][: segments[q]]``. ``views``: the
    ``world`` chunks in rank order, as torch's uneven collectives take them — a 1-D view per
    non-empty chunk and ONE shared empty view for all the empty ones (so the memory is a list of
    references, not a tensor per rank); ``nonempty``: ``(rank, view)`` of the non-empty ones.
    """

    def __init__(self, buf: torch.Tensor, start: int, segments: Sequence[int]) -> None:
        self._spans: list[tuple[int, int, int]] = []  # (rank, offset, numel) of the non-empty chunks
        pos = start
        for q, n in enumerate(segments):
            if n:
                self._spans.append((q, pos, n))
            pos += n
        self._world, self._start = len(segments), start
        self._place(buf)

    def _place(self, buf: torch.Tensor) -> None:
        self.views = [buf[self._start : self._start]] * self._world
        self.nonempty = []
        for q, at, n in self._spans:
            self.views[q] = buf[at : at + n]
            self.nonempty.append((q, self.views[q]))

    def on(self, buf: torch.Tensor) -> "Chunks":
        """The same chunks of another buffer of the same layout (Python work per non-empty chunk)."""
        other = object.__new__(Chunks)
        other._spans, other._world, other._start = self._spans, self._world, self._start
        other._place(buf)
        return other


class Collectives:
    """Metered wrappers over ``torch.distributed`` for one process group (``None``: default group)."""

    def __init__(self, meter: CommMeter, group: dist.ProcessGroup | None = None, name: str = "dp") -> None:
        self.meter, self.group, self.name = meter, group, name
        dist = _dist()
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    # -- bookkeeping
    def _record(self, op: str, phase: str, t: torch.Tensor, self_numel: int = 0) -> None:
        n, e = t.numel(), t.element_size()
        self.meter.add(CommRecord(self.meter.step, op, phase, self.name, self.world, n, e, n * e,
                                  sent_bytes(op, n, e, self.world, self_numel)))

    def _process_group(self) -> dist.ProcessGroup:
        """The process group object: uneven collectives call its methods directly, as torch's
        Python wrappers do after checking every tensor of the list in Python (per rank, per call:
        ~15 ms at W = 1,024 for each uneven bucket)."""
        return self.group if self.group is not None else _dist().group.WORLD

    def _run(self, op: str, fn):
        try:
            return Handle(self, fn(), op)
        except Exception as exc:  # noqa: BLE001
            self.raise_peer_error(exc, op)

    def raise_peer_error(self, exc: BaseException, op: str) -> None:
        """Re-raise ``exc`` naming the rank that failed first, if one published an error."""
        msg = peer_error()
        if msg:
            raise RuntimeError(f"lanton_dist: {op} aborted because {msg}") from exc
        raise exc

    def publish_error(self, exc: BaseException) -> None:
        publish_error(exc)

    # -- collectives (all return a handle; call .wait())
    def all_reduce(self, t: torch.Tensor, phase: str, op: dist.ReduceOp | None = None) -> Handle:
        """All-reduce ``t`` in place with ``op`` (None: ``ReduceOp.SUM``)."""
        self._record("all_reduce", phase, t)
        if self.world == 1:
            return Handle(self, None, "all_reduce")
        dist = _dist()
        if op is None:
            op = dist.ReduceOp.SUM
        return self._run("all_reduce", lambda: dist.all_reduce(t, op=op, group=self.group, async_op=True))

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, phase: str) -> Handle:
        """SUM reduce-scatter of ``inp`` (``world·n``) into ``out`` (``n``)."""
        self._record("reduce_scatter", phase, inp)
        if self.world == 1:
            out.copy_(inp)
            return Handle(self, None, "reduce_scatter")
        return self._run("reduce_scatter", lambda: _collective("_REDUCE_SCATTER")(out, inp, group=self.group, async_op=True))

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, phase: str) -> Handle:
        """All-gather ``inp`` (``n``) into ``out`` (``world·n``); ``inp`` may be ``out``'s own slice."""
        self._record("all_gather", phase, out)
        if self.world == 1:
            if out.data_ptr() != inp.data_ptr():
                out.copy_(inp)
            return Handle(self, None, "all_gather")
        return self._run("all_gather", lambda: _collective("_ALL_GATHER")(out, inp, group=self.group, async_op=True))

    def reduce_chunks(self, chunks: Chunks, phase: str) -> list[Handle]:
        """SUM-reduce ``chunks.views[q]`` onto group rank ``q``, for every ``q`` at once, in place
        (one chunk per rank, sizes every rank agrees on, possibly unequal or empty; the other
        ranks' chunks are scratch after): ONE call, ``reduce_scatter`` with uneven inputs (NCCL
        runs it as one group of per-rank reduces, gloo natively), on the process group object
        (:meth:`_process_group`). Metered as one ``reduce`` per non-empty chunk, which is what it
        moves; the Python work is per non-empty chunk."""
        for q, c in chunks.nonempty:
            self._record("reduce", phase, c, self_numel=c.numel() if self.rank == q else 0)
        if self.world == 1:
            return [Handle(self, None, "reduce")]
        dist = _dist()
        opts = dist.ReduceScatterOptions()
        opts.reduceOp, opts.asyncOp = dist.ReduceOp.SUM, True
        own, pg = chunks.views[self.rank], self._process_group()
        return [self._run("reduce", lambda: pg.reduce_scatter([own], [chunks.views], opts))]

    def broadcast_chunks(self, chunks: Chunks, phase: str) -> list[Handle]:
        """Every rank's ``chunks.views[q]`` from group rank ``q``, in place (the inverse of
        :meth:`reduce_chunks`, same sizes): ONE ``all_gather`` with uneven outputs on NCCL (a
        group of broadcasts), one broadcast per non-empty chunk elsewhere (gloo has no uneven
        all-gather). Metered as one ``broadcast`` per non-empty chunk."""
        for q, c in chunks.nonempty:
            self._record("broadcast", phase, c, self_numel=c.numel() if self.rank == (q - 1) % self.world else 0)
        if self.world == 1:
            return [Handle(self, None, "broadcast")]
        dist = _dist()
        if dist.get_backend(self.group) == "nccl":
            opts = dist.distributed_c10d.AllgatherOptions()
            opts.asyncOp = True
            own, pg = chunks.views[self.rank], self._process_group()
            return [self._run("broadcast", lambda: pg.allgather([chunks.views], [own], opts))]
        return [self._run("broadcast", lambda q=q, c=c: dist.broadcast(c, group_src=q, group=self.group, async_op=True))
                for q, c in chunks.nonempty]

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], phase: str) -> Handle:
        """``all_to_all_single`` with explicit splits (first dim)."""
        row = inp[0].numel() if inp.ndim > 1 else 1
        self._record("all_to_all", phase, inp, self_numel=in_splits[self.rank] * row)
        if self.world == 1:
            out.copy_(inp)
            return Handle(self, None, "all_to_all")
        return self._run("all_to_all", lambda: _dist().all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True))


def peer_error() -> str | None:
    """The first failure a rank published in the default group's store, if any."""
    store = _default_store()
    if store is None:
        return None
    try:
        store.set_timeout(timedelta(seconds=2))
        if store.check([ERROR_KEY]):
            return store.get(ERROR_KEY).decode()
    except Exception:  # noqa: BLE001 - the store may be gone with the failed rank
        return None
    return None


def publish_error(exc: BaseException) -> None:
    """Tell every peer that this rank failed (first writer wins)."""
    store = _default_store()
    if store is not None:
        try:
            store.compare_set(ERROR_KEY, "", f"rank {_dist().get_rank()} raised {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            pass


@contextmanager
def fail_fast() -> Iterator[None]:
    """Wrap a training step (forward, backward, optimizer step): an exception on this rank is
    published before it propagates, so peers blocked in a collective fail naming this rank
    instead of waiting for the timeout or reporting a bare connection error."""
    try:
        yield
    except BaseException as exc:
        publish_error(exc)
        raise


def _default_store():
    dist = _dist()
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None
