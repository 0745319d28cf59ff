"""Construction-time agreement across ranks in O(1) bytes per rank, whatever the world size.

Every sharded optimizer checks at construction that all ranks of its process group built the
same model and layout, and the tensor/pipeline-parallel engine collects the logical parameters
of every pipeline stage. Gathering every rank's description to every rank (``all_gather_object``)
moves W² descriptions over the job — gigabytes at W = 1,024 (``docs/scale_costs.md``). Here:

* :func:`check_same`: ONE all-reduce of a 32-byte SHA-256 digest (its eight 32-bit words
  and their negations, MIN: every rank learns the smallest and largest digest; equal means all
  agree). Only on a mismatch, a few more small collectives find the first rank that differs
  from rank 0, broadcast those two descriptions and raise on every rank an error naming the
  rank and the first entry that differs.
* :func:`distinct_union`: the distinct descriptions of all ranks (e.g. one per pipeline
  stage) in rounds of one 16-byte all-reduce plus one broadcast of the next distinct
  description, so a rank receives each distinct description once.

Tensors of these collectives live on :func:`collective_device` (the parameters' device; for
``meta`` parameters the current CUDA device on an NCCL group, else the CPU — a fake process
group accepts it), never the CPU on a CUDA group. Descriptions are compared by ``repr`` (deterministic for the tuples of strings
and integers and the dataclasses passed here).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

_WORDS = 8  # 32-bit words of a SHA-256 digest
_KEY_BITS = 40  # bits of the digest that order descriptions in distinct_union (rank in the rest)


def collective_device(device: torch.device | None, group: dist.ProcessGroup | None = None) -> torch.device:
    """Where to put a small agreement tensor: ``device`` (the parameters'); without one (None or
    ``meta``), the current CUDA device on an NCCL group, else the CPU."""
    if device is not None and device.type != "meta":
        return device
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def params_device(params: Iterable[torch.Tensor]) -> torch.device | None:
    """The device of the first parameter not on ``meta`` (None: none)."""
    return next((p.device for p in params if p.device.type != "meta"), None)


def digest_words(obj: Any) -> list[int]:
    """SHA-256 of ``repr(obj)`` as eight non-negative 32-bit integers."""
    d = hashlib.sha256(repr(obj).encode()).digest()
    return [int.from_bytes(d[4 * i : 4 * i + 4], "big") for i in range(_WORDS)]


def check_same(obj: Any, group: dist.ProcessGroup | None, device: torch.device | None, what: str) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless every rank passed an equal ``obj``.

    Common case: one all-reduce of 16 int64 (128 bytes) on ``collective_device(device)``.
    ``what`` names the object in the error (``"rank R has a different <what> (first difference
    from rank 0: ...)"``).
    """
    dev = collective_device(device, group)
    words = digest_words(obj)
    t = torch.tensor(words + [-w for w in words], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    lo_hi = t.tolist()
    if lo_hi[:_WORDS] == [-w for w in lo_hi[_WORDS:]]:
        return
    _raise_mismatch(obj, words, group, dev, what)


def _raise_mismatch(obj: Any, words: list[int], group: dist.ProcessGroup | None, dev: torch.device, what: str) -> None:
    """The digests differ: find the first rank whose ``obj`` differs from rank 0's, fetch both
    and raise the same error on every rank."""
    me, world = dist.get_rank(group), dist.get_world_size(group)
    first = torch.tensor(words if me == 0 else [0] * _WORDS, dtype=torch.int64, device=dev)
    dist.all_reduce(first, group=group)
    r = torch.tensor([world if first.tolist() == words else me], dtype=torch.int64, device=dev)
    dist.all_reduce(r, op=dist.ReduceOp.MIN, group=group)
    other = int(r.item())
    pair: list[Any] = []
    for src in (0, other):
        box = [obj if me == src else None]
        dist.broadcast_object_list(box, group_src=src, group=group, device=dev)
        pair.append(box[0])
    raise ValueError(f"rank {other} has a different {what} (first difference from rank 0: {first_difference(*pair)})")


def first_difference(a: Any, b: Any) -> str:
    """Where two descriptions first differ (entry index and both values, shortened)."""
    def short(x: Any) -> str:
        s = repr(x)
        return s if len(s) <= 200 else s[:197] + "..."

    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"entry {i}: rank 0 has {short(x)}, the other {short(y)}"
        return f"rank 0 has {len(a)} entries, the other {len(b)}"
    return f"rank 0 has {short(a)}, the other {short(b)}"


def distinct_union(local: Sequence[Any], group: dist.ProcessGroup | None, device: torch.device | None) -> list[list[Any]]:
    """The distinct values of ``local`` (a list, e.g. a pipeline stage's parameter specs) over
    the ranks of ``group``, each once, ordered by digest; the same list on every rank.

    Rounds of one all-reduce (MIN) of 16 bytes — the smallest digest key not collected yet,
    with the lowest rank holding it — and one broadcast of that rank's list; rounds = distinct
    lists + 1. A digest-key collision of two different lists raises (never a lost list).
    """
    dev = collective_device(device, group)
    me, world = dist.get_rank(group), dist.get_world_size(group)
    mine = list(local)
    words = digest_words(mine)
    key = words[0] << (_KEY_BITS - 32) | words[1] >> (64 - _KEY_BITS)  # the digest's first 40 bits
    done_key = 1 << _KEY_BITS  # larger than every key: "collected"
    rank_bits = max(1, world.bit_length())
    collected, out, clash = False, [], 0
    while True:
        mark = (done_key if collected else key) << rank_bits | me
        t = torch.tensor([mark, -clash], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        best, any_clash = t.tolist()
        if any_clash:
            raise ValueError("two different parameter lists share a digest key; rename a parameter")
        if best >> rank_bits == done_key:
            return out
        src = best & ((1 << rank_bits) - 1)
        box = [mine if me == src else None]
        dist.broadcast_object_list(box, group_src=src, group=group, device=dev)
        out.append(list(box[0]))
        if not collected and key == best >> rank_bits:
            collected = True
            clash = int(box[0] != mine)
