"""When a run has diverged, and keeping its last good state: the rules of the training loop.

**Bad steps.** Every optimizer of this package skips a step whose gradients are not finite and
counts it in ``skipped_steps`` (DeepSpeed's own overflow skips are added by its backend). A step
is *bad* when it was skipped, its loss is not finite, or its loss is a *spike*: finite but above
``train.loss_spike_factor`` × the median loss of the last ``train.loss_spike_window`` good steps
(0 turns the spike rule off; the window starts empty at every start or resume and a bad step's
loss never enters it). After ``train.max_consecutive_skips`` bad steps in a row,
:class:`DivergenceGuard` raises :class:`Diverged`; the entries print its message and exit with
:data:`EXIT_DIVERGED`, without writing ``COMPLETED`` (so a Slurm job is not requeued). Host-side
and cheap: it reads the loss the loop already has as a float and the optimizer's step counter.

**Checkpoints around bad steps** (:class:`GoodCheckpoints`). The loss of step ``s`` measures
the weights after ``s − 1`` updates, so checkpoint ``step_N`` is known good only once step
``N + 1`` was good. Hence: no checkpoint is written while a run of bad steps is open (a due save
waits for the first good step); a checkpoint's older siblings are pruned only once the step after
it was good (until then ``train.keep_checkpoints`` + 1 may exist); and when the run stops for
divergence starting at step ``b``, the checkpoints of steps ≥ ``b − 1`` (their weights produced
the bad losses) are set aside as ``diverged-step_N`` (never resumed from, never deleted by us),
so the newest kept checkpoint predates the trouble; the stop message names it and the resume
command.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from pathlib import Path

from lanton_dist import checkpoint_dir

EXIT_DIVERGED = 3
SET_ASIDE_PREFIX = "diverged-"


class Diverged(RuntimeError):
    """Raised by :meth:`DivergenceGuard.observe`; the message says which steps and what to do.
    ``first``/``last``: the bad run's first and last step."""

    def __init__(self, message: str, first: int, last: int) -> None:
        super().__init__(message)
        self.first, self.last = first, last


class DivergenceGuard:
    """Counts consecutive bad steps. ``max_consecutive`` 0 disables the stop (bad steps are still
    counted: :attr:`run` > 0 means a run of bad steps is open).

    Args:
        max_consecutive: ``train.max_consecutive_skips``.
        skipped_steps: the optimizer's ``skipped_steps`` before the first observed step
            (a resumed optimizer carries its count).
        spike_factor: ``train.loss_spike_factor`` (0: no spike rule).
        spike_window: ``train.loss_spike_window``: how many recent good losses the median is over.
    """

    def __init__(self, max_consecutive: int, skipped_steps: int = 0, spike_factor: float = 0.0,
                 spike_window: int = 50) -> None:
        if max_consecutive < 0:
            raise ValueError(f"train.max_consecutive_skips must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = skipped_steps
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.run = 0

    def spike_limit(self) -> float:
        """The loss above which a finite loss is a spike now (inf: no rule or no good step yet)."""
        if not self.spike_factor or not self.recent:
            return math.inf
        return self.spike_factor * statistics.median(self.recent)

    def observe(self, step: int, skipped_steps: int, loss: float) -> None:
        """Record step ``step`` (1-based) after its optimizer step: ``skipped_steps`` is the
        optimizer's counter now, ``loss`` the step's global mean loss (the same on every rank)."""
        skipped = skipped_steps > self.skipped_steps
        self.skipped_steps = skipped_steps
        limit = self.spike_limit()
        bad = skipped or not math.isfinite(loss) or loss > limit
        if bad:
            self.run += 1
        else:
            self.run = 0
            self.recent.append(loss)
        if self.max_consecutive and self.run >= self.max_consecutive:
            spike = (f", or a loss above {limit:.4g} (train.loss_spike_factor {self.spike_factor:g} × the median of the "
                     f"last {len(self.recent)} good losses)") if math.isfinite(limit) else ""
            raise Diverged(
                f"training diverged: steps {step - self.run + 1}-{step} ({self.run} in a row) were skipped for "
                f"non-finite gradients or had a non-finite loss{spike} (last loss {loss:.6g}); stopping without marking "
                f"the run complete (train.max_consecutive_skips={self.max_consecutive}).",
                step - self.run + 1, step)


class GoodCheckpoints:
    """When the loop writes, prunes and sets aside checkpoints so that the last good state is
    kept (the rules in the module docstring). Every rank calls :meth:`after_step` at every step
    with the same arguments; rank 0 (``is_main``) prunes and renames.

    Args:
        root: ``<train.out_dir>/checkpoints``.
        keep_last: ``train.keep_checkpoints``.
    """

    def __init__(self, root: Path, keep_last: int, *, is_main: bool, say: Callable[[str], None]) -> None:
        self.root, self.keep_last, self.is_main, self.say = root, keep_last, is_main, say
        self.pending: int | None = None  # the newest save whose next step has not been seen good yet
        self.due = False  # a save postponed while a bad run was open

    def after_step(self, step: int, bad_run: int, *, scheduled: bool, final: bool,
                   save: Callable[[int | None], object]) -> bool:
        """After :meth:`DivergenceGuard.observe` of ``step`` (``bad_run``: its :attr:`~DivergenceGuard.run`):
        prune once the pending checkpoint is confirmed, and save when ``scheduled`` (or ``final``:
        the run's last step or a stop request; pruned at once) unless a bad run is open.
        ``save(keep_last or None)`` writes the checkpoint. Returns whether it saved."""
        if not bad_run and self.pending is not None and self.pending < step:
            if self.is_main:
                checkpoint_dir.prune(self.root, self.keep_last)
            self.pending = None
        if not (scheduled or final or self.due):
            return False
        if bad_run:
            self.due = not final
            self.say(f"step {step}: no checkpoint while {bad_run} bad step(s) in a row are open (the last good state: "
                     f"{self.newest_before(step - bad_run) or 'no checkpoint yet'})")
            return False
        self.due = False
        save(self.keep_last if final else None)
        self.pending = None if final else step
        return True

    def newest_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of a step below ``step``."""
        kept = [p for s, p in checkpoint_dir.complete_checkpoints(self.root) if s < step]
        return kept[-1] if kept else None

    def diverged(self, err: Diverged) -> Diverged:
        """Set aside the checkpoints whose weights the bad steps measured (steps ≥ ``err.first − 1``)
        and return ``err`` with the newest kept checkpoint and the resume command added."""
        suspect = err.first - 1
        if self.is_main:
            for s, path in checkpoint_dir.complete_checkpoints(self.root):
                if s >= suspect:
                    target, n = path.with_name(SET_ASIDE_PREFIX + path.name), 1
                    while target.exists():  # set aside by an earlier divergence too
                        target, n = path.with_name(f"{SET_ASIDE_PREFIX}{path.name}.{n}"), n + 1
                    path.rename(target)
                    self.say(f"set aside {path} as {target.name}: its weights gave the bad losses from step {err.first} on")
        kept = self.newest_before(suspect)
        if kept is None:
            tail = (f" No checkpoint predates the trouble (the weights after {suspect} step(s) gave the first bad "
                    "loss): restart from step 0 with a lower learning rate.")
        else:
            tail = (f" The newest kept checkpoint, {kept}, predates it: resume from it with the same command plus "
                    "--train.resume true and a gentler schedule (schedule.* may change on resume, optim.* may not).")
        return Diverged(str(err) + tail, err.first, err.last)
