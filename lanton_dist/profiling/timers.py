"""Phase timing of optimizer steps on one process: :class:`PhaseTimer` (CUDA events on a GPU,
resolved lazily so profiling adds no synchronisation to a step; ``time.perf_counter`` on CPU; all
times mapped to epoch seconds so ranks and NVML samples share one time axis) and
:class:`Profiler`, which turns each step's intervals, collective waits and meter bytes into a
record (:mod:`lanton_dist.profiling`). What it times inside an optimizer is wired up by
:mod:`lanton_dist.profiling.instrument`."""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lanton_dist.profiling.instrument import Instrumentation

# ============================================================================ timing
@dataclass
class Mark:
    """A point in time: epoch seconds (CPU) and, on GPU, a recorded CUDA event."""

    wall: float
    event: Any = None


class PhaseTimer:
    """Named intervals on one process (module doc). ``device``: where the step's work runs."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev.type == "cuda" and torch.cuda.is_available()
        self._perf0, self._wall0 = time.perf_counter(), time.time()

    def wall(self) -> float:
        """Epoch seconds from the monotonic clock (immune to wall-clock steps)."""
        return self._wall0 + (time.perf_counter() - self._perf0)

    def mark(self) -> Mark:
        m = Mark(self.wall())
        if self.cuda:
            m.event = torch.cuda.Event(enable_timing=True)
            m.event.record()
        return m

    @staticmethod
    def ready(marks: Sequence[Mark]) -> bool:
        return all(m.event is None or m.event.query() for m in marks)

    @staticmethod
    def seconds(a: Mark, b: Mark) -> float:
        """Duration from ``a`` to ``b`` (CUDA events when both have one; call when :meth:`ready`)."""
        if a.event is not None and b.event is not None:
            return a.event.elapsed_time(b.event) / 1e3
        return b.wall - a.wall

    def epoch(self, anchor: Mark, m: Mark) -> float:
        """Epoch time of ``m``: on GPU the anchor's CPU time plus the event offset."""
        if anchor.event is not None and m.event is not None:
            return anchor.wall + anchor.event.elapsed_time(m.event) / 1e3
        return m.wall


@dataclass
class _Raw:
    """An unresolved step: marks of intervals and waits, the meter's figures."""

    step: int
    begin: Mark
    end: Mark
    prev_end: Mark | None
    intervals: list[tuple[str, Mark, Mark]]
    waits: list[tuple[str, Mark, Mark, Mark]]   # phase, launch, wait start, wait end
    info: dict[str, Any]


