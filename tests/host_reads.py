"""Counting the ``Tensor`` methods that read a tensor's value on the host, and the tensors built
from host values (on a GPU each one stalls the CPU until the device catches up): one helper for
every test that bounds an optimizer step's syncs."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: ``Tensor`` methods that read a tensor's value on the host.
HOST_READS = ("item", "__bool__", "tolist", "cpu", "__float__", "__int__")


@contextmanager
def counting_host_reads() -> Iterator[Counter]:
    """Count calls of :data:`HOST_READS` on any tensor (any thread) inside the block; the
    methods are torch's own again afterwards (nothing left in ``torch.Tensor.__dict__``)."""
    counts: Counter = Counter()
    originals = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def counted(name: str, fn):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        yield counts
    finally:
        for name, orig in originals.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)


@contextmanager
def counting_host_copies() -> Iterator[Counter]:
    """Count ``torch.tensor(...)`` calls (any thread) inside the block under ``"tensor"``: a
    tensor built from host values, which on a GPU is a blocking host→device copy. ``torch.tensor``
    is torch's own again afterwards."""
    counts: Counter = Counter()
    original = torch.tensor

    def counted(*args, **kwargs):
        counts["tensor"] += 1
        return original(*args, **kwargs)

    torch.tensor = counted
    try:
        yield counts
    finally:
        torch.tensor = original
