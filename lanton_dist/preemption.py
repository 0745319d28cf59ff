"""Stop requests for pre-emptible jobs (Slurm requeue) and for a user's Ctrl-C, shared by both
training entries.

``slurm/pretrain_llama.sbatch`` touches ``$LANTON_STOP_FILE`` when the time limit nears
(SIGUSR1), Slurm pre-emption sends SIGTERM, and Ctrl-C (SIGINT) at ``torchrun`` reaches every
trainer as SIGINT (``torchrun`` forwards the signal it got). A training loop asks
:meth:`StopRequest.agreed` once per step; when any rank saw a request, every rank checkpoints at
the end of that step and exits with status 0, and the job script requeues the job
(``--train.resume true`` continues it). A run that finished all its steps writes
:data:`COMPLETED` into its ``train.out_dir`` so the job script does not requeue it. A second
SIGINT to a process that already has a request interrupts it at once (``KeyboardInterrupt``).

:func:`exit_with_launcher` makes a trainer started by ``torchrun`` get SIGTERM — the same stop
request — when ``torchrun`` dies (even by SIGKILL), through the kernel's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``, Linux), so no trainer keeps running and writing without its launcher.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

from lanton_dist.launcher import die_with_parent

COMPLETED = "COMPLETED"
#: Set by ``torchrun`` in every worker's environment: the worker's parent is its elastic agent.
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def any_rank(local: bool, device: torch.device) -> bool:
    """Job-wide OR of ``local`` over the default process group (a one-element MAX all-reduce on
    ``device``); ``local`` itself when no process group is running."""
    if not dist.is_initialized():
        return local
    t = torch.tensor(float(local), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopRequest:
    """Set by a signal in ``signals`` or by ``stop_file`` existing; see :meth:`agreed`. As a
    context manager it puts the signal handlers it replaced back on exit."""

    def __init__(self, stop_file: str | None = None, signals: tuple[signal.Signals, ...] = ()) -> None:
        self.flag = False
        self.stop_file = stop_file
        self._previous = {sig: signal.signal(sig, self._handler) for sig in signals}

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @classmethod
    def from_environment(cls) -> "StopRequest":
        """SIGUSR1, SIGTERM and SIGINT handlers plus ``$LANTON_STOP_FILE`` (what the job scripts
        set); for the main thread of a training script."""
        return cls(os.environ.get("LANTON_STOP_FILE") or None, (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt  # Ctrl-C again: stop now, without the checkpoint
        self.flag = True

    def local(self) -> bool:
        """Whether this process has seen a request."""
        return self.flag or (self.stop_file is not None and os.path.exists(self.stop_file))

    def agreed(self, any_rank: Callable[[bool], bool]) -> bool:
        """Whether any rank has seen a request; ``any_rank(local)`` is the job-wide OR
        (:func:`any_rank` on the loop's device). Every rank must call it at the same step."""
        return any_rank(self.local())


def exit_with_launcher(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Under ``torchrun`` (``$TORCHELASTIC_RUN_ID`` set), ask the kernel to send ``sig`` to this
    process when its parent — ``torchrun``'s agent — dies, however it dies; with the default
    SIGTERM and :meth:`StopRequest.from_environment`'s handler the trainer checkpoints at the end
    of its step and exits. Returns whether it is armed: False outside ``torchrun`` (a run started
    from a shell keeps running when the shell goes, as ``nohup`` expects) and off Linux. A parent
    that died before the call (this process was re-parented) sends ``sig`` at once."""
    if TORCHRUN_ENV not in os.environ or not die_with_parent(sig):
        return False
    if os.getppid() == 1:  # the launcher is already gone
        os.kill(os.getpid(), sig)
    return True
