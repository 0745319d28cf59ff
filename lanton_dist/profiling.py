"""Profiler: phase timings of optimizer steps merged with the comm meter's bytes, plus NVML samples.

Pieces
------
* :class:`NVMLSampler` — a background thread sampling every GPU of the node through NVML
  (package ``nvidia-ml-py``, verified pin ``nvidia-ml-py==13.615.71``): power (W), cumulative
  energy (J, ``nvmlDeviceGetTotalEnergyConsumption``; the integral of power where unsupported),
  SM and memory-controller utilisation (%), memory used (bytes), PCIe TX/RX (bytes/s, NVML's
  20 ms window, reported in KiB/s) and NVLink TX/RX (bytes/s, from the cumulative
  ``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_*`` counters summed over links) — each only where the
  device reports it. Without NVML (no GPU driver: ``NVMLError_LibraryNotFound``; or the package
  missing) it says so **once per process** and the profiler carries on with timings and bytes.
* :class:`PhaseTimer` — named intervals: CUDA events on a GPU (resolved lazily, so profiling
  adds no synchronisation to a step), ``time.perf_counter`` on CPU; all times are mapped to
  epoch seconds so ranks and NVML samples share one time axis (on GPU, relative to the CPU time
  at which the step's first event was queued).
* :class:`Profiler` — :meth:`Profiler.attach` instruments an optimizer *from outside*: it wraps
  instance attributes, nothing in the engine changes. Phases of
  :class:`~lanton_dist.engine.ShardedLANTON` (and of adapters built on
  :class:`~lanton_dist.engine.core.ShardedCore`):

  ================  ==========================================================================
  phase             what is timed
  ================  ==========================================================================
  optimizer_step    the whole ``step()`` (step pre/post hooks)
  grad_reduce       bucket packing + reduce-scatter of gradients (``_reduce_scatter``), also
                    ``grad_reduce_half`` (Option II)
  core              :meth:`ShardedCore.step`: finite vote, momentum, LMOs, update
  lmo               Newton–Schulz and the exchanges to/from owners (``_hidden_directions``)
  variance_estimate nuclear norms/partial sums of D and the launch of the all-reduce
  variance_finish   waiting for (and, deferred, completing) the previous variance reduction
  param_gather      all-gather of updated segments and copy into parameters
  wait:<phase>      time blocked in ``handle.wait()`` of each metered collective
  forward_backward  whatever the caller times with :meth:`Profiler.phase` between steps
  ================  ==========================================================================

  Phases nest (``optimizer_step`` ⊃ ``core`` ⊃ ``lmo`` ⊃ ``wait:lmo_gather``); each is summed on
  its own. Every step record carries the meter's bytes per phase for that step
  (:meth:`~lanton_dist.engine.meter.CommMeter.by_phase`).

  *Hidden fraction* of an async collective = 1 − (time blocked in ``wait``) / (return of the
  launch call → wait end): 1 when it finished under other work, 0 when fully exposed (waited
  for at once). On GPU both ends are CUDA
  events on the compute stream, so "blocked" is the stream stall the NCCL wait inserts.
* Reports — :func:`build_report` (per-step JSON records + a summary: time and bytes per
  phase, hidden fractions, energy per step when NVML is present), :func:`write_report`
  (``profile.json``, ``steps.jsonl``, ``timeline.png``, ``bytes.png``, ``nvml.png``),
  :func:`load_report`, :func:`format_summary`.
* Runs — :func:`run_engine_profile` (a short built-in training of a small LLaMA on the ZeRO
  engine over N spawned processes) and :func:`profile_command` (wraps any Python training
  command: a generated ``sitecustomize.py`` on ``PYTHONPATH`` hooks
  ``torch.optim.Optimizer``'s global step hooks in every Python process the command starts,
  each process appends its step records to ``<out>/ranks/*.jsonl``, the wrapper samples NVML
  meanwhile and merges). Interpreters started with ``-S``/``-I`` skip ``sitecustomize``.

Units: seconds, bytes, watts, joules, percent. Nothing here changes what the optimizer computes.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lanton_dist.config import ModelConfig

NVML_PIN = "nvidia-ml-py==13.615.71"
REPORT_VERSION = 1
_UINT_MAX = 0xFFFFFFFF

# ============================================================================ say once
_NOTICES: set[str] = set()


def notice_once(key: str, message: str, log: Callable[[str], None] | None = None) -> bool:
    """Print ``message`` (to stderr, or through ``log``) the first time ``key`` is seen in this
    process; return whether it was printed."""
    if key in _NOTICES:
        return False
    _NOTICES.add(key)
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(f"lanton_dist.profiling: {message}")
    return True


# ============================================================================ NVML
def _import_nvml() -> Any:
    import pynvml  # nvidia-ml-py

    return pynvml


class NVMLSampler:
    """Background sampling of every NVML device of this node (see module doc).

    Args:
        interval_s: seconds between samples.
        devices: NVML indices to sample (default: all).
        nvml: an NVML module (default: ``import pynvml``); tests pass a fake.
        log: where the one-time "NVML unavailable" notice goes (default: stderr).

    Attributes:
        available: whether NVML initialised. reason: why not (e.g.
            ``"NVMLError_LibraryNotFound: NVML Shared Library Not Found"``).
        samples: one dict per device and sample: ``t`` (epoch s), ``gpu``, ``power_W``,
            ``energy_J`` (since the first sample), ``sm_util_pct``, ``mem_util_pct``,
            ``mem_used_bytes``, ``pcie_tx_Bps``, ``pcie_rx_Bps``, ``nvlink_tx_Bps``,
            ``nvlink_rx_Bps`` (None where not reported).
    """

    def __init__(self, interval_s: float = 0.1, devices: Sequence[int] | None = None, nvml: Any = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.available, self.reason = False, None
        self.samples: list[dict[str, Any]] = []
        self.gpus: list[dict[str, Any]] = []
        self.unsupported: dict[int, dict[str, str]] = defaultdict(dict)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._prev: dict[int, dict[str, float]] = {}
        self._energy0: dict[int, float] = {}
        try:
            self._nvml = nvml if nvml is not None else _import_nvml()
        except ImportError:
            self._nvml = None
            self.reason = f"nvidia-ml-py is not installed (pip install {NVML_PIN})"
        if self._nvml is not None:
            try:
                self._nvml.nvmlInit()
                count = self._nvml.nvmlDeviceGetCount()
                idx = list(range(count)) if devices is None else list(devices)
                bad = [i for i in idx if not 0 <= i < count]
                if bad:
                    raise ValueError(f"NVML devices {bad} do not exist (this node has {count})")
                self._handles = {i: self._nvml.nvmlDeviceGetHandleByIndex(i) for i in idx}
                for i, h in self._handles.items():
                    name = self._nvml.nvmlDeviceGetName(h)
                    self.gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name)})
                self.available = count > 0 and bool(idx)
                if not self.available:
                    self.reason = "NVML reports no GPU on this node"
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
                self.reason = f"{type(exc).__name__}: {exc}"
        if not self.available:
            notice_once("nvml", f"NVML unavailable ({self.reason}); profiling CPU timings and bytes only", log)

    # ------------------------------------------------------------------ control
    def start(self) -> "NVMLSampler":
        if not self.available or self._thread is not None:
            return self
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="lanton-nvml", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        if self.available:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self.available = bool(self.samples)

    def __enter__(self) -> "NVMLSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # ------------------------------------------------------------------ reading
    def _get(self, gpu: int, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.unsupported[gpu]:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported and friends: stop asking
            self.unsupported[gpu][key] = f"{type(exc).__name__}: {exc}"
            return None

    def _nvlink_kib(self, h: Any) -> tuple[float, float] | None:
        n = self._nvml
        tx = getattr(n, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", 138)
        rx = getattr(n, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", 139)
        vals = n.nvmlDeviceGetFieldValues(h, [(tx, _UINT_MAX), (rx, _UINT_MAX)])
        if any(int(v.nvmlReturn) != 0 for v in vals):
            raise RuntimeError(f"NVLink throughput fields returned {[int(v.nvmlReturn) for v in vals]}")
        return float(vals[0].value.ullVal), float(vals[1].value.ullVal)

    def sample(self) -> list[dict[str, Any]]:
        """Read every device once; append to :attr:`samples` and return the new samples."""
        if not self.available:
            return []
        n, out = self._nvml, []
        for i, h in self._handles.items():
            t = time.time()
            rec: dict[str, Any] = {"t": t, "gpu": i}
            power = self._get(i, "power", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0)
            energy = self._get(i, "energy", lambda: n.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0)
            util = self._get(i, "utilization", lambda: n.nvmlDeviceGetUtilizationRates(h))
            mem = self._get(i, "memory", lambda: n.nvmlDeviceGetMemoryInfo(h))
            tx_id = getattr(n, "NVML_PCIE_UTIL_TX_BYTES", 0)
            rx_id = getattr(n, "NVML_PCIE_UTIL_RX_BYTES", 1)
            pcie_tx = self._get(i, "pcie", lambda: n.nvmlDeviceGetPcieThroughput(h, tx_id) * 1024.0)
            pcie_rx = self._get(i, "pcie", lambda: n.nvmlDeviceGetPcieThroughput(h, rx_id) * 1024.0) if pcie_tx is not None else None
            nvlink = self._get(i, "nvlink", lambda: self._nvlink_kib(h))
            prev = self._prev.get(i)
            if energy is None and power is not None:  # integrate power where the energy counter is missing
                energy = (prev["energy_abs"] + 0.5 * (prev["power"] + power) * (t - prev["t"])) if prev and prev.get("power") is not None else 0.0
            if energy is not None:
                self._energy0.setdefault(i, energy)
            rec.update(power_W=power, energy_J=None if energy is None else energy - self._energy0[i],
                       sm_util_pct=getattr(util, "gpu", None), mem_util_pct=getattr(util, "memory", None),
                       mem_used_bytes=getattr(mem, "used", None), pcie_tx_Bps=pcie_tx, pcie_rx_Bps=pcie_rx,
                       nvlink_tx_Bps=None, nvlink_rx_Bps=None)
            if nvlink is not None and prev and prev.get("nvlink") is not None and t > prev["t"]:
                dt = t - prev["t"]
                rec["nvlink_tx_Bps"] = (nvlink[0] - prev["nvlink"][0]) * 1024.0 / dt
                rec["nvlink_rx_Bps"] = (nvlink[1] - prev["nvlink"][1]) * 1024.0 / dt
            self._prev[i] = {"t": t, "power": power, "energy_abs": energy, "nvlink": nvlink}
            out.append(rec)
        with self._lock:
            self.samples.extend(out)
        return out

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            samples = list(self.samples)
        return {"available": bool(samples) or self.available, "reason": self.reason, "interval_s": self.interval_s,
                "gpus": self.gpus, "unsupported": {str(k): v for k, v in self.unsupported.items() if v},
                "samples": samples}


def nvml_unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "interval_s": None, "gpus": [], "unsupported": {}, "samples": []}


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


class _TimedHandle:
    def __init__(self, prof: "Profiler", inner: Any, phase: str, launch: Mark) -> None:
        self._prof, self._inner, self._phase, self._launch = prof, inner, phase, launch

    def wait(self) -> None:
        before = self._prof.timer.mark()
        try:
            self._inner.wait()
        finally:
            after = self._prof.timer.mark()
            self._prof._add_wait(self._phase, self._launch, before, after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ============================================================================ profiler
_OPT_PHASES = {"_reduce_scatter": ("phase", None), "_all_gather_params": ("phase", None)}
_CORE_PHASES = {"step": "core", "_hidden_directions": "lmo", "_launch_variance": "variance_estimate"}
_COLL_OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


class Profiler:
    """Per-process step profiler (module doc).

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
        self._patched: list[tuple[Any, str, Any]] = []
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ instrumentation
    def attach(self, optimizer: Any, hooks: bool = True) -> "Profiler":
        """Instrument ``optimizer`` (see module doc). ``hooks=False``: the caller drives
        :meth:`begin_step`/:meth:`end_step` (the global-hook mode of :func:`profile_command`)."""
        if getattr(optimizer, "_lanton_profiler", None) is not None:
            raise RuntimeError("this optimizer already has a profiler attached")
        optimizer._lanton_profiler = self
        self.optimizer_name = type(optimizer).__name__
        self.meter = getattr(optimizer, "meter", None)
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
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.begin_step()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.end_step()))
        return self

    def detach(self) -> None:
        """Undo :meth:`attach`."""
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

    def _remember(self, obj: Any, name: str) -> Any:
        self._patched.append((obj, name, obj.__dict__.get(name)))
        return getattr(obj, name)

    def _wrap_fixed(self, obj: Any, name: str, phase: str, when: Callable[[], bool] | None = None) -> None:
        fn = self._remember(obj, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if when is not None and not when():
                return fn(*args, **kwargs)
            with self.phase(phase):
                return fn(*args, **kwargs)

        setattr(obj, name, wrapped)

    def _wrap_phase_arg(self, obj: Any, name: str) -> None:
        fn = self._remember(obj, name)
        sig = inspect.signature(fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase = sig.bind(*args, **kwargs).arguments.get("phase", name.strip("_"))
            with self.phase(str(phase)):
                return fn(*args, **kwargs)

        setattr(obj, name, wrapped)

    def _wrap_collective(self, coll: Any, op: str) -> None:
        fn = self._remember(coll, op)
        sig = inspect.signature(fn)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase = str(sig.bind(*args, **kwargs).arguments.get("phase", op))
            handle = fn(*args, **kwargs)
            launch = self.timer.mark()  # after the launch call returned: from here the caller is free to work
            return _TimedHandle(self, handle, phase, launch) if handle is not None else handle

        setattr(coll, op, wrapped)

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

    def _add_wait(self, phase: str, launch: Mark, before: Mark, after: Mark) -> None:
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


# ============================================================================ reports
def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _interp(samples: list[tuple[float, float]], t: float) -> float | None:
    """Linear interpolation of a cumulative series ``[(t, value)]`` (sorted) at ``t``, clamped."""
    if not samples:
        return None
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return samples[-1][1]


def build_report(records: list[dict[str, Any]], nvml: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Report = ``{"version", "meta", "nvml", "steps", "summary"}`` from per-rank step records
    (:attr:`Profiler.records`) and an NVML dump (:meth:`NVMLSampler.to_json`).

    ``summary``: ``ranks``, ``steps`` (distinct step numbers), ``step_time_s`` (mean/median/max
    over records), ``compute_s_mean``, ``phases`` (per phase: ``time_s_per_step`` mean over
    records, ``time_s_total``, ``count_per_step``), ``bytes_per_step`` (per phase: ``mean`` over
    all rank-steps, ``mean_when_present`` over those issuing the phase, ``max``, ``total``),
    ``estimation_steps``, ``hidden_fraction`` (per async phase), ``energy`` (``J_per_step`` summed over GPUs, ``per_gpu_J_per_step``, ``power_W_mean``) or
    None with ``nvml_reason``.
    """
    nvml = nvml or nvml_unavailable("not sampled")
    records = sorted(records, key=lambda r: (r["step"], r["rank"], r["t_start"]))
    n = len(records)
    durations = sorted(r["duration_s"] for r in records)
    phases: dict[str, dict[str, float]] = defaultdict(lambda: {"time_s_total": 0.0, "count": 0})
    bytes_: dict[str, list[int]] = defaultdict(list)
    waits: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        for k, v in r["phases"].items():
            phases[k]["time_s_total"] += v["time_s"]
            phases[k]["count"] += v["count"]
        for k, v in r.get("bytes", {}).items():
            bytes_[k].append(v)
        for k, v in r.get("waits", {}).items():
            waits[k][0] += v["exposed_s"]
            waits[k][1] += v["span_s"]
    summary: dict[str, Any] = {
        "records": n, "ranks": sorted({r["rank"] for r in records}), "steps": sorted({r["step"] for r in records}),
        "step_time_s": {"mean": _mean(durations), "median": durations[n // 2] if n else None, "max": durations[-1] if n else None},
        "compute_s_mean": _mean([r["compute_s"] for r in records if r.get("compute_s") is not None]),
        "phases": {k: {"time_s_per_step": v["time_s_total"] / n, "time_s_total": v["time_s_total"], "count_per_step": v["count"] / n}
                   for k, v in sorted(phases.items())} if n else {},
        "bytes_per_step": {k: {"mean": sum(v) / n, "mean_when_present": sum(v) / len(v), "max": max(v), "total": sum(v)}
                           for k, v in sorted(bytes_.items())},
        "estimation_steps": sorted({r["step"] for r in records if r.get("estimation")}),
        "hidden_fraction": {k: (1.0 - e / s if s > 0 else None) for k, (e, s) in sorted(waits.items())},
        "energy": None, "nvml_reason": nvml.get("reason"),
    }
    samples = nvml.get("samples") or []
    if samples and records:
        by_gpu: dict[int, list[tuple[float, float]]] = defaultdict(list)
        power: dict[int, list[float]] = defaultdict(list)
        for s in samples:
            if s.get("energy_J") is not None:
                by_gpu[s["gpu"]].append((s["t"], s["energy_J"]))
            if s.get("power_W") is not None:
                power[s["gpu"]].append(s["power_W"])
        spans: dict[int, list[float]] = {}
        for r in records:
            a = spans.setdefault(r["step"], [r["t_start"], r["t_end"]])
            a[0], a[1] = min(a[0], r["t_start"] - (r.get("compute_s") or 0.0)), max(a[1], r["t_end"])
        per_gpu: dict[str, float] = {}
        for g, series in by_gpu.items():
            series.sort()
            joules = [(_interp(series, b) or 0.0) - (_interp(series, a) or 0.0) for a, b in spans.values()]
            per_gpu[str(g)] = sum(joules) / len(joules)
        summary["energy"] = {"J_per_step": sum(per_gpu.values()) if per_gpu else None, "per_gpu_J_per_step": per_gpu,
                             "power_W_mean": {str(g): sum(v) / len(v) for g, v in power.items()},
                             "note": "per step = previous step's end (incl. forward/backward) to this step's end"}
    return {"version": REPORT_VERSION, "meta": meta or {}, "nvml": nvml, "steps": records, "summary": summary}


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by :func:`write_report` (``profile.json`` or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    if not path.exists():
        raise FileNotFoundError(f"no profile report at {path}")
    data = json.loads(path.read_text())
    missing = {"version", "steps", "summary", "nvml"} - set(data)
    if missing:
        raise ValueError(f"{path} is not a lanton_dist profile report (missing {sorted(missing)})")
    return data


def write_report(report: dict[str, Any], out: str | Path, timeline_steps: int = 4) -> list[Path]:
    """Write ``profile.json``, ``steps.jsonl`` and the PNGs into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "profile.json", out / "steps.jsonl"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in report["steps"]))
    paths += render_plots(report, out, timeline_steps)
    return paths


_LANE = {"optimizer_step": 0, "forward_backward": 0, "grad_reduce": 1, "grad_reduce_half": 1, "core": 1, "param_gather": 1,
         "lmo": 2, "variance_estimate": 2, "variance_finish": 2}


def _lane(name: str) -> int:
    return 3 if name.startswith("wait:") else _LANE.get(name, 2)


def render_plots(report: dict[str, Any], out: Path, timeline_steps: int = 4) -> list[Path]:
    """``timeline.png`` (phases per rank over the last ``timeline_steps`` steps), ``bytes.png``
    (bytes per phase per step, rank mean) and, with NVML samples, ``nvml.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["steps"]
    if not records:
        raise ValueError("the report has no step records to plot")
    paths = []
    steps = sorted({r["step"] for r in records})[-max(1, timeline_steps):]
    shown = [r for r in records if r["step"] in steps]
    names = sorted({iv[0] for r in shown for iv in r["intervals"]} | {"between steps"}, key=lambda n: (_lane(n), n))
    cmap = plt.get_cmap("tab20")
    color = {n: cmap(i % 20) for i, n in enumerate(names)}
    color["between steps"] = (0.85, 0.85, 0.85, 1.0)
    ranks = sorted({r["rank"] for r in shown})
    t0 = min(min((iv[1] for iv in r["intervals"]), default=r["t_start"]) - (r.get("compute_s") or 0.0) for r in shown)
    lanes = 4
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(ranks)))
    for i, rank in enumerate(ranks):
        base = i * (lanes + 1)
        for r in (r for r in shown if r["rank"] == rank):
            if r.get("compute_s"):
                ax.broken_barh([(r["t_start"] - r["compute_s"] - t0, r["compute_s"])], (base + lanes - 1, 0.9),
                               facecolors=color["between steps"])
            for name, a, b in r["intervals"]:
                lane = lanes - 1 - _lane(name)
                ax.broken_barh([(a - t0, max(b - a, 1e-7))], (base + lane, 0.9), facecolors=color[name])
    ax.set_yticks([i * (lanes + 1) + lanes / 2 for i in range(len(ranks))], [f"rank {r}" for r in ranks])
    ax.set_xlabel("time (s)")
    ax.set_title(f"phases of steps {steps[0]}–{steps[-1]} per rank (lanes: step / engine phases / NS, variance / waits)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=color[n]) for n in names], labels=names, fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(out / "timeline.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    all_steps = sorted({r["step"] for r in records})
    phases = sorted({p for r in records for p in r.get("bytes", {})})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(all_steps)
    for i, p in enumerate(phases):
        vals = []
        for s in all_steps:
            rs = [r for r in records if r["step"] == s]
            vals.append(sum(r.get("bytes", {}).get(p, 0) for r in rs) / len(rs))
        a1.bar([str(s) for s in all_steps], vals, bottom=bottom, label=p, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, vals)]
    a1.set_xlabel("step")
    a1.set_ylabel("bytes sent per rank")
    a1.set_title("bytes per step (rank mean), by phase")
    if phases:
        a1.legend(fontsize=7)
    per = report["summary"]["bytes_per_step"]
    a2.barh(phases or ["(no metered collectives)"], [per[p]["mean"] for p in phases] or [0], color=[cmap(i % 20) for i in range(len(phases))] or None)
    if phases and any(per[p]["mean"] > 0 for p in phases):
        a2.set_xscale("log")
    a2.set_xlabel("mean bytes per rank and step (log)")
    a2.set_title("bytes per phase")
    fig.tight_layout()
    paths.append(out / "bytes.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    samples = report["nvml"].get("samples") or []
    if samples:
        ts0 = min(s["t"] for s in samples)
        gpus = sorted({s["gpu"] for s in samples})
        panels = [("power_W", "power (W)"), ("sm_util_pct", "SM util (%)"), ("mem_used_bytes", "memory used (GB)"),
                  ("nvlink_tx_Bps", "NVLink TX (GB/s)")]
        panels = [p for p in panels if any(s.get(p[0]) is not None for s in samples)]
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.3 * len(panels)), sharex=True, squeeze=False)
        for ax_, (key, label) in zip(axes[:, 0], panels):
            scale = 1e-9 if key in ("mem_used_bytes", "nvlink_tx_Bps") else 1.0
            for g in gpus:
                pts = [(s["t"] - ts0, s[key] * scale) for s in samples if s["gpu"] == g and s.get(key) is not None]
                if pts:
                    ax_.plot(*zip(*pts), lw=1, label=f"GPU {g}")
            for r in records:
                if r["rank"] == records[0]["rank"]:
                    ax_.axvspan(r["t_start"] - ts0, r["t_end"] - ts0, color="0.9", zorder=0)
            ax_.set_ylabel(label)
        axes[-1, 0].set_xlabel("time (s); grey: optimizer steps of the first rank")
        axes[0, 0].legend(fontsize=7, ncol=min(8, len(gpus)))
        fig.tight_layout()
        paths.append(out / "nvml.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    s = report["summary"]
    lines = [f"{s['records']} step records, ranks {s['ranks']}, steps {s['steps'][0] if s['steps'] else '-'}.."
             f"{s['steps'][-1] if s['steps'] else '-'}; mean step {1e3 * (s['step_time_s']['mean'] or 0):.2f} ms"
             + (f", between steps {1e3 * s['compute_s_mean']:.2f} ms" if s.get("compute_s_mean") else "")]
    lines.append(f"{'phase':<24} {'ms/step':>9} {'bytes/step':>12} {'hidden':>7}")
    for n in sorted(set(s["phases"]) | set(s["bytes_per_step"])):
        t = s["phases"].get(n, {}).get("time_s_per_step")
        b = s["bytes_per_step"].get(n, {}).get("mean")
        h = s["hidden_fraction"].get(n[5:]) if n.startswith("wait:") else None
        lines.append(f"{n:<24} {'' if t is None else f'{1e3 * t:.3f}':>9} {'' if b is None else f'{b:.0f}':>12} "
                     f"{'' if h is None else f'{h:.1%}':>7}")
    if s.get("energy"):
        lines.append(f"energy: {s['energy']['J_per_step']:.2f} J per step over {len(s['energy']['per_gpu_J_per_step'])} GPU(s)")
    else:
        lines.append(f"energy: n/a ({s.get('nvml_reason')})")
    return "\n".join(lines)


# ============================================================================ built-in engine run
@dataclass
class EngineRun:
    """A short training of a small LLaMA on :class:`~lanton_dist.engine.ShardedLANTON`.

    ``world`` processes (gloo on CPU, nccl with ``device='cuda'``, one GPU each), ``steps``
    optimizer steps of ``batch`` random-token sequences of ``seq_len`` per rank.
    """

    world: int = 2
    steps: int = 6
    algorithm: str = "lanton"
    option: str = "I"
    estimate_every: int = 2
    nuclear_estimator: str = "auto"
    device: str = "cpu"
    bucket_mb: float = 25.0
    overlap: bool = True
    batch: int = 8
    seq_len: int = 64
    seed: int = 0
    timeout_s: float = 300.0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                                                   ffn_dim=352, max_seq_len=64))

    def __post_init__(self) -> None:
        if self.world < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError(f"world, steps and batch must be >= 1, got {self.world}, {self.steps}, {self.batch}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and torch.cuda.device_count() < self.world:
            raise ValueError(f"device cuda needs {self.world} GPUs, this machine has {torch.cuda.device_count()}")
        if self.option == "II" and self.batch % 2:
            raise ValueError("Option II splits each rank's batch in two halves: batch must be even")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        from lanton_dist.model import check_model_config

        check_model_config(self.model)


def _engine_worker(rank: int, cfg: EngineRun, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from lanton_dist.config import OptimConfig
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.model import Transformer

    result: dict[str, Any]
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world))
        device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from datetime import timedelta

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=cfg.world, timeout=timedelta(seconds=cfg.timeout_s))
        model = Transformer(cfg.model, seed=cfg.seed).to(device)
        ocfg = OptimConfig(name=cfg.algorithm, option=cfg.option, estimate_every=cfg.estimate_every,
                           nuclear_estimator=cfg.nuclear_estimator)
        opt = build_sharded_optimizer(model, ocfg, bucket_mb=cfg.bucket_mb, overlap=cfg.overlap)
        prof = Profiler(rank, cfg.world, device).attach(opt)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

        for _ in range(cfg.steps):
            x = torch.randint(0, cfg.model.vocab_size, (cfg.batch, cfg.seq_len + 1), generator=gen).to(device)
            with prof.phase("forward_backward"):
                if opt.needs_two_half_batches():
                    h = cfg.batch // 2
                    (0.5 * loss_of(x[:h])).backward()
                    opt.stash_half_gradient()
                    (0.5 * loss_of(x[h:])).backward()
                else:
                    loss_of(x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        result = {"status": "ok", "records": prof.finalize(),
                  "meter": {"init_sync_bytes": opt.meter.by_phase(0).get("init_sync", 0), "buckets": len(opt.layout.buckets)}}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"status": "error", "error": f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_engine_profile(cfg: EngineRun, nvml_interval_s: float = 0.1, nvml: Any = None) -> dict[str, Any]:
    """Run :class:`EngineRun` on ``cfg.world`` spawned processes, profiled; return the report."""
    import torch.multiprocessing as mp

    sampler = NVMLSampler(nvml_interval_s, nvml=nvml).start()
    started = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "init")
            ctx = mp.spawn(_engine_worker, args=(cfg, init_file, tmp), nprocs=cfg.world, join=False)
            deadline = time.time() + cfg.timeout_s * 2
            while True:
                try:
                    if ctx.join(timeout=1):
                        break
                except mp.ProcessException:
                    break  # a rank died: its missing or error result is reported below
                if time.time() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    raise RuntimeError(f"profile run did not finish within {cfg.timeout_s * 2:.0f} s")
            results = []
            for r in range(cfg.world):
                path = Path(tmp, f"rank{r}.json")
                results.append(json.loads(path.read_text()) if path.exists() else {"status": "error", "error": f"rank {r}: no result"})
    finally:
        sampler.stop()
    errors = [r["error"] for r in results if r["status"] != "ok"]
    if errors:
        raise RuntimeError("profile run failed:\n" + "\n".join(errors))
    records = [rec for r in results for rec in r["records"]]
    meta = {"kind": "engine", "created": started, "host": socket.gethostname(), "torch": torch.__version__,
            "config": dataclasses.asdict(cfg), "wall_s": time.time() - started, "buckets": results[0]["meter"]["buckets"],
            "init_sync_bytes": [r["meter"]["init_sync_bytes"] for r in results]}
    return build_report(records, sampler.to_json(), meta)


# ============================================================================ wrapping a command
ENV_DIR = "LANTON_PROFILE_DIR"

_BOOTSTRAP = '''"""Written by lanton_dist.profiling.profile_command: profiles optimizer steps of this process."""
import importlib.abc
import importlib.util
import os
import sys


def _pre(opt, args, kwargs):
    from lanton_dist.profiling import _auto_pre
    _auto_pre(opt)


def _post(opt, args, kwargs):
    from lanton_dist.profiling import _auto_post
    _auto_post(opt)


class _LantonProfileFinder(importlib.abc.MetaPathFinder):
    """Registers global optimizer step hooks right after torch.optim.optimizer is loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch.optim.optimizer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            module.register_optimizer_step_pre_hook(_pre)
            module.register_optimizer_step_post_hook(_post)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("LANTON_PROFILE_DIR"):
    sys.meta_path.insert(0, _LantonProfileFinder())

_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    _f = os.path.join(_d or ".", "sitecustomize.py")
    if os.path.abspath(_d or ".") != _here and os.path.isfile(_f):
        with open(_f) as _fh:
            exec(compile(_fh.read(), _f, "exec"), {"__name__": "sitecustomize", "__file__": _f})
        break
'''

_AUTO: dict[int, Profiler] = {}
_AUTO_LOCK = threading.Lock()


def _auto_file(prof: Profiler) -> Path:
    return Path(os.environ[ENV_DIR], f"rank{prof.rank}-pid{os.getpid()}-{prof.label}.jsonl")


def _auto_flush(prof: Profiler, records: list[dict[str, Any]]) -> None:
    if records:
        with open(_auto_file(prof), "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def _auto_pre(opt: Any) -> None:
    """Global pre-step hook of a wrapped command: attach on first sight, then begin the step."""
    if not os.environ.get(ENV_DIR):
        return
    with _AUTO_LOCK:
        prof = _AUTO.get(id(opt))
        if prof is None:
            device = None
            for g in getattr(opt, "param_groups", []):
                for p in g.get("params", []):
                    device = p.device
                    break
                if device is not None:
                    break
            prof = Profiler(device=device, label=f"{type(opt).__name__}{len(_AUTO)}")
            prof.attach(opt, hooks=False)
            _AUTO[id(opt)] = prof
            if len(_AUTO) == 1:
                atexit.register(_auto_exit)
    prof.begin_step()


def _auto_post(opt: Any) -> None:
    prof = _AUTO.get(id(opt))
    if prof is None:
        return
    before = len(prof.records)
    prof.end_step()
    _auto_flush(prof, prof.records[before:])


def _auto_exit() -> None:
    for prof in list(_AUTO.values()):
        before = len(prof.records)
        with contextlib.suppress(Exception):
            prof.finalize()
        _auto_flush(prof, prof.records[before:])


def profile_command(command: Sequence[str], out: str | Path, nvml_interval_s: float = 0.1, nvml: Any = None,
                    env: dict[str, str] | None = None) -> tuple[dict[str, Any], int]:
    """Run ``command`` with every Python process's optimizer steps profiled (module doc) and NVML
    sampled; return ``(report, exit status)``. Per-process records land in ``out/ranks``."""
    if not command:
        raise ValueError("no command to profile: give it after '--'")
    out = Path(out)
    ranks_dir, boot = out / "ranks", out / "_boot"
    if ranks_dir.exists():
        shutil.rmtree(ranks_dir)
    ranks_dir.mkdir(parents=True)
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "sitecustomize.py").write_text(_BOOTSTRAP)
    child_env = dict(os.environ if env is None else env)
    child_env[ENV_DIR] = str(ranks_dir.resolve())
    pkg_root = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join([str(boot.resolve()), pkg_root] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    sampler = NVMLSampler(nvml_interval_s, nvml=nvml).start()
    started = time.time()
    try:
        rc = subprocess.call(list(command), env=child_env)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot run {command[0]!r}: {exc}") from None
    finally:
        sampler.stop()
    records = []
    for path in sorted(ranks_dir.glob("*.jsonl")):
        records += [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    meta = {"kind": "command", "command": list(command), "exit_status": rc, "created": started, "host": socket.gethostname(),
            "torch": torch.__version__, "wall_s": time.time() - started, "rank_files": len(list(ranks_dir.glob("*.jsonl")))}
    if not records:
        raise RuntimeError(f"the command (exit status {rc}) ran no torch optimizer step that could be profiled "
                           "(is it a Python program started without -S/-I?)")
    return build_report(records, sampler.to_json(), meta), rc
