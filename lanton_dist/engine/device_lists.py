"""Small host lists a step needs on the device (per-layer constants, index vectors), copied
only when they change.

``torch.tensor(values, device=cuda)`` is a host→device copy from pageable memory followed by
a stream synchronisation: the CPU waits for every kernel queued so far (PyTorch's blocking
``copy_``). A step that builds such a tensor stalls the host exactly like a ``.item()``. The
lists a step uses are steady — the layers present, the owner's matrices, each group's
``beta2``/``alpha`` — so :class:`DeviceLists` keeps the last device copy under a key and
returns it while the values are equal; a changed list (a parameter without a gradient this
step, a user editing ``param_groups``) is copied again, from pinned memory and without a
blocking copy on CUDA.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class DeviceLists:
    """Device copies of small host lists, by key (one per call site)."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[float | int, ...], torch.Tensor]] = {}
        #: host→device copies made so far (each a changed or new list): tests bound it
        self.copies = 0

    def get(self, key: str, values: Iterable[float | int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``values`` as a 1-D ``dtype`` tensor on ``device``: the tensor returned last time for
        ``key`` if ``values``, dtype and device are the same (callers must not write into it),
        else a new copy (non-blocking from pinned memory on CUDA)."""
        vals = tuple(values)
        kept = self._kept.get(key)
        if kept is not None and kept[0] == vals and kept[1].dtype == dtype and kept[1].device == device:
            return kept[1]
        host = torch.tensor(vals, dtype=dtype)
        if device.type == "cuda":
            out = host.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it alive
        else:
            out = host.to(device)
        self._kept[key] = (vals, out)
        self.copies += 1
        return out
