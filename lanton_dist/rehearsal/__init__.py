"""The rehearsal: the real optimizer of a run config, built and stepped as sampled ranks of a
simulated 8–1,024-GPU job on one CPU, beside the planner's predictions (``lanton-dist rehearse``).

Modules (one concern each):

* :mod:`.fakeworld` — torch's fake process group, the model on ``meta``, the one seam (the
  core's skip-vote host read) and the fake backend's behaviour (documented, never reported as ours).
* :mod:`.driver`    — one rank: build, step, measure (bytes held by kind, metered collectives
  per step, host ms, construction s); :mod:`.worker` runs it in its own process.
* :mod:`.compare`   — rank sampling, the planner beside each rank, cross-rank consistency.
* :mod:`.runner`    — :func:`rehearse`: one process per sampled rank, the :class:`Report`.

See docs/rehearsal.md.
"""
from __future__ import annotations

from lanton_dist.rehearsal.runner import Report, rehearse, run_ranks

__all__ = ["Report", "rehearse", "run_ranks"]