class Profiler:
    """Per-process step profiler (:mod:`lanton_dist.profiling`).

    Args:
        rank, world: this process's place (default: from ``torch.distributed`` or ``RANK``).
        device: where the model runs (CUDA events there), default CPU.
        label: a name for this optimizer in the records.
    """

    def __init__(self, rank: int | None = None, world: int | None = None, device: torch.device | str | None = None,
                 label: str = "") -> None:
        import torch.distributed as dist

        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if world is None:
            world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.world, self.label = rank, world, label
        self.timer = PhaseTimer(device)
        self.records: list[dict[str, Any]] = []
        self.meter = None
        self.optimizer_name = ""
        self._raw: list[_Raw] = []
        self._cur: _Raw | None = None
        self._between: list[tuple[str, Mark, Mark]] = []
        self._between_waits: list[tuple[str, Mark, Mark, Mark]] = []
        self._prev_end: Mark | None = None
        self._count = 0
        self._instrumentation: list[Instrumentation] = []

    # ------------------------------------------------------------------ instrumentation
    def attach(self, optimizer: Any, hooks: bool = True) -> "Profiler":
        """Instrument ``optimizer`` (:class:`~lanton_dist.profiling.instrument.Instrumentation`).
        ``hooks=False``: the caller drives :meth:`begin_step`/:meth:`end_step` (the global-hook
        mode of :func:`~lanton_dist.profiling.command.profile_command`)."""
        instrumentation = Instrumentation(self, optimizer, hooks)
        self._instrumentation.append(instrumentation)
        self.optimizer_name = type(optimizer).__name__
        self.meter = getattr(optimizer, "meter", None)
        return self

    def detach(self) -> None:
        """Undo :meth:`attach`."""
        for instrumentation in reversed(self._instrumentation):
            instrumentation.undo()
        self._instrumentation.clear()

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a named interval (inside a step, or between steps: then it joins the next step)."""
        start = self.timer.mark()
        try:
            yield
        finally:
            end = self.timer.mark()
            (self._cur.intervals if self._cur is not None else self._between).append((name, start, end))

    def add_wait(self, phase: str, launch: Mark, before: Mark, after: Mark) -> None:
        """Record a collective's ``wait()``: launch returned at ``launch``, blocked ``before``→``after``."""
        item = (phase, launch, before, after)
        if self._cur is not None:
            self._cur.waits.append(item)
            self._cur.intervals.append((f"wait:{phase}", before, after))
        else:
            self._between_waits.append(item)
            self._between.append((f"wait:{phase}", before, after))

    def begin_step(self) -> None:
        begin = self.timer.mark()
        self._cur = _Raw(-1, begin, begin, self._prev_end, self._between, self._between_waits, {})
        self._between, self._between_waits = [], []

    def end_step(self) -> None:
        cur = self._cur
        if cur is None:
            return
        cur.end = self.timer.mark()
        cur.intervals.append(("optimizer_step", cur.begin, cur.end))
        self._count += 1
        if self.meter is not None:
            step = int(self.meter.step)
            recs = self.meter.for_step(step)
            by_sent, by_tensor, counts = defaultdict(int), defaultdict(int), defaultdict(int)
            for r in recs:
                by_sent[r.phase] += r.sent_bytes
                by_tensor[r.phase] += r.tensor_bytes
                counts[r.phase] += 1
            cur.info = {"bytes": dict(by_sent), "tensor_bytes": dict(by_tensor), "collectives": dict(counts)}
        else:
            step = self._count
            cur.info = {"bytes": {}, "tensor_bytes": {}, "collectives": {}}
        cur.step = step
        self._raw.append(cur)
        self._prev_end = cur.end
        self._cur = None
        self._resolve(block=False)

    def _resolve(self, block: bool) -> list[dict[str, Any]]:
        """Turn finished raw steps into records (all of them when ``block``)."""
        if block and self.timer.cuda:
            torch.cuda.synchronize()
        done = []
        while self._raw and (block or PhaseTimer.ready([self._raw[0].end])):
            raw = self._raw.pop(0)
            done.append(self._record(raw))
        self.records.extend(done)
        return done

    def finalize(self) -> list[dict[str, Any]]:
        """Resolve every pending step (synchronises CUDA once) and return all records."""
        self._resolve(block=True)
        return self.records

    def _record(self, raw: _Raw) -> dict[str, Any]:
        tm = self.timer
        marks = [raw.begin] + [a for _, a, _ in raw.intervals]
        anchor = min(marks, key=lambda m: m.wall)  # the first mark recorded: event offsets from it are >= 0

        def at(m: Mark) -> float:
            return tm.epoch(anchor, m)

        phases: dict[str, dict[str, float]] = defaultdict(lambda: {"time_s": 0.0, "count": 0})
        intervals = []
        for name, a, b in raw.intervals:
            dur = PhaseTimer.seconds(a, b)
            phases[name]["time_s"] += dur
            phases[name]["count"] += 1
            intervals.append([name, at(a), at(a) + dur])
        waits: dict[str, dict[str, float]] = defaultdict(lambda: {"exposed_s": 0.0, "span_s": 0.0, "count": 0})
        for phase, launch, before, after in raw.waits:
            w = waits[phase]
            w["exposed_s"] += PhaseTimer.seconds(before, after)
            w["span_s"] += max(PhaseTimer.seconds(launch, after), 0.0)
            w["count"] += 1
        t_start = at(raw.begin)
        duration = PhaseTimer.seconds(raw.begin, raw.end)
        compute = PhaseTimer.seconds(raw.prev_end, raw.begin) if raw.prev_end is not None else None
        return {"rank": self.rank, "world": self.world, "optimizer": self.label or self.optimizer_name, "step": raw.step,
                "t_start": t_start, "t_end": t_start + duration, "duration_s": duration, "compute_s": compute,
                "phases": {k: dict(v) for k, v in phases.items()}, "intervals": intervals,
                "waits": {k: dict(v) for k, v in waits.items()}, **raw.info,
                "estimation": "variance" in raw.info.get("bytes", {}) or "variance_estimate" in phases,
                "timing": "cuda_events" if tm.cuda else "wall"}

