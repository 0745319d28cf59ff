"""Flat bucket storage of the ZeRO engine: parameters and gradients as views of two flat
buffers, bucket reductions launched from backward hooks, parameter gathers awaited at first use.

The buckets of the :class:`~lanton_dist.engine.layout.Layout` lie end to end in one flat
gradient buffer and one flat parameter buffer (``padded_numel`` elements each, on the
parameters' device and dtype). Every parameter's pieces lie back to back there
(:meth:`Layout.flat_spans`), so a parameter *is* a view of the parameter buffer (``p.data``
re-pointed) and its ``p.grad`` a view of the gradient buffer: autograd accumulates in place in
the bucket (DDP's ``gradient_as_bucket_view``) and the gather writes the updated chunks straight
into the model. Only a parameter of another dtype or device than the first keeps its own storage
and is copied in before the reduction and out after the gather: :attr:`copied` names them,
the planner counts their bytes. Every collective runs in place on a bucket
(:meth:`BucketStorage._collect`): a bucket of equal chunks is one reduce-scatter (its output
this rank's chunk) and one all-gather; a bucket of unequal chunks (whole matrices on their
owners) is one reduce to, and one broadcast from, each rank with a non-empty chunk, issued in
rank order; its per-rank chunks (:class:`~lanton_dist.engine.meter.Chunks`: a view per
non-empty chunk, one shared empty view for the rest) are built once per buffer at
construction, so a step does no Python work per rank (``docs/scale_costs.md``). The owned
pieces' ``grad`` and ``param`` are views of this rank's chunks; after a reduce the other
chunks of the gradient buffer are scratch.

Gradient presence (``present``): a parameter has a gradient on this rank iff autograd
accumulated one since the last step (a post-accumulate hook), or ``p.grad`` was assigned
another tensor; ``p.grad = None`` withdraws it. The buffer is zeroed lazily by the first
backward after a step (a pre-accumulate hook), by :meth:`zero_grad`, or at the next step,
so the owned pieces' reduced gradients stay readable after ``step()``.

Early work: with ``on_reduced`` set, launching bucket b+1 from a hook first waits for bucket b's
reduction (on a GPU a stream dependency, not a host wait), takes its mean and calls
``on_reduced(b)``: the owners' reduced gradients in bucket b are final from then on (the ZeRO
engine starts their owner step, :meth:`~lanton_dist.engine.core.ShardedCore.start_owner_step`).

Overlap: with ``can_launch()`` true (the optimizer's switch, outside ``no_sync``, not the first
half-batch of Option II) the hook of a bucket's last pending parameter launches that bucket's
async reduction while backward goes on — in bucket order (bucket 0 holds the last
parameters, the first gradients backward produces), so every rank issues the same sequence of
collectives. Buckets whose parameters did not all report are launched by :meth:`reduce`.
A gradient arriving after its bucket was launched is an error.
All collectives run over the optimizer's data-parallel group (``coll``).
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lanton_dist.engine.layout import Layout, Piece
from lanton_dist.engine.meter import Chunks, Collectives, Handle


class BucketStorage:
    """Flat buffers, views and hooks for ``params`` (name → parameter, every parameter of the
    layout) under ``layout`` on this rank of ``coll`` (module doc)."""

    def __init__(self, layout: Layout, params: dict[str, nn.Parameter], coll: Collectives,
                 can_launch: Callable[[], bool], device: torch.device, dtype: torch.dtype,
                 on_reduced: Callable[[int], None] | None = None) -> None:
        self.layout, self.coll, self.can_launch, self.on_reduced = layout, coll, can_launch, on_reduced
        self.world, self.rank = coll.world, coll.rank
        self.params = params
        padded = layout.padded_numel
        self.grad_buffer = torch.zeros(padded, device=device, dtype=dtype)
        self.param_buffer = torch.zeros(padded, device=device, dtype=dtype)
        self.half_buffer: torch.Tensor | None = None
        starts = layout.bucket_starts
        self._bucket_span = [(s, s + b.numel) for s, b in zip(starts, layout.buckets)]
        self._uniform = [b.uniform for b in layout.buckets]
        self._own = [(s + b.start_of(self.rank), s + b.start_of(self.rank) + b.segments[self.rank])
                     for s, b in zip(starts, layout.buckets)]
        # every uneven bucket's per-rank chunks, built once per buffer (not per collective)
        self._grad_views = self._chunk_views(self.grad_buffer)
        self._param_views = [None if c is None else c.on(self.param_buffer) for c in self._grad_views]
        self._half_views: list[Chunks | None] = []
        self._placed: list[list[tuple[Piece, int]]] = [
            [(pc, s + b.start_of(pc.rank) + pc.offset) for pc in b.pieces] for s, b in zip(starts, layout.buckets)]
        self.buckets_of: dict[str, list[int]] = {}
        for bi, b in enumerate(layout.buckets):
            for pc in b.pieces:
                if bi not in self.buckets_of.setdefault(pc.name, []):
                    self.buckets_of[pc.name].append(bi)
        spans = layout.flat_spans()
        self.views: dict[str, tuple[int, int]] = {}
        self.copied: list[str] = []
        for name, p in params.items():
            span = spans[name]
            if span is not None and p.dtype == dtype and p.device == device:
                self.views[name] = span
            else:
                self.copied.append(name)
        with torch.no_grad():
            for name, p in params.items():
                if name in self.views:
                    a, z = self.views[name]
                    self.param_buffer[a:z].copy_(p.detach().reshape(-1))
                    grad = p.grad
                    p.data = self.param_buffer[a:z].view_as(p)
                    p.grad = self.grad_buffer[a:z].view_as(p)
                    if grad is not None:
                        p.grad.copy_(grad)
            for placed in self._placed:
                for pc, at in placed:
                    if pc.name not in self.views:
                        self.param_buffer[at : at + pc.numel].copy_(params[pc.name].detach().reshape(-1)[pc.start : pc.stop])
        self.present: set[str] = set()
        self.half_present: set[str] = set()
        self._stale = False
        self._pending_count: list[int] = []
        self._fired: set[str] = set()
        self._next = 0
        self._version = 0  # grad_buffer's version counter after the last hook (in-place edits bump it)
        self._copied_sent: dict[str, tuple[torch.Tensor, int]] = {}  # copied grads in flight, and their versions
        self._reducing: dict[int, list[Handle]] = {}
        self._settled: set[int] = set()   # buckets whose reduction landed during backward (mean taken)
        self._gathering: dict[int, list[Handle]] = {}
        self._reset_counts()
        self._hooks = []
        me = weakref.ref(self)  # the hooks neither keep a dropped optimizer alive nor act for it
        for name, p in params.items():
            if p.requires_grad:
                self._hooks.append(p.register_hook(functools.partial(_pre_accumulate, me, name)))
                self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_accumulated, me, name)))

    # ------------------------------------------------------------------ views
    def own_param(self, bucket: int, piece: Piece) -> torch.Tensor:
        """This rank's ``piece`` of bucket ``bucket`` in the parameter buffer (1-D view)."""
        at = self._own[bucket][0] + piece.offset
        return self.param_buffer[at : at + piece.numel]

    def own_grad(self, bucket: int, piece: Piece) -> torch.Tensor:
        """This rank's ``piece`` of the reduced gradient (1-D view; valid after :meth:`reduce`)."""
        at = self._own[bucket][0] + piece.offset
        return self.grad_buffer[at : at + piece.numel]

    def own_half(self, bucket: int, piece: Piece) -> torch.Tensor:
        """Option II: this rank's ``piece`` of the reduced first half-batch gradient."""
        at = self._own[bucket][0] + piece.offset
        return self.half_buffer[at : at + piece.numel]

    def _view(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        a, z = self.views[name]
        return buf[a:z].view_as(self.params[name])

    # ------------------------------------------------------------------ hooks
    def _owns(self, name: str) -> bool:
        """Whether the parameter is still this storage's (not re-pointed by a later optimizer)."""
        return name not in self.views or self.params[name].data_ptr() == self._view(name, self.param_buffer).data_ptr()

    def pre_accumulate(self) -> None:
        """Before autograd accumulates into a gradient: zero the buffer if a step spent it."""
        if self._stale:
            self._clear()

    def accumulated(self, name: str, p: torch.Tensor) -> None:
        """After autograd accumulated ``p.grad``: adopt it, mark it present, launch ready buckets."""
        self._adopt(name, p)
        self.present.add(name)
        if not self.can_launch():
            return
        if any(b in self._reducing for b in self.buckets_of[name]):
            raise RuntimeError(f"{name}: a gradient arrived after its bucket's reduce-scatter started; "
                               "run all but the last micro-batch inside optimizer.no_sync(), or turn "
                               "overlap_grad_reduce off")
        if name in self._fired:
            return
        self._fired.add(name)
        for b in self.buckets_of[name]:
            self._pending_count[b] -= 1
        while self._next < len(self._pending_count) and self._pending_count[self._next] == 0:
            self._launch(self._next)
            if self._next and self.on_reduced is not None:
                self._settle(self._next - 1)
                self.on_reduced(self._next - 1)
            self._next += 1
        self._version = self.grad_buffer._version

    @torch.no_grad()
    def _adopt(self, name: str, p: torch.Tensor) -> None:
        """Make a view parameter's ``p.grad`` the bucket view again, keeping its value."""
        if name not in self.views:
            return
        view = self._view(name, self.grad_buffer)
        g = p.grad
        if g is None or g.data_ptr() != view.data_ptr():
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view

    # ------------------------------------------------------------------ gradients
    def _reset_counts(self) -> None:
        """Hooks launch buckets in index order only (every rank issues the same collective
        sequence): bucket ``_next`` once all its parameters reported, then the next."""
        self._pending_count = [len({pc.name for pc in b.pieces}) for b in self.layout.buckets]
        self._fired = set()
        self._next = 0
        self._copied_sent = {}
        self._settled = set()

    @torch.no_grad()
    def _clear(self) -> None:
        """Zero the gradient buffer (views kept) and forget presence."""
        self.grad_buffer.zero_()
        self.present.clear()
        self._stale = False

    @torch.no_grad()
    def collect(self) -> None:
        """Before a reduction: take ``p.grad`` as the user left it (None withdraws a gradient,
        another tensor replaces it) into the buffer and ``present``. Raises if a bucket already
        being reduced would change."""
        edited = bool(self._reducing) and self.grad_buffer._version != self._version
        for name, (grad, version) in self._copied_sent.items():
            edited = edited or self.params[name].grad is not grad or grad._version != version
        if edited:
            raise RuntimeError("gradients were changed in place after backward while their reduce-scatter was in "
                               "flight (overlap_grad_reduce); change them inside backward, or turn overlap off")
        if self._stale:
            self._clear()
        for name, p in self.params.items():
            if name in self.views and p.data_ptr() != self._view(name, self.param_buffer).data_ptr():
                raise RuntimeError(f"{name}: the parameter's data was replaced after the optimizer was built; "
                                   "call optimizer.sync_from_model() to take it into the buckets")
            g = p.grad
            has = g is not None
            if name in self.views:
                same = has and g.data_ptr() == self._view(name, self.grad_buffer).data_ptr()
                if not same and any(b in self._reducing for b in self.buckets_of[name]):
                    raise RuntimeError(f"{name}: p.grad was replaced after its bucket's reduce-scatter started")
                has = name in self.present if same else has
                self._adopt(name, p)
            (self.present.add if has else self.present.discard)(name)

    def _copy_in(self, b: int, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Copied parameters' gradients of bucket ``b`` into their places in ``buf`` (zeros where
        a parameter has none); returns the ``(name, gradient)`` pairs copied."""
        copied = []
        for pc, at in self._placed[b]:
            if pc.name in self.views:
                continue
            g = self.params[pc.name].grad
            target = buf[at : at + pc.numel]
            if g is None:
                target.zero_()
            else:
                target.copy_(g.reshape(-1)[pc.start : pc.stop])
                copied.append((pc.name, g))
        return copied

    def _launch(self, b: int, phase: str = "grad_reduce", buf: torch.Tensor | None = None) -> None:
        buf = self.grad_buffer if buf is None else buf
        if buf is self.grad_buffer:
            self._copied_sent.update((name, (g, g._version)) for name, g in self._copy_in(b, buf))
        self._reducing[b] = self._collect(b, buf, phase, gather=False)

    def _collect(self, b: int, buf: torch.Tensor, phase: str, *, gather: bool) -> list[Handle]:
        """Launch bucket ``b``'s SUM reduction into the chunks (``gather=False``) or the gather of
        the chunks (``gather=True``) on ``buf``, in place: a reduce-scatter / all-gather when its
        chunks are equal, else one grouped call over the unequal chunks
        (:meth:`~lanton_dist.engine.meter.Collectives.reduce_chunks` / ``broadcast_chunks``)."""
        a, z = self._bucket_span[b]
        if self._uniform[b]:
            o, e = self._own[b]
            op = self.coll.all_gather if gather else self.coll.reduce_scatter
            return [op(buf[a:z], buf[o:e], phase) if gather else op(buf[o:e], buf[a:z], phase)]
        views = self._grad_views if buf is self.grad_buffer else self._param_views if buf is self.param_buffer else None
        if buf is self.half_buffer:
            views = self._half_views
        if views is None:
            raise RuntimeError("bucket collectives run on the gradient, parameter or half-batch buffer only")
        chunks = views[b]
        return self.coll.broadcast_chunks(chunks, phase) if gather else self.coll.reduce_chunks(chunks, phase)

    def _chunk_views(self, buf: torch.Tensor) -> list[Chunks | None]:
        """The :class:`~lanton_dist.engine.meter.Chunks` of every uneven bucket of ``buf`` (None
        for a uniform bucket): a view per non-empty chunk, one shared empty view for the rest."""
        return [None if uniform else Chunks(buf, s, b.segments)
                for s, b, uniform in zip(self.layout.bucket_starts, self.layout.buckets, self._uniform)]

    def reduce(self) -> None:
        """Reduce (mean) every bucket not launched by a hook yet, wait for all; the owned
        pieces' gradients (:meth:`own_grad`) then hold the mean over the group. Copied
        parameters' own gradients are freed (ZeRO-2)."""
        self.collect()
        for b in range(self._next, len(self.layout.buckets)):
            self._launch(b)
        self._finish(self.grad_buffer)
        for name in self.copied:
            self.params[name].grad = None

    def _finish(self, buf: torch.Tensor) -> None:
        for b in range(len(self.layout.buckets)):
            if not (buf is self.grad_buffer and b in self._settled):
                self._mean(b, buf)
            self._reducing.pop(b)

    def _mean(self, b: int, buf: torch.Tensor) -> None:
        """Wait for bucket ``b``'s reduction on ``buf`` and divide this rank's chunk by the world."""
        for h in self._reducing[b]:
            h.wait()
        o, e = self._own[b]
        buf[o:e].div_(self.world)

    @torch.no_grad()
    def _settle(self, b: int) -> None:
        """During backward: :meth:`_mean` of bucket ``b`` now (its handles stay in ``_reducing``
        until :meth:`reduce`, so later edits are still caught); :meth:`own_grad` of its pieces is
        then final (``on_reduced``'s contract)."""
        self._mean(b, self.grad_buffer)
        self._settled.add(b)

    @torch.no_grad()
    def stash_half(self) -> None:
        """Option II: move the first half-batch's gradients into :attr:`half_buffer` (the one
        extra gradient-size buffer, bucket layout) and clear the gradients, views kept."""
        self.collect()
        self.half_buffer = self.grad_buffer.clone()
        self._half_views = [None if c is None else c.on(self.half_buffer) for c in self._grad_views]
        for b in range(len(self.layout.buckets)):
            self._copy_in(b, self.half_buffer)
        self.half_present = set(self.present)
        self._clear()
        for name in self.copied:
            self.params[name].grad = None

    def reduce_half(self) -> None:
        """Reduce (mean) the stashed half in place (phase ``grad_reduce_half``)."""
        for b in range(len(self.layout.buckets)):
            self._launch(b, "grad_reduce_half", self.half_buffer)
        self._finish(self.half_buffer)

    def done(self) -> None:
        """After a step: the buffer's contents are spent (zeroed by the next backward or step)."""
        self.half_buffer = None
        self._half_views = []
        self.half_present = set()
        self._reset_counts()
        self._stale = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients: views stay views (``set_to_none`` applies to copied parameters)."""
        self.wait_reductions()
        self._clear()
        for name, p in self.params.items():
            if name in self.views:
                p.grad = self._view(name, self.grad_buffer)
            elif set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self._reset_counts()

    @property
    def reductions_in_flight(self) -> int:
        """Buckets whose reduce-scatter was launched and not yet consumed by :meth:`reduce`."""
        return len(self._reducing)

    def wait_reductions(self) -> None:
        for handles in self._reducing.values():
            for h in handles:
                h.wait()
        self._reducing.clear()

    # ------------------------------------------------------------------ parameters
    def gather(self, phase: str, wait: bool = True) -> None:
        """Gather every bucket's chunks in place into the parameter buffer (async);
        ``wait=False`` leaves them in flight until :meth:`wait_params`."""
        self.wait_params()
        for b in range(len(self.layout.buckets)):
            self._gathering[b] = self._collect(b, self.param_buffer, phase, gather=True)
        if wait:
            self.wait_params()

    @torch.no_grad()
    def wait_params(self, buckets: Iterable[int] | None = None) -> None:
        """Wait for the in-flight all-gathers of ``buckets`` (None: all) and copy them into the
        copied parameters."""
        for b in list(self._gathering) if buckets is None else buckets:
            handles = self._gathering.pop(b, None)
            if handles is None:
                continue
            for h in handles:
                h.wait()
            for pc, at in self._placed[b]:
                if pc.name not in self.views:
                    self.params[pc.name].detach().view(-1)[pc.start : pc.stop].copy_(self.param_buffer[at : at + pc.numel])

    @property
    def gathering(self) -> bool:
        return bool(self._gathering)

    @torch.no_grad()
    def load_from_params(self) -> None:
        """Take the parameters' values into the parameter buffer: the copied ones, and view
        parameters whose ``data`` was replaced (they become views again)."""
        self.wait_params()
        for name in self.views:
            p = self.params[name]
            view = self._view(name, self.param_buffer)
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.detach())
                p.data = view
        for placed in self._placed:
            for pc, at in placed:
                if pc.name not in self.views:
                    self.param_buffer[at : at + pc.numel].copy_(self.params[pc.name].detach().reshape(-1)[pc.start : pc.stop])

    def attach(self, model: nn.Module) -> list:
        """Forward pre-hooks on ``model``'s modules that wait for the all-gathers of their own
        parameters' buckets, and a ``state_dict`` pre-hook that waits for all. Returns the handles."""
        bucket_of_param = {id(p): self.buckets_of[n] for n, p in self.params.items()}
        handles = []
        for module in model.modules():
            buckets = sorted({b for p in module.parameters(recurse=False) for b in bucket_of_param.get(id(p), [])})
            if buckets:
                handles.append(module.register_forward_pre_hook(lambda m, args, bs=tuple(buckets): self.wait_params(bs)))
        handles.append(model.register_state_dict_pre_hook(lambda *args, **kw: self.wait_params()))
        return handles


def _pre_accumulate(ref: weakref.ref, name: str, grad: torch.Tensor) -> None:
    storage = ref()
    if storage is not None and storage._owns(name):
        storage.pre_accumulate()


def _accumulated(ref: weakref.ref, name: str, p: torch.Tensor) -> None:
    storage = ref()
    if storage is not None and storage._owns(name):
        storage.accumulated(name, p)
