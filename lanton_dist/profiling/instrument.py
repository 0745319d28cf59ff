"""The one place the profiler reaches into an optimizer: :class:`Instrumentation` subscribes to the
phases the engine announces (:mod:`lanton_dist.engine.phases`) and wraps the public collective
methods of the optimizer's :class:`~lanton_dist.engine.meter.Collectives` to time their waits;
:meth:`Instrumentation.undo` unsubscribes and restores them.

What is recorded, and as which phase:

=========================================  ==================  =====================================
source                                     phase               what it is
=========================================  ==================  =====================================
every phase a sharded optimizer announces  its name            ``grad_reduce``, ``core``, ``lmo``,
(:mod:`lanton_dist.engine.phases`)                             ``variance_estimate``, ``param_gather``…
``coll.<all_reduce|reduce_chunks|…>``      ``wait:<phase>``    time blocked in ``handle.wait()``
step pre/post hooks (``hooks=True``)       ``optimizer_step``  the whole ``step()``
=========================================  ==================  =====================================

Phases are recorded only for a :class:`~lanton_dist.engine.optimizer.ShardedOptimizer` and only
on the thread that attached (the owners' background thread of a deferred variance is not
timed); any other ``torch.optim.Optimizer`` records ``optimizer_step`` (and user phases) only.
Collective waits are timed by wrapping the *public* ``Collectives`` methods of ``optimizer.coll``
(or ``optimizer.core.coll``): a handle's ``wait()`` is where a phase blocks, and no phase
announcement sees it.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lanton_dist.profiling.timers import Mark, Profiler

#: Collectives of the engine's :class:`~lanton_dist.engine.meter.Collectives` whose waits are timed.
_COLL_OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "reduce_chunks", "broadcast_chunks")
#: The attribute marking an optimizer as instrumented (one profiler per optimizer).
_MARK = "_lanton_profiler"


class _TimedHandle:
    """A collective's async handle whose ``wait()`` is timed as ``wait:<phase>``."""

    def __init__(self, prof: Profiler, inner: Any, phase: str, launch: Mark) -> None:
        self._prof, self._inner, self._phase, self._launch = prof, inner, phase, launch

    def wait(self) -> None:
        before = self._prof.timer.mark()
        try:
            self._inner.wait()
        finally:
            after = self._prof.timer.mark()
            self._prof.add_wait(self._phase, self._launch, before, after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Instrumentation:
    """Instrument ``optimizer`` for ``prof`` (module doc); ``hooks``: also register step pre/post
    hooks calling :meth:`Profiler.begin_step`/:meth:`Profiler.end_step`. Raises ``RuntimeError``
    if the optimizer already has a profiler."""

    def __init__(self, prof: Profiler, optimizer: Any, hooks: bool = True) -> None:
        from lanton_dist.engine import phases
        from lanton_dist.engine.optimizer import ShardedOptimizer

        if getattr(optimizer, _MARK, None) is not None:
            raise RuntimeError("this optimizer already has a profiler attached")
        self._prof = prof
        self._patched: list[tuple[Any, str, Any]] = []
        self._hooks: list[Any] = []
        self._open: list[tuple[str, contextlib.AbstractContextManager]] = []  # phases begun, innermost last
        self._thread = threading.get_ident()
        self._set(optimizer, _MARK, prof)
        self._subscription = phases.subscribe(self._on_phase) if isinstance(optimizer, ShardedOptimizer) else None
        core = getattr(optimizer, "core", None)
        coll = getattr(optimizer, "coll", None) or getattr(core, "coll", None)
        if coll is not None:
            for op in _COLL_OPS:
                if callable(getattr(coll, op, None)):
                    self._wrap_collective(coll, op)
        if hooks:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: prof.begin_step()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: prof.end_step()))

    def undo(self) -> None:
        """Unsubscribe, restore every wrapped attribute, drop the mark and remove the hooks."""
        if self._subscription is not None:
            self._subscription.remove()
            self._subscription = None
        for obj, name, orig in reversed(self._patched):
            if orig is None:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, orig)
        for h in self._hooks:
            h.remove()
        self._patched.clear()
        self._hooks.clear()

    def _on_phase(self, name: str, event: str) -> None:
        """Phase callback: a begun phase opens a :meth:`Profiler.phase` interval, its end closes it."""
        if threading.get_ident() != self._thread:
            return
        if event == "begin":
            cm = self._prof.phase(name)
            cm.__enter__()
            self._open.append((name, cm))
        elif self._open and self._open[-1][0] == name:
            self._open.pop()[1].__exit__(None, None, None)

    def _set(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` (an instance attribute), remembering what :meth:`undo` restores."""
        self._patched.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def _wrap_collective(self, coll: Any, op: str) -> None:
        fn, prof = getattr(coll, op), self._prof
        sig = inspect.signature(fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase = str(sig.bind(*args, **kwargs).arguments.get("phase", op))
            handle = fn(*args, **kwargs)
            launch = prof.timer.mark()  # after the launch call returned: from here the caller is free to work
            if isinstance(handle, list):  # the chunk collectives: one handle per call they issued
                return [_TimedHandle(prof, h, phase, launch) for h in handle]
            return _TimedHandle(prof, handle, phase, launch) if handle is not None else handle

        self._set(coll, op, wrapped)
