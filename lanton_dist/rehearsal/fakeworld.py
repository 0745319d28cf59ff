"""The fake world: one CPU process plays rank ``r`` of ``W`` with no GPU and no peers.

* :func:`init_fake_world` — torch's fake process group (``FakeStore`` + backend ``"fake"``):
  every collective returns at once and moves nothing. Only one default group fits in a
  process, so the rehearsal runs one process per sampled rank (:mod:`.runner`).
* :func:`meta_model` — :class:`lanton_dist.model.Transformer` on the ``meta`` device: shapes,
  dtypes and storages without bytes, so a 70B model "fits" and every kernel is shape-only.
* :func:`meta_skip_vote` — THE ONE SEAM: the engine core reads its job-wide skip/presence vote
  on the host once per step (``vec.tolist()`` in ``ShardedCore._agree``), which a meta tensor
  cannot do. Inside this context that read (and only that read: the caller must be
  ``_agree`` of :mod:`lanton_dist.engine.core`) returns "no rank saw a non-finite gradient,
  every parameter has a gradient" and is counted; any other host read of a meta tensor
  still fails loudly. What the rehearsal therefore does not cover: skipped steps, missing
  gradients and clipping decisions (the values of the vote).
* :func:`gathered_objects` — records a digest of every object this rank contributes to
  ``all_gather_object`` (see the fake backend's behaviour below).

The fake backend's own behaviour, handled here and never reported as ours
(:data:`FAKE_BACKEND_NOTES`):

1. ``all_gather_object`` returns W copies of the local object, so a same-model check can never
   fail on it: the rehearsal digests each rank's contributed objects and compares the digests
   across the sampled ranks instead (:mod:`.compare`). Where an object differs by rank by
   design (FSDP2's block layout), the stack supplies every rank's own (:func:`gathered_objects`).
2. ``reduce_scatter`` leaves its outputs uninitialised: on meta tensors there are no values
   to read, and the rehearsal reads none (bytes and records only).
3. An all-to-all with an empty input and a non-empty output is refused by the fake backend
   (NCCL accepts it): :func:`nccl_all_to_all` completes it, as NCCL would (the call is still
   metered and digested as issued).
"""
from __future__ import annotations

import hashlib
import pickle
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lanton_dist.config import ModelConfig

FAKE_BACKEND_NOTES: tuple[str, ...] = (
    "all_gather_object returns W copies of the local object: the same-model check cannot fail on the fake "
    "backend, so each rank's contributed objects are digested and the digests compared across sampled ranks; "
    "FSDP2's per-rank block layout is supplied for every rank as that rank computes it",
    "reduce_scatter leaves outputs uninitialised: meta tensors hold no values and the rehearsal reads none",
    "an all-to-all with empty input and non-empty output is refused by the fake backend (NCCL accepts it): "
    "the rehearsal completes it as NCCL would",
)

#: What the rehearsal does not cover because of :func:`meta_skip_vote`.
SEAM_NOTE = ("the core's one host read per step (the skip/presence vote, ShardedCore._agree) is answered "
             "'no skip, every parameter present' on meta tensors: skipped steps, missing gradients and "
             "clipping decisions are not rehearsed")


def init_fake_world(rank: int, world: int) -> None:
    """Make this process rank ``rank`` of a fake ``world``-rank default process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The training model of ``cfg`` with every parameter on the ``meta`` device (no bytes)."""
    from lanton_dist.model import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


@dataclass
class HostReads:
    """Host reads of the skip vote answered by :func:`meta_skip_vote` (one entry per read: its length)."""

    reads: list[int] = field(default_factory=list)


def _is_skip_vote_read(frame: Any) -> bool:
    code = frame.f_code
    return code.co_name == "_agree" and frame.f_globals.get("__name__") == "lanton_dist.engine.core"


