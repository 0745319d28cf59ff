"""ShardedLANTON: LANTON (and Scion, D-Muon, AdamW) over data-parallel ranks, ZeRO-1/2 style.

Every rank holds the full model and computes gradients on its rows of the global batch.
``step()``:

1. copies ``p.grad`` into the owner-aligned bucket buffers (:mod:`.layout`) and
   reduce-scatters them (async, all buckets in flight) — each owner receives whole reduced
   gradients of its matrices, everyone else's copies are freed (``p.grad = None``, ZeRO-2);
2. runs :class:`~lanton_dist.engine.core.ShardedCore` on this rank's segment: momentum,
   Newton–Schulz and (every k steps) the nuclear norm of each owned matrix — once per matrix
   across the job — elementwise work on the embed_head/vector pieces;
3. all-gathers the updated segments (async per bucket) and copies them into the parameters.

Tensor traffic is one reduce-scatter plus one all-gather of the padded model per step,
exactly what ZeRO AdamW moves on the same layout; the extra is the scalar ``finite``,
``norm`` and (estimation steps) ``variance`` all-reduces. Optimizer state lives only where
its piece lives. Process group: ``process_group`` (default: the world); tensors of the
buffers live on the parameters' device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lanton_dist.engine.core import LocalExchange, LocalPiece, MatrixExchange, ShardedCore
from lanton_dist.engine.layout import Layout, Piece, build_layout
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.engine.optimizer import ShardedOptimizer
from lanton_dist.engine.ownership import OwnershipPlan, plan_ownership
from lanton_dist.engine.phases import announces
from lanton_dist.groups import ParamSpec
from lanton_dist.lanton import run_closure
from lanton_dist.lmo import LMOConfig
from lanton_dist.names import ZERO_LAYOUTS

@dataclass(frozen=True)
class LogicalView:
    """How a local parameter (e.g. a tensor-parallel shard) sits in the logical tensor LANTON sees.

    ``spec``: the logical parameter; ``offset``: where this rank's local tensor starts in the
    logical flattening; ``weight``: this rank's share in the scalar sums (0 for a replica
    whose twin on another rank already contributes).
    """

    spec: ParamSpec
    offset: int = 0
    weight: float = 1.0


class ShardedLANTON(ShardedOptimizer):
    """Data-parallel sharded optimizer (see module doc).

    Args:
        params: param groups with ``specs`` (``lanton_dist.param_groups``); the same on every rank.
        algorithm: ``lanton`` | ``scion`` | ``dmuon`` | ``adamw``.
        process_group: data-parallel group (``None``: world).
        bucket_mb: target bucket size; fewer buckets are used if whole matrices would pad > 1%.
        overlap: consume the variance all-reduce at the next step (one-step-late rate factors,
            equal to the reference with ``delay_lr_factor=True``); False waits for it.
        layout: ``owner`` (default) or ``plain`` (no owners: the plain ZeRO AdamW layout, only
            for ``algorithm='adamw'``, as a traffic baseline).
        meter: a :class:`CommMeter` to record into (a new one by default).
        logical: param spec name → :class:`LogicalView` when local parameters are shards of
            larger logical ones (tensor parallelism); the layout uses the local shapes, the
            math the logical ones.
        exchange: how owned hidden pieces become whole matrices (default: they already are).
        scalar_world: run the scalar reductions over the whole job instead of
            ``process_group`` (needed when other groups — TP, PP — hold other parts of the model).
        clip_grad_norm: global gradient-norm clipping (0: off; :class:`~.core.ShardedCore`).
        Remaining keyword arguments are the algorithm's hyper-parameters (as in
        :class:`~lanton_dist.lanton.LANTON` / :class:`~lanton_dist.dmuon.DMuon`).
    """

    def __init__(self, params: Iterable[dict[str, Any]], algorithm: str = "lanton", *,
                 process_group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0, overlap: bool = True,
                 layout: str = "owner", meter: CommMeter | None = None, estimate_every: int = 10, option: str = "I",
                 ratio_anchor: str = "max", nuclear_estimator: str = "auto", wd_lr: str = "group",
                 lmo: LMOConfig | None = None, skip_nonfinite: bool = True,
                 logical: dict[str, LogicalView] | None = None, exchange: MatrixExchange | None = None,
                 scalar_world: bool = False, clip_grad_norm: float = 0.0, **hyper: Any) -> None:
        if layout not in ZERO_LAYOUTS or (layout == "plain" and algorithm != "adamw"):
            raise ValueError("layout must be 'owner', or 'plain' with algorithm='adamw' (whole matrices need owners)")
        super().__init__(params, algorithm, process_group=process_group, meter=meter, **hyper)
        scalar_coll = Collectives(self.meter, None, "world") if scalar_world else self.coll
        self._params = [(p, s, gi) for gi, g in enumerate(self.param_groups) for p, s in zip(g["params"], g["specs"])]
        specs = [s for _, s, _ in self._params]
        self._check_same_model(self._signature(specs), "model/parameter list; every data-parallel rank must build "
                                                       "the same model")
        ns_steps = (lmo or LMOConfig()).ns_steps
        self.plan: OwnershipPlan = plan_ownership(specs, self.world, ns_steps)
        elem = self._params[0][0].element_size() if self._params else 4
        self.layout: Layout = build_layout(specs, None if layout == "plain" else self.plan, self.world,
                                           int(bucket_mb * 2**20 / elem))
        self._by_name = {s.name: (p, s, gi) for p, s, gi in self._params}
        device = self._params[0][0].device if self._params else torch.device("cpu")
        dtype = self._params[0][0].dtype if self._params else torch.float32
        self._grad_bufs = [torch.zeros(b.segment * self.world, device=device, dtype=dtype) for b in self.layout.buckets]
        self._param_bufs = [torch.zeros(b.segment * self.world, device=device, dtype=dtype) for b in self.layout.buckets]
        self.pieces: list[LocalPiece] = []
        self._placements: list[Piece] = []  # layout piece of each entry of self.pieces
        for b, buf, gbuf in zip(self.layout.buckets, self._param_bufs, self._grad_bufs):
            base = self.rank * b.segment
            for pc in b.on_rank(self.rank):
                p, s, gi = self._by_name[pc.name]
                seg = slice(base + pc.offset, base + pc.offset + pc.numel)
                buf[seg].copy_(p.detach().reshape(-1)[pc.start : pc.stop])
                view = (logical or {}).get(s.name, LogicalView(s))
                self.pieces.append(LocalPiece(view.spec, gi, view.offset + pc.start, view.offset + pc.stop,
                                              buf[seg], gbuf[seg], weight=view.weight))
                self._placements.append(pc)
        core_specs = specs
        if logical is not None:
            core_specs = self._job_specs([logical[s.name].spec if s.name in logical else s for s in specs], scalar_coll)
        self._core_name = {s.name: (logical[s.name].spec.name if logical and s.name in logical else s.name)
                           for _, s, _ in self._params}
        group_of = {self._core_name[s.name]: gi for _, s, gi in self._params}
        group_of.update({s.name: self._group_by_geometry(s) for s in core_specs if s.name not in group_of})
        self.core = ShardedCore(core_specs, group_of, self.param_groups, algorithm,
                                scalar_coll, exchange or LocalExchange(), estimate_every=estimate_every, option=option,
                                ratio_anchor=ratio_anchor, overlap=overlap, nuclear_estimator=nuclear_estimator,
                                wd_lr=wd_lr, lmo=lmo, skip_nonfinite=skip_nonfinite, dtype=dtype,
                                clip_grad_norm=clip_grad_norm)
        self.meter.step = 0
        self._all_gather_params("init_sync")

    # ------------------------------------------------------------------ API
    def _local_pieces(self) -> list[LocalPiece]:
        return self.pieces

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        """Option II stash: full local gradients (both halves are reduce-scattered at ``step``)."""
        return [(s.name, p) for p, s, _ in self._params]

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Copy the model's parameters into this rank's pieces (after loading weights)."""
        for piece, pc in zip(self.pieces, self._placements):
            piece.param.copy_(self._by_name[pc.name][0].detach().reshape(-1)[pc.start : pc.stop])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        with self._stepping():
            present = [self._core_name[s.name] for p, s, _ in self._params if p.grad is not None or self._has_half(s.name)]
            grads = self._reduce_scatter(lambda s: self._grad_of(s), "grad_reduce", self._grad_bufs)
            halves = None
            if self._half is not None:
                half_bufs = [torch.zeros_like(b) for b in self._grad_bufs]
                halves = self._reduce_scatter(lambda s: self._half.get(s.name), "grad_reduce_half", half_bufs)
                self._half = None
            for p, _, _ in self._params:
                p.grad = None
            for pc, place in zip(self.pieces, self._placements):
                pc.grad = grads[(place.name, place.start)]
            self._combine_halves(self.pieces, None if halves is None else
                                 [halves[(place.name, place.start)] for place in self._placements])
            if self.core.step(self.pieces, present):
                self._all_gather_params("param_gather")
        return loss

    # ------------------------------------------------------------------ internals
    def _group_by_geometry(self, spec: ParamSpec) -> int:
        """Param group of a layer held by another pipeline stage: the local group of its geometry."""
        for gi, g in enumerate(self.param_groups):
            if any(s.geometry is spec.geometry for s in g["specs"]):
                return gi
        raise ValueError(f"{spec.name}: no local param group has geometry {spec.geometry.value}; "
                         "every pipeline stage needs the same hyper-parameters per geometry")

    @staticmethod
    def _job_specs(local: list[ParamSpec], coll: Collectives) -> list[ParamSpec]:
        """Every logical parameter of the whole job (all pipeline stages), sorted by name."""
        gathered: list[Any] = [None] * coll.world
        if coll.world > 1:
            dist.all_gather_object(gathered, local, group=coll.group)
        else:
            gathered = [local]
        by_name: dict[str, ParamSpec] = {}
        for specs in gathered:
            for s in specs:
                if by_name.setdefault(s.name, s) != s:
                    raise ValueError(f"{s.name}: ranks disagree on its logical spec")
        return [by_name[n] for n in sorted(by_name)]

    def _grad_of(self, spec) -> torch.Tensor | None:
        return self._by_name[spec.name][0].grad

    @announces()
    def _reduce_scatter(self, source, phase: str, bufs: list[torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
        """Fill ``bufs`` from ``source(spec)`` (full local grads), reduce-scatter (mean) all buckets.
        A rank without a gradient contributes zeros (DDP's convention); whether a parameter is
        stepped at all is the core's job-wide presence vote (``step``'s ``present``)."""
        handles, outs = [], []
        for b, buf in zip(self.layout.buckets, bufs):
            buf.zero_()
            for pc in b.pieces:
                g = source(self._by_name[pc.name][1])
                if g is not None:
                    at = pc.rank * b.segment + pc.offset
                    buf[at : at + pc.numel].copy_(g.reshape(-1)[pc.start : pc.stop])
            out = torch.empty(b.segment, device=buf.device, dtype=buf.dtype)
            handles.append(self.coll.reduce_scatter(out, buf, phase))
            outs.append(out)
        result = {}
        for b, h, out in zip(self.layout.buckets, handles, outs):
            h.wait()
            out.div_(self.world)
            for pc in b.on_rank(self.rank):
                result[(pc.name, pc.start)] = out[pc.offset : pc.offset + pc.numel]
        return result

    @announces()
    def _all_gather_params(self, phase: str) -> None:
        handles = []
        for b, buf in zip(self.layout.buckets, self._param_bufs):
            mine = buf[self.rank * b.segment : (self.rank + 1) * b.segment]
            handles.append(self.coll.all_gather(buf, mine, phase))
        for b, buf, h in zip(self.layout.buckets, self._param_bufs, handles):
            h.wait()
            for pc in b.pieces:
                p = self._by_name[pc.name][0]
                at = pc.rank * b.segment + pc.offset
                p.detach().view(-1)[pc.start : pc.stop].copy_(buf[at : at + pc.numel])

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("ShardedLANTON state is sharded: save it with lanton_dist.engine.checkpoint.save(...)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("ShardedLANTON state is sharded: load it with lanton_dist.engine.checkpoint.load(...)")


def build_sharded_optimizer(model: torch.nn.Module, cfg, *, process_group: dist.ProcessGroup | None = None,
                            bucket_mb: float = 25.0, overlap: bool = True, meter: CommMeter | None = None,
                            groups: list[dict[str, Any]] | None = None) -> ShardedLANTON:
    """:class:`ShardedLANTON` for ``cfg.name`` with the same hyper-parameters as
    :func:`lanton_dist.factory.build_optimizer` (``cfg``: :class:`~lanton_dist.config.OptimConfig`)."""
    from lanton_dist.factory import hyper_parameters, lanton_options, param_groups

    groups = groups if groups is not None else param_groups(model, cfg)
    return ShardedLANTON(groups, cfg.name, process_group=process_group, bucket_mb=bucket_mb, overlap=overlap,
                         meter=meter, **lanton_options(cfg), **hyper_parameters(cfg))
