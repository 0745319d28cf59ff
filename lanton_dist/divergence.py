"""When a run has diverged: the one rule both training entries apply.

Every optimizer of this package skips a step whose gradients are not finite and counts it in
``skipped_steps`` (DeepSpeed's own overflow skips are added by its backend). A run whose
steps keep being skipped has stopped learning: after ``train.max_consecutive_skips``
consecutive steps that were skipped or had a non-finite loss, :class:`DivergenceGuard` raises
:class:`Diverged`; the entries print its message and exit with :data:`EXIT_DIVERGED`, without
writing ``COMPLETED`` (so a Slurm job is not requeued) and without checkpointing the diverged
state. Host-side and cheap: it reads the loss the loop already has as a float and the
optimizer's step counter (a Python int).
"""
from __future__ import annotations

import math

EXIT_DIVERGED = 3


class Diverged(RuntimeError):
    """Raised by :meth:`DivergenceGuard.observe`; the message says which steps and what to do."""


class DivergenceGuard:
    """Counts consecutive bad steps. ``max_consecutive`` 0 disables the rule.

    Args:
        max_consecutive: ``train.max_consecutive_skips``.
        skipped_steps: the optimizer's ``skipped_steps`` before the first observed step
            (a resumed optimizer carries its count).
    """

    def __init__(self, max_consecutive: int, skipped_steps: int = 0) -> None:
        if max_consecutive < 0:
            raise ValueError(f"train.max_consecutive_skips must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = skipped_steps
        self.run = 0

    def observe(self, step: int, skipped_steps: int, loss: float) -> None:
        """Record step ``step`` (1-based) after its optimizer step: ``skipped_steps`` is the
        optimizer's counter now, ``loss`` the step's global mean loss."""
        skipped = skipped_steps > self.skipped_steps
        self.skipped_steps = skipped_steps
        self.run = self.run + 1 if skipped or not math.isfinite(loss) else 0
        if self.max_consecutive and self.run >= self.max_consecutive:
            raise Diverged(
                f"training diverged: steps {step - self.run + 1}-{step} ({self.run} in a row) were skipped for "
                f"non-finite gradients or had a non-finite loss (last loss {loss}); stopping without marking the run "
                f"complete (train.max_consecutive_skips={self.max_consecutive}). Lower the learning rate or resume "
                "from an earlier checkpoint.")