@contextmanager
def meta_skip_vote() -> Iterator[HostReads]:
    """Answer the engine core's skip-vote host read on meta tensors (module doc); counts reads."""
    log = HostReads()
    real = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        if self.is_meta and self.ndim == 1 and _is_skip_vote_read(sys._getframe(1)):
            log.reads.append(self.numel())
            return [0.0] + [1.0] * (self.numel() - 1)  # [non-finite count, presence flags…]
        return real(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield log
    finally:
        torch.Tensor.tolist = real  # type: ignore[method-assign]


def digest(obj: Any) -> str:
    """A short, stable digest of a picklable object (sha256 of its pickle, 16 hex digits)."""
    return hashlib.sha256(pickle.dumps(obj, protocol=4)).hexdigest()[:16]


@contextmanager
def gathered_objects(peers: Callable[[], Callable[[Any, int], Any] | None] = lambda: None) -> Iterator[list[str]]:
    """Record the digest of every object this rank contributes to a construction-time agreement:
    ``dist.all_gather_object``, the engine's same-model check (:func:`lanton_dist.engine.agree.check_same`)
    and its job-wide union of pipeline stages' parameter lists (:func:`~lanton_dist.engine.agree.distinct_union`)
    — of the whole gathered list where ``peers`` supplies it.

    ``peers()``: None, or ``contribution(obj, q)``: the object rank ``q`` passes in the call
    where this rank passes ``obj``, or None for a call it does not know. For a known call the
    result is built from every rank's contribution instead of the fake backend's (which sees
    only this rank's: W copies from ``all_gather_object``, this rank's list alone from the
    union's all-reduce and broadcast rounds)."""
    from lanton_dist.engine import agree

    seen: list[str] = []
    real_gather, real_same, real_union = dist.all_gather_object, agree.check_same, agree.distinct_union

    def everyone(obj: Any, group: Any) -> list[Any] | None:
        contribution = peers()
        if contribution is None or contribution(obj, dist.get_rank(group)) is None:
            return None
        return [contribution(obj, q) for q in range(dist.get_world_size(group))]

    def recording(object_list: list[Any], obj: Any, group: Any = None) -> None:
        known = everyone(obj, group)
        if known is not None:
            object_list[:] = known
            seen.append(digest(object_list))   # per-rank objects: what every rank receives must agree
            return None
        seen.append(digest(obj))
        return real_gather(object_list, obj, group=group)

    def same(obj: Any, group: Any, device: Any, what: str) -> None:
        seen.append(digest(obj))   # the digests of one group's ranks are compared across sampled ranks
        return real_same(obj, group, device, what)

    def union(local: Any, group: Any, device: Any) -> list[list[Any]]:
        known = everyone(list(local), group)
        if known is None:
            seen.append(digest(list(local)))
            return real_union(local, group, device)
        distinct = {digest(x): list(x) for x in known}
        out = [distinct[k] for k in sorted(distinct)]
        seen.append(digest(out))
        return out

    dist.all_gather_object, agree.check_same, agree.distinct_union = recording, same, union
    try:
        yield seen
    finally:
        dist.all_gather_object, agree.check_same, agree.distinct_union = real_gather, real_same, real_union


class _Done:
    """A completed collective."""

    def wait(self, *_args: Any, **_kwargs: Any) -> bool:
        return True


@contextmanager
def nccl_all_to_all() -> Iterator[None]:
    """An ``all_to_all_single`` with an empty input and a non-empty output (a rank that sends
    nothing but receives) completes as NCCL's does, instead of the fake backend's refusal
    (it moves nothing either way on the fake backend)."""
    real = dist.all_to_all_single

    def all_to_all_single(output: torch.Tensor, input: torch.Tensor, *args: Any, async_op: bool = False,
                          **kwargs: Any) -> Any:
        if input.numel() == 0 and output.numel() > 0:
            return _Done() if async_op else None
        return real(output, input, *args, async_op=async_op, **kwargs)

    dist.all_to_all_single = all_to_all_single
    try:
        yield
    finally:
        dist.all_to_all_single = real
