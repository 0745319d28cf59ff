"""ShardedLANTON: LANTON (and Scion, D-Muon, AdamW) over data-parallel ranks, ZeRO-1/2 style.

Every rank holds the full model and computes gradients on its rows of the global batch.
Parameters and gradients are views of two flat bucket buffers (:mod:`.buckets`): autograd
accumulates straight into the bucket layout (:mod:`.layout`: whole matrices on their owners,
any bucket size), and with ``overlap_grad_reduce`` each bucket's reduction starts from a
backward hook as soon as its last gradient is ready (outside :meth:`ShardedLANTON.no_sync`)
and owners start Newton–Schulz on each bucket that has landed. ``step()``:

1. launches the buckets not launched yet and waits for all — each owner receives whole
   reduced gradients of its matrices, in place in its chunks of the gradient buffer;
2. runs :class:`~lanton_dist.engine.core.ShardedCore` on this rank's chunks: momentum,
   Newton–Schulz and (every k steps) the nuclear norm of each owned matrix — once per matrix
   across the job; with ``ns_split_tolerance`` the largest matrices' Newton–Schulz runs by
   columns over a team of ranks (:mod:`.splitns`) — elementwise work on the embed_head/vector pieces;
3. gathers the updated chunks in place into the parameter buffer, i.e. into the model;
   after :meth:`ShardedLANTON.attach` the gathers stay in flight until a module's forward
   (or the model's ``state_dict``, the next step, ``sync_from_model``, :meth:`wait_params`)
   needs them.

Tensor traffic is one reduction plus one gather of the model per step — a rank sends the
model minus its own chunks each way, within ``1/world`` of a reduce-scatter plus all-gather —
exactly what ZeRO AdamW moves on the same layout; the extra is the scalar ``finite``,
``norm`` and (estimation steps) ``variance`` all-reduces. Memory: the model in the parameter
buffer, its gradient in the gradient buffer (plus own copies of parameters of another dtype or
device, :attr:`ShardedLANTON.copied_params`), optimizer state only where its
piece lives; Option II adds one gradient-size buffer on estimation steps. Process group:
``process_group`` (default: the world); tensors of the buffers live on the parameters' device.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lanton_dist import lmo as lmo_mod
from lanton_dist.engine import agree
from lanton_dist.engine.buckets import BucketStorage
from lanton_dist.engine.core import LocalExchange, LocalPiece, MatrixExchange, ShardedCore
from lanton_dist.engine.layout import Layout, Piece, build_layout
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.engine.optimizer import ShardedOptimizer
from lanton_dist.engine.ownership import OwnershipPlan, plan_ownership
from lanton_dist.engine.phases import announces
from lanton_dist.engine.splitns import SplitNewtonSchulz
from lanton_dist.groups import Geometry, ParamSpec
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
        bucket_mb: bucket size cap (a matrix larger than it is a bucket of its own: never cut).
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
        overlap_grad_reduce: launch each bucket's reduction from the backward hook of its
            last gradient (False: all at ``step()``), and start the owner step (momentum copy,
            Newton–Schulz) of the matrices of each bucket that has landed, during backward
            (:meth:`~lanton_dist.engine.core.ShardedCore.start_owner_step`; not with
            ``ns_split_tolerance``, ``logical`` or ``exchange``); the result is the same, bit
            for bit, but gradients can then no longer be changed in place between backward and
            ``step()`` (an error).
        ns_split_tolerance: ``None`` (default): each matrix's Newton–Schulz runs whole on its
            owner. A number τ ≥ 0: the largest matrices of ranks whose NS FLOPs exceed
            ``(1 + τ)·mean`` are split by columns over teams of ranks
            (:mod:`lanton_dist.engine.splitns`; phases ``ns_split_scatter``, ``ns_gram``,
            ``ns_gram_gather``, ``ns_split_gather``). Off by default: across nodes at TP 1 the
            Gram collectives (two ``m × m`` per quintic step) cost more time than the balance
            saves (``lanton-dist plan``). Needs the world as ``process_group``, the default
            exchange, no ``logical`` views, an algorithm with a hidden-matrix LMO (lanton,
            scion, dmuon) and no ``lmo.ns_compile``.
        Remaining keyword arguments are the algorithm's hyper-parameters (as in
        :class:`~lanton_dist.lanton.LANTON` / :class:`~lanton_dist.dmuon.DMuon`).
    """

    def __init__(self, params: Iterable[dict[str, Any]], algorithm: str = "lanton", *,
                 process_group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0, overlap: bool = True,
                 layout: str = "owner", meter: CommMeter | None = None, estimate_every: int = 10, option: str = "I",
                 ratio_anchor: str = "max", nuclear_estimator: str = "auto", wd_lr: str = "group",
                 lmo: LMOConfig | None = None, skip_nonfinite: bool = True,
                 logical: dict[str, LogicalView] | None = None, exchange: MatrixExchange | None = None,
                 scalar_world: bool = False, clip_grad_norm: float = 0.0, overlap_grad_reduce: bool = False,
                 ns_split_tolerance: float | None = None, **hyper: Any) -> None:
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
        self.overlap_grad_reduce = overlap_grad_reduce
        self._sync = True
        self._attached = False
        # owners start Newton–Schulz on a bucket as its reduction lands (whole matrices held here)
        early = algorithm != "adamw" and ns_split_tolerance is None and logical is None and exchange is None
        self.storage = BucketStorage(self.layout, {s.name: p for p, s, _ in self._params}, self.coll,
                                     self._can_launch, device, dtype, self._start_owner_steps if early else None)
        self.pieces: list[LocalPiece] = []
        self._placements: list[tuple[int, Piece]] = []  # (bucket, layout piece) of each entry of self.pieces
        for bi, b in enumerate(self.layout.buckets):
            for pc in b.on_rank(self.rank):
                _, s, gi = self._by_name[pc.name]
                view = (logical or {}).get(s.name, LogicalView(s))
                self.pieces.append(LocalPiece(view.spec, gi, view.offset + pc.start, view.offset + pc.stop,
                                              self.storage.own_param(bi, pc), self.storage.own_grad(bi, pc),
                                              weight=view.weight))
                self._placements.append((bi, pc))
        self._owned_in_bucket: list[list[int]] = [[] for _ in self.layout.buckets]
        for i, (pc, (bi, _)) in enumerate(zip(self.pieces, self._placements)):
            if pc.spec.geometry is Geometry.HIDDEN:
                self._owned_in_bucket[bi].append(i)
        polar = self._per_bucket(lmo_mod.hidden_directions) if early else None
        if ns_split_tolerance is not None:
            self._check_split(algorithm, logical, exchange, lmo)
            polar = SplitNewtonSchulz(specs, self.plan, ns_split_tolerance, ns_steps, self.coll, device, dtype)
        core_specs = specs
        if logical is not None:
            core_specs = self._job_specs([logical[s.name].spec if s.name in logical else s for s in specs], scalar_coll,
                                         device)
        self._core_name = {s.name: (logical[s.name].spec.name if logical and s.name in logical else s.name)
                           for _, s, _ in self._params}
        group_of = {self._core_name[s.name]: gi for _, s, gi in self._params}
        group_of.update({s.name: self._group_by_geometry(s) for s in core_specs if s.name not in group_of})
        self.core = ShardedCore(core_specs, group_of, self.param_groups, algorithm,
                                scalar_coll, exchange or LocalExchange(), estimate_every=estimate_every, option=option,
                                ratio_anchor=ratio_anchor, overlap=overlap, nuclear_estimator=nuclear_estimator,
                                wd_lr=wd_lr, lmo=lmo, skip_nonfinite=skip_nonfinite, dtype=dtype,
                                clip_grad_norm=clip_grad_norm, polar=polar)
        self.meter.step = 0
        self._all_gather_params("init_sync")

    # ------------------------------------------------------------------ API
    def _local_pieces(self) -> list[LocalPiece]:
        return self.pieces

    @torch.no_grad()
    def stash_half_gradient(self) -> None:
        """Option II: keep the first half-batch's local gradients and clear the gradients
        (weight each half's loss by 1/2; both halves are reduce-scattered at ``step``)."""
        self.storage.stash_half()

    @property
    def copied_params(self) -> list[str]:
        """Parameters kept in their own storage, copied to and from the buckets (:mod:`.buckets`)."""
        return list(self.storage.copied)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: backward passes inside accumulate locally, launching no
        reduce-scatter (as DDP's ``no_sync``); the pass after it, or ``step()``, reduces."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def attach(self, model: torch.nn.Module) -> None:
        """Leave the parameter all-gathers of ``step()`` in flight: a forward pre-hook on each
        module of ``model`` waits for its own parameters' buckets, a ``state_dict`` pre-hook for
        all. Parameters read any other way need :meth:`wait_params` first."""
        held = {id(p) for p in model.parameters()}
        if not all(id(p) in held for p, _, _ in self._params):
            raise ValueError("attach(model): model does not hold every parameter of this optimizer")
        self.storage.attach(model)
        self._attached = True

    def wait_params(self) -> None:
        """Wait for the parameter all-gathers still in flight (after :meth:`attach`)."""
        self.storage.wait_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer; the parameters' ``grad`` stay views of it whatever
        ``set_to_none`` (it applies to :attr:`copied_params`); owner steps started for the
        discarded gradients are dropped."""
        self.storage.zero_grad(set_to_none)
        self.core.drop_early()

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Take the model's parameters as they are now into the buckets (after loading weights;
        a parameter whose ``data`` was replaced becomes a bucket view again)."""
        self.storage.load_from_params()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        with self._stepping():
            self.storage.wait_params()
            self._reduce_scatter("grad_reduce")
            present = [self._core_name[n] for n in self.storage.present | self.storage.half_present]
            halves = None
            if self.storage.half_buffer is not None:
                self._reduce_scatter("grad_reduce_half")
                halves = [self.storage.own_half(b, place) for b, place in self._placements]
            for pc, (b, place) in zip(self.pieces, self._placements):
                pc.grad = self.storage.own_grad(b, place)
            self._combine_halves(self.pieces, halves)
            stepped = self.core.step(self.pieces, present)
            self._release_differences(self.pieces)
            if stepped:
                self._all_gather_params("param_gather")
            self.storage.done()
        return loss

    # ------------------------------------------------------------------ internals
    def _start_owner_steps(self, bucket: int) -> None:
        """``BucketStorage.on_reduced``: the owner step of this rank's matrices in ``bucket``
        starts now, during backward (not on Option II estimation steps, whose gradient is the
        sum of two half-batches)."""
        idx = self._owned_in_bucket[bucket]
        if idx and self.storage.half_buffer is None:
            self.core.start_owner_step([self.pieces[i].name for i in idx],
                                       [self.storage.own_grad(bucket, self._placements[i][1]) for i in idx])

    def _per_bucket(self, polar: Callable[..., list[torch.Tensor]]) -> Callable[..., list[torch.Tensor]]:
        """``polar`` batched per bucket (as the early owner steps run it), so the step computes
        the same whether a bucket's Newton–Schulz started during backward or not."""
        bucket_of = {pc.name: b for b, pc in self._placements}

        @functools.wraps(polar)
        def per_bucket(specs: list[ParamSpec], mats: list[torch.Tensor], lmo: LMOConfig) -> list[torch.Tensor]:
            batches: dict[int, list[int]] = {}
            for i, s in enumerate(specs):
                batches.setdefault(bucket_of[s.name], []).append(i)
            out: list[torch.Tensor] = [mats[0]] * len(specs)
            for idx in batches.values():
                for i, d in zip(idx, polar([specs[i] for i in idx], [mats[i] for i in idx], lmo)):
                    out[i] = d
            return out

        return per_bucket

    @staticmethod
    def _check_split(algorithm: str, logical: dict[str, LogicalView] | None,
                     exchange: MatrixExchange | None, lmo: LMOConfig | None) -> None:
        """``ValueError`` for a split Newton–Schulz the engine cannot run (``ns_split_tolerance`` doc)."""
        if algorithm == "adamw":
            raise ValueError("ns_split_tolerance splits the hidden matrices' Newton–Schulz: algorithm 'adamw' runs none")
        if logical is not None or exchange is not None:
            raise ValueError("ns_split_tolerance runs on whole matrices held by their owners: it cannot be combined with "
                             "logical (tensor-parallel) views or a custom exchange")
        if lmo is not None and lmo.ns_compile is not None:
            raise ValueError(f"ns_split_tolerance cannot run with lmo.ns_compile={lmo.ns_compile!r}: the split iteration "
                             "issues collectives torch.compile cannot trace")

    def _group_by_geometry(self, spec: ParamSpec) -> int:
        """Param group of a layer held by another pipeline stage: the local group labelled as its
        geometry (``head`` for the LM head where such a group exists; groups may be empty, see
        :func:`~lanton_dist.factory.param_groups`'s ``every_geometry``), else the first local group
        holding a layer of its geometry."""
        labels = [g.get("geometry") for g in self.param_groups]
        for label in (("head",) if spec.role == "head" else ()) + (spec.geometry.value,):
            if label in labels:
                return labels.index(label)
        for gi, g in enumerate(self.param_groups):
            if any(s.geometry is spec.geometry for s in g["specs"]):
                return gi
        raise ValueError(f"{spec.name}: no local param group has geometry {spec.geometry.value}; "
                         "every pipeline stage needs the same hyper-parameters per geometry")

    @staticmethod
    def _job_specs(local: list[ParamSpec], coll: Collectives, device: torch.device) -> list[ParamSpec]:
        """Every logical parameter of the whole job (all pipeline stages), sorted by name: the
        distinct stage lists (:func:`~lanton_dist.engine.agree.distinct_union`, each received
        once — not every rank's list), merged by name."""
        lists = agree.distinct_union(local, coll.group, device) if coll.world > 1 else [local]
        by_name: dict[str, ParamSpec] = {}
        for specs in lists:
            for s in specs:
                if by_name.setdefault(s.name, s) != s:
                    raise ValueError(f"{s.name}: ranks disagree on its logical spec")
        return [by_name[n] for n in sorted(by_name)]

    @announces()
    def _reduce_scatter(self, phase: str) -> None:
        """The step's gradient reduction: ``grad_reduce`` launches the buckets the backward hooks
        did not and waits for all; ``grad_reduce_half`` reduces Option II's stashed half."""
        (self.storage.reduce if phase == "grad_reduce" else self.storage.reduce_half)()

    @announces()
    def _all_gather_params(self, phase: str) -> None:
        """Gather the updated chunks into the parameters; left in flight after :meth:`attach`."""
        self.storage.gather(phase, wait=not self._attached)

    def _can_launch(self) -> bool:
        """Whether a backward hook may start a bucket's reduce-scatter now (:mod:`.buckets`);
        if so, the meter records it under the coming step."""
        if not (self.overlap_grad_reduce and self._sync):
            return False
        if self.storage.half_buffer is None and self.core.needs_two_half_batches():
            return False
        self.meter.step = self.core.t + 1
        return True

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("ShardedLANTON state is sharded: save it with lanton_dist.engine.checkpoint.save(...)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("ShardedLANTON state is sharded: load it with lanton_dist.engine.checkpoint.load(...)")


def build_sharded_optimizer(model: torch.nn.Module, cfg, *, process_group: dist.ProcessGroup | None = None,
                            bucket_mb: float = 25.0, overlap: bool = True, meter: CommMeter | None = None,
                            groups: list[dict[str, Any]] | None = None, overlap_grad_reduce: bool = False,
                            attach: bool = False) -> ShardedLANTON:
    """:class:`ShardedLANTON` for ``cfg.name`` with the same hyper-parameters as
    :func:`lanton_dist.factory.build_optimizer` (``cfg``: :class:`~lanton_dist.config.OptimConfig`;
    its ``ns_split_tolerance`` too); ``attach``: :meth:`ShardedLANTON.attach` ``model`` (parameter
    all-gathers overlap the next forward)."""
    from lanton_dist.factory import hyper_parameters, lanton_options, param_groups

    groups = groups if groups is not None else param_groups(model, cfg)
    opt = ShardedLANTON(groups, cfg.name, process_group=process_group, bucket_mb=bucket_mb, overlap=overlap,
                        meter=meter, overlap_grad_reduce=overlap_grad_reduce,
                        ns_split_tolerance=cfg.ns_split_tolerance, **lanton_options(cfg),
                        **hyper_parameters(cfg))
    if attach:
        opt.attach(model)
    return opt
