"""Profiler: phase timings of optimizer steps merged with the comm meter's bytes, plus NVML samples.

Modules (one concern each)
--------------------------
* :mod:`.sampler` — :class:`NVMLSampler`, a background thread sampling every GPU of the node
  through NVML (power, energy, utilisation, memory, PCIe and NVLink throughput where reported);
  without NVML it says so once per process and profiling carries on. Torch-free.
* :mod:`.timers` — :class:`PhaseTimer` (CUDA events on a GPU, resolved lazily; perf_counter on
  CPU; epoch seconds so ranks and NVML samples share one time axis) and :class:`Profiler`, the
  per-process step recorder.
* :mod:`.instrument` — the one place the profiler meets an optimizer (:class:`Instrumentation`):
  it subscribes to the phases the engine announces (:mod:`lanton_dist.engine.phases` lists them:
  ``grad_reduce``, ``core``, ``lmo``, ``variance_estimate``, ``variance_finish``,
  ``param_gather``, …), times collective waits (``wait:<phase>``) and whole steps
  (``optimizer_step``); ``forward_backward`` is whatever the caller times with
  :meth:`Profiler.phase` between steps.
* :mod:`.report` — :func:`build_report` (per-step JSON records + a summary: time and bytes per
  phase, hidden fractions, energy per step when NVML is present), :func:`write_report`
  (``profile.json``, ``steps.jsonl``, ``timeline.png``, ``bytes.png``, ``nvml.png``),
  :func:`load_report`, :func:`format_summary`. Torch-free.
* :mod:`.harness` — :func:`run_engine_profile`: a short built-in training of a small LLaMA on the
  ZeRO engine over N spawned processes (:class:`EngineRun`).
* :mod:`.command` — :func:`profile_command`: wraps any Python training command; the
  ``sitecustomize`` it installs is the real module :mod:`.bootstrap`.

Phases nest (``optimizer_step`` ⊃ ``core`` ⊃ ``lmo`` ⊃ ``wait:lmo_gather``); each is summed on
its own. Every step record carries the meter's bytes per phase for that step
(:meth:`~lanton_dist.engine.meter.CommMeter.by_phase`). *Hidden fraction* of an async collective
= 1 − (time blocked in ``wait``) / (return of the launch call → wait end): 1 when it finished
under other work, 0 when fully exposed. On GPU both ends are CUDA events on the compute stream,
so "blocked" is the stream stall the NCCL wait inserts.

Units: seconds, bytes, watts, joules, percent. Nothing here changes what the optimizer computes.
The names below load on first access (PEP 562): the torch-free sampler and report modules do
not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lanton_dist.lazy import lazy_exports

if TYPE_CHECKING:
    from lanton_dist.profiling.command import ENV_DIR, profile_command
    from lanton_dist.profiling.harness import EngineRun, run_engine_profile
    from lanton_dist.profiling.instrument import Instrumentation
    from lanton_dist.profiling.report import REPORT_VERSION, build_report, format_summary, load_report, render_plots, write_report
    from lanton_dist.profiling.sampler import NVML_PIN, NVMLSampler, notice_once, nvml_unavailable
    from lanton_dist.profiling.timers import Mark, PhaseTimer, Profiler

#: public name -> the submodule that defines it.
_LAZY: dict[str, str] = {
    "ENV_DIR": "lanton_dist.profiling.command", "profile_command": "lanton_dist.profiling.command",
    "EngineRun": "lanton_dist.profiling.harness", "run_engine_profile": "lanton_dist.profiling.harness",
    "Instrumentation": "lanton_dist.profiling.instrument",
    "REPORT_VERSION": "lanton_dist.profiling.report", "build_report": "lanton_dist.profiling.report",
    "format_summary": "lanton_dist.profiling.report", "load_report": "lanton_dist.profiling.report",
    "render_plots": "lanton_dist.profiling.report", "write_report": "lanton_dist.profiling.report",
    "NVML_PIN": "lanton_dist.profiling.sampler", "NVMLSampler": "lanton_dist.profiling.sampler",
    "notice_once": "lanton_dist.profiling.sampler", "nvml_unavailable": "lanton_dist.profiling.sampler",
    "Mark": "lanton_dist.profiling.timers", "PhaseTimer": "lanton_dist.profiling.timers", "Profiler": "lanton_dist.profiling.timers",
}
#: submodules reachable as attributes (``lanton_dist.profiling.sampler``, ...).
_SUBMODULES = frozenset({"bootstrap", "command", "harness", "instrument", "report", "sampler", "timers"})

__all__ = [
    "NVMLSampler", "NVML_PIN", "notice_once", "nvml_unavailable", "Mark", "PhaseTimer", "Profiler", "Instrumentation",
    "REPORT_VERSION", "build_report", "format_summary", "load_report", "render_plots", "write_report",
    "EngineRun", "run_engine_profile", "ENV_DIR", "profile_command",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, _SUBMODULES)
