"""Where the owner's estimator work runs: a side CUDA stream on GPU, inline on CPU.

LANTON's only work beyond Scion is the dual norm of D = G_t − G̃_t on estimation steps (the
nuclear norms of the owned hidden matrices). Its result is consumed one step late (the
engine's ``overlap``, the reference's ``delay_lr_factor``), so on a GPU the owner can run it on
a second stream: it overlaps the step's parameter all-gather, the next forward and backward,
and is waited for at the start of the next step, before the ``variance`` all-reduce.

Modes (:func:`side_stream_mode`):

* ``stream`` — CUDA: ``fn`` is enqueued on a side stream after it waits for the current stream
  (so D is complete); :meth:`SideWork.result` makes the current stream wait for its event. The
  inputs are kept referenced until then, so the caching allocator cannot reuse their memory.
* ``inline`` — CPU (and CUDA with ``LANTON_SIDE_STREAM=inline``): ``fn`` runs at once; the core
  then fills and all-reduces in the same step, as it always has (meter and planner unchanged).
* ``deferred`` — ``LANTON_SIDE_STREAM=deferred``, for tests on CPU: ``fn`` runs only when its
  result is asked for, the worst case a stream allows. A consumer that read the norms before
  waiting would see the wrong step's numbers, so equality with the reference under this mode
  shows the waits are in the right places.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

MODES = ("stream", "inline", "deferred")
ENV = "LANTON_SIDE_STREAM"


def side_stream_mode(device: torch.device) -> str:
    """``stream`` on CUDA, ``inline`` elsewhere, unless ``$LANTON_SIDE_STREAM`` names a mode."""
    want = os.environ.get(ENV, "")
    if want:
        if want not in MODES:
            raise ValueError(f"{ENV}={want!r}: choose one of {MODES}")
        if want == "stream" and device.type != "cuda":
            raise ValueError(f"{ENV}=stream needs a CUDA device, the parameters are on {device}")
        return want
    return "stream" if device.type == "cuda" else "inline"


class SideWork:
    """The pending result of :meth:`SideStream.launch`; :meth:`result` waits for it."""

    def __init__(self, fn: Callable[[], Any] | None, value: Any, event: Any, keep: Sequence[torch.Tensor]) -> None:
        self._fn, self._value, self._event, self._keep = fn, value, event, keep

    def result(self) -> Any:
        if self._fn is not None:  # deferred
            self._value, self._fn = self._fn(), None
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None
        self._keep = ()
        return self._value


class SideStream:
    """Runs owner-side estimator work off the critical path (see module doc).

    Args:
        device: the parameters' device; the side stream lives there.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mode = side_stream_mode(device)
        self._stream = torch.cuda.Stream(device=device) if self.mode == "stream" else None

    @property
    def defers(self) -> bool:
        """Whether a launched result may be incomplete until :meth:`SideWork.result`."""
        return self.mode != "inline"

    def launch(self, fn: Callable[[], Any], keep: Sequence[torch.Tensor] = ()) -> SideWork:
        """Start ``fn()`` (which reads ``keep``, produced on the current stream)."""
        if self.mode == "inline":
            return SideWork(None, fn(), None, ())
        if self.mode == "deferred":
            return SideWork(fn, None, None, tuple(keep))
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            value = fn()
            event = torch.cuda.Event()
            event.record(stream)
        return SideWork(None, value, event, tuple(keep))
