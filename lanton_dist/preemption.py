"""Stop requests for pre-emptible jobs (Slurm requeue), shared by both training entries.

``slurm/pretrain_llama.sbatch`` touches ``$LANTON_STOP_FILE`` when the time limit nears
(SIGUSR1), and Slurm pre-emption sends SIGTERM. A training loop asks :meth:`StopRequest.agreed`
once per step; when any rank saw a request, every rank checkpoints at the end of that step and
exits, and the job script requeues the job (``--train.resume true`` continues it). A run that
finished all its steps writes :data:`COMPLETED` into its ``train.out_dir`` so the job script
does not requeue it.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

COMPLETED = "COMPLETED"


def any_rank(local: bool, device: torch.device) -> bool:
    """Job-wide OR of ``local`` over the default process group (a one-element MAX all-reduce on
    ``device``); ``local`` itself when no process group is running."""
    if not dist.is_initialized():
        return local
    t = torch.tensor(float(local), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopRequest:
    """Set by a signal in ``signals`` or by ``stop_file`` existing; see :meth:`agreed`."""

    def __init__(self, stop_file: str | None = None, signals: tuple[signal.Signals, ...] = ()) -> None:
        self.flag = False
        self.stop_file = stop_file
        for sig in signals:
            signal.signal(sig, self._handler)

    @classmethod
    def from_environment(cls) -> "StopRequest":
        """SIGUSR1 and SIGTERM handlers plus ``$LANTON_STOP_FILE`` (what the job scripts set);
        for the main thread of a training script."""
        return cls(os.environ.get("LANTON_STOP_FILE") or None, (signal.SIGUSR1, signal.SIGTERM))

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def local(self) -> bool:
        """Whether this process has seen a request."""
        return self.flag or (self.stop_file is not None and os.path.exists(self.stop_file))

    def agreed(self, any_rank: Callable[[bool], bool]) -> bool:
        """Whether any rank has seen a request; ``any_rank(local)`` is the job-wide OR
        (:func:`any_rank` on the loop's device). Every rank must call it at the same step."""
        return any_rank(self.local())
