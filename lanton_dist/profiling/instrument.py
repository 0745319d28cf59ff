"""The one place the profiler reaches into an optimizer: :class:`Instrumentation` wraps instance
attributes of the engine (and of adapters built on :class:`~lanton_dist.engine.core.ShardedCore`)
from outside — nothing in the engine changes — and :meth:`Instrumentation.undo` restores them.

What is wrapped, and the phase each call is timed as:

==========================================  ==================  =====================================
attribute                                   phase               what it does
==========================================  ==================  =====================================
``optimizer._reduce_scatter(phase=…)``      its ``phase`` arg   bucket packing + reduce-scatter
                                                                (``grad_reduce``, ``grad_reduce_half``)
``optimizer._all_gather_params(phase=…)``   its ``phase`` arg   all-gather of updated segments
``core.step``                               ``core``            finite vote, momentum, LMOs, update
``core._hidden_directions``                 ``lmo``             Newton–Schulz, exchanges to owners
``core._launch_variance``                   ``variance_estimate``  nuclear norms, all-reduce launch
``core.finish_variance`` (when pending)     ``variance_finish`` waiting for the variance reduction
``coll.<all_reduce|reduce_scatter|…>``      ``wait:<phase>``    time blocked in ``handle.wait()``
step pre/post hooks (``hooks=True``)        ``optimizer_step``  the whole ``step()``
==========================================  ==================  =====================================

Attributes an optimizer lacks are skipped, so any ``torch.optim.Optimizer`` can be attached (it
then records ``optimizer_step`` only). These private names are the engine's; when the engine
grows phase callbacks this module is what changes.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lanton_dist.profiling.timers import Mark, Profiler

#: Optimizer methods timed under the phase they are called with.
_OPT_PHASES = ("_reduce_scatter", "_all_gather_params")
#: Core methods timed under a fixed phase.
_CORE_PHASES = {"step": "core", "_hidden_directions": "lmo", "_launch_variance": "variance_estimate"}
#: Collectives of the engine's :class:`~lanton_dist.engine.meter.Collectives` whose waits are timed.
_COLL_OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")
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
    """Wrap ``optimizer`` for ``prof`` (module doc); ``hooks``: also register step pre/post hooks
    calling :meth:`Profiler.begin_step`/:meth:`Profiler.end_step`. Raises ``RuntimeError`` if
    the optimizer already has a profiler."""

    def __init__(self, prof: Profiler, optimizer: Any, hooks: bool = True) -> None:
        if getattr(optimizer, _MARK, None) is not None:
            raise RuntimeError("this optimizer already has a profiler attached")
        self._prof = prof
        self._patched: list[tuple[Any, str, Any]] = []
        self._hooks: list[Any] = []
        self._set(optimizer, _MARK, prof)
        for name in _OPT_PHASES:
            if callable(getattr(optimizer, name, None)):
                self._wrap_phase_arg(optimizer, name)
        core = getattr(optimizer, "core", None)
        if core is not None:
            for name, phase in _CORE_PHASES.items():
                if callable(getattr(core, name, None)):
                    self._wrap_fixed(core, name, phase)
            if callable(getattr(core, "finish_variance", None)):
                self._wrap_fixed(core, "finish_variance", "variance_finish",
                                 when=lambda: getattr(core, "_pending", None) is not None or getattr(core, "_deferred", None) is not None)
        coll = getattr(optimizer, "coll", None) or getattr(core, "coll", None)
        if coll is not None:
            for op in _COLL_OPS:
                if callable(getattr(coll, op, None)):
                    self._wrap_collective(coll, op)
        if hooks:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: prof.begin_step()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: prof.end_step()))

    def undo(self) -> None:
        """Restore every wrapped attribute, drop the mark and remove the hooks."""
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

    def _set(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` (an instance attribute), remembering what :meth:`undo` restores."""
        self._patched.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def _wrap_fixed(self, obj: Any, name: str, phase: str, when: Callable[[], bool] | None = None) -> None:
        fn, prof = getattr(obj, name), self._prof

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if when is not None and not when():
                return fn(*args, **kwargs)
            with prof.phase(phase):
                return fn(*args, **kwargs)

        self._set(obj, name, wrapped)

    def _wrap_phase_arg(self, obj: Any, name: str) -> None:
        fn, prof = getattr(obj, name), self._prof
        sig = inspect.signature(fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase = sig.bind(*args, **kwargs).arguments.get("phase", name.strip("_"))
            with prof.phase(str(phase)):
                return fn(*args, **kwargs)

        self._set(obj, name, wrapped)

    def _wrap_collective(self, coll: Any, op: str) -> None:
        fn, prof = getattr(coll, op), self._prof
        sig = inspect.signature(fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase = str(sig.bind(*args, **kwargs).arguments.get("phase", op))
            handle = fn(*args, **kwargs)
            launch = prof.timer.mark()  # after the launch call returned: from here the caller is free to work
            return _TimedHandle(prof, handle, phase, launch) if handle is not None else handle

        self._set(coll, op, wrapped)
