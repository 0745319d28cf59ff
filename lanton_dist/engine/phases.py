"""Phases announced by the engine: every stage of a step is wrapped in :func:`phase`, which opens a
``torch.profiler.record_function("lanton/<name>")`` range (seen by ``torch.profiler`` and Nsight)
and tells every :func:`subscribe`-d callback ``fn(name, "begin")`` / ``fn(name, "end")``.

Zero cost when unused: with no subscriber and no active ``torch.profiler`` session, :func:`phase`
is one list test and one flag read. Subscribers are process-wide (every engine in the process
announces to every subscriber) and run on the thread announcing — the owners' background thread
of a deferred variance too, so a callback must be thread-safe or ignore foreign threads. A
callback must not raise; an exception propagates into the optimizer step.

Phases (names are stable: the profiler and the tests key on them; ``tests/test_phases.py``):

=========================  ==============================================================
``grad_reduce``            ZeRO engine: the buckets' gradient reductions (reduce-scatter or reduces)
``grad_reduce_half``       ZeRO engine, Option II: the first half-batch's reductions
``param_gather``           ZeRO engine: the gather of the updated chunks into the parameters
``early_owner_step``       ZeRO engine, during backward: an owner step started as its bucket
                           lands (momentum copy + ``polar``; committed by the next ``core``)
``core``                   :meth:`ShardedCore.step` (the phases below nest inside it)
``agree``                  the job-wide skip/presence vote (the step's one host read)
``variance_finish``        completing a pending variance reduction (owners' norms of a
                           deferred one, the all-reduce wait, trackers H, rate factors)
``momentum``               momentum of every stepped elementwise piece, and of each hidden
                           matrix on its owner (inside ``lmo``: the owner step)
``lmo``                    hidden directions: gradient pieces to owners, owner step, back
``polar``                  the owner's Newton–Schulz on whole matrices (inside ``lmo``)
``variance_estimate``      estimation step: differences, gathers, norms, all-reduce launch
``dual_norms``             the owner's nuclear norms (on the owners' thread when deferred)
``update``                 the parameter update (weight decay + scaled direction; AdamW's step)
``lmo_gather``,            all-to-all exchange (FSDP2/DeepSpeed/fairscale) and Megatron's TP
``lmo_scatter``,           exchange: packing and posting pieces to the owners / results back
``variance_gather``        (named as the collectives they post; ``variance_gather``: Option II
                           only, its half-batch differences)
=========================  ==============================================================
"""
from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch

#: ``fn(phase, "begin" | "end")``.
PhaseCallback = Callable[[str, str], None]
F = TypeVar("F", bound=Callable[..., Any])

_subscribers: list[PhaseCallback] = []
_lock = threading.Lock()


class Subscription:
    """Handle returned by :func:`subscribe`; :meth:`remove` stops the callbacks (idempotent)."""

    def __init__(self, fn: PhaseCallback) -> None:
        self._fn: PhaseCallback | None = fn

    def remove(self) -> None:
        global _subscribers
        fn, self._fn = self._fn, None
        if fn is not None:
            with _lock:  # copy-on-write: an announcement iterating the old list is unaffected
                _subscribers = [f for f in _subscribers if f is not fn]


def subscribe(fn: PhaseCallback) -> Subscription:
    """Call ``fn(phase, "begin"|"end")`` around every phase announced in this process."""
    global _subscribers
    with _lock:
        _subscribers = [*_subscribers, fn]
    return Subscription(fn)


@contextmanager
def _announced(name: str, subscribers: list[PhaseCallback]) -> Iterator[None]:
    with torch.profiler.record_function(f"lanton/{name}"):
        for fn in subscribers:
            fn(name, "begin")
        try:
            yield
        finally:
            for fn in subscribers:
                fn(name, "end")


_SILENT = nullcontext()  # what phase() returns when nobody listens (reusable)


def phase(name: str):
    """Context manager announcing phase ``name`` (module doc)."""
    subscribers = _subscribers
    if not subscribers and not torch.autograd._profiler_enabled():
        return _SILENT
    return _announced(name, subscribers)


def announces(name: str | None = None) -> Callable[[F], F]:
    """Decorator: the call is phase ``name``; ``None``: the phase is the call's ``phase``
    argument (methods that take the phase they run as, e.g. ``_reduce_scatter(…, phase)``)."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn) if name is None else None

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _subscribers and not torch.autograd._profiler_enabled():
                return fn(*args, **kwargs)
            label = name if sig is None else str(sig.bind(*args, **kwargs).arguments["phase"])
            with _announced(label, _subscribers):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return wrap
