"""Custom kernels. Each has a torch fallback and is used only where its backend can run.

* :func:`symmetric_gram` — ``alpha·Y Yᵀ + beta·Z`` computing one triangle of tiles (Triton;
  :mod:`.symmetric`). Runs on CUDA tensors, or on CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1``, for tests). :func:`triton_usable` says whether it can run on a tensor.
"""
from __future__ import annotations

from lanton_dist.kernels.symmetric import symmetric_gram, triton_usable

__all__ = ["symmetric_gram", "triton_usable"]
