"""The one base of every sharded LANTON front end, and the framework adapters' base.

:class:`ShardedOptimizer` (a ``torch.optim.Optimizer``) holds what the ZeRO engine
(:class:`~lanton_dist.engine.zero.ShardedLANTON`) and every framework adapter share: the
hyper-parameter and algorithm validation (:data:`DEFAULTS`), the metered data-parallel
:class:`~lanton_dist.engine.meter.Collectives`, the pass-through properties of the
:class:`~lanton_dist.engine.core.ShardedCore`, the Option II half-gradient stash and combine,
the same-model check across ranks, the error wrapper that turns a failure on one rank into an
error naming it on every rank, and the sharded (DCP) checkpoint of the core's state. A
subclass only lays out this rank's pieces and builds ``self.core``.

:class:`PieceOptimizer` is the base of the framework adapters (FSDP2, DeepSpeed, fairscale):
the framework shards the model, the adapter maps its shards to pieces and steps the core with
an :class:`~lanton_dist.engine.exchange.AllToAllExchange`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lanton_dist import clipping
from lanton_dist.engine import agree
from lanton_dist.engine.checkpoint import core_state_dict, load_core_state
from lanton_dist.engine.core import LocalPiece, ShardedCore
from lanton_dist.engine.exchange import AllToAllExchange
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.engine.ownership import OwnershipPlan, plan_ownership
from lanton_dist.engine.ranges import BlockLayout, Ranges, check_ranges
from lanton_dist.groups import ParamSpec
from lanton_dist.lanton import check_param_groups
from lanton_dist.lmo import LMOConfig
from lanton_dist.names import ALGORITHMS, ALPHA_MODES

#: Per-group hyper-parameter defaults of every sharded optimizer (the keys it accepts).
DEFAULTS: dict[str, Any] = dict(lr=0.02, weight_decay=0.0, beta1=0.9, beta2=0.9, alpha=1.0, nesterov=False,
                                alpha_mode="fixed", bias_correction=False,
                                momentum=0.95, adam_betas=(0.9, 0.95), adam_eps=1e-8)


def pieces_sq_sum(pieces: Sequence[LocalPiece], device: torch.device | None = None) -> torch.Tensor:
    """``Σ weight · Σ grad²`` over ``pieces`` (a rank's share of a job-wide Σ G²: a piece's
    ``weight`` is 0 for a replica counted elsewhere): a 0-d float32 tensor on the pieces' device
    (``device`` when no piece has a counted gradient), no host read."""
    counted = [pc for pc in pieces if pc.grad is not None and pc.weight]
    if not counted:
        return torch.zeros((), device=pieces[0].param.device if pieces else device)
    return clipping.sq_sum([pc.grad for pc in counted], torch.float32, [pc.weight for pc in counted])


class ShardedOptimizer(Optimizer):
    """Common base (module doc).

    Args:
        params: param groups with ``specs`` (``lanton_dist.factory.param_groups``), the same
            model on every rank.
        algorithm: ``lanton`` | ``scion`` | ``dmuon`` | ``adamw``.
        process_group: the data-parallel group (``None``: the world) of ``self.coll``.
        meter: a :class:`CommMeter` to record into (a new one by default).
        hyper: per-group defaults, keys of :data:`DEFAULTS`.

    Subclasses set ``self.core`` and implement :meth:`_local_pieces`; a step runs inside
    :meth:`_stepping` and combines Option II halves with :meth:`_combine_halves` before
    ``core.step``. ``self._groups`` are the live group dicts the core reads (frameworks may
    re-bind ``param_groups``).
    """

    def __init__(self, params: Iterable[dict[str, Any]], algorithm: str, *, process_group: dist.ProcessGroup | None,
                 meter: CommMeter | None, **hyper: Any) -> None:
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown hyper-parameters {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed initialised (use LANTON for one process)")
        super().__init__(params, {**DEFAULTS, **hyper})
        check_param_groups(self.param_groups)
        for g in self.param_groups:
            if not g["alpha"] > 0:
                raise ValueError(f"alpha must be > 0, got {g['alpha']}")
            if g["alpha_mode"] not in ALPHA_MODES:
                raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {g['alpha_mode']!r}")
        self._groups = list(self.param_groups)
        self.algorithm = algorithm
        self.meter = meter or CommMeter()
        self.coll = Collectives(self.meter, process_group, "dp")
        self.world, self.rank = self.coll.world, self.coll.rank
        self.core: ShardedCore | None = None
        self._half: dict[str, torch.Tensor] | None = None
        #: this rank's share (piece weights applied) of Σ G² of the last step's combined gradient
        #: when it had two halves (Option II), else None: a 0-d tensor on the pieces' device
        self.combined_sq: torch.Tensor | None = None

    # ------------------------------------------------------------------ what a subclass supplies
    def _local_pieces(self) -> list[LocalPiece]:
        """This rank's piece of every parameter it holds, with ``grad`` set where it has one."""
        raise NotImplementedError

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        """``(spec name, parameter)`` whose gradients :meth:`stash_half_gradient` keeps."""
        raise NotImplementedError(f"{type(self).__name__} does not support Option II (no half-batch gradients)")

    def _local_grad(self, p: torch.Tensor) -> torch.Tensor:
        """The part of ``p.grad`` this rank keeps for the half-batch stash."""
        return p.grad.detach()

    # ------------------------------------------------------------------ API
    def _require_core(self) -> ShardedCore:
        if self.core is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to its framework yet")
        return self.core

    @property
    def t(self) -> int:
        return self._require_core().t

    @property
    def skipped_steps(self) -> int:
        return self._require_core().skipped_steps

    @property
    def clip_grad_norm(self) -> float:
        """The gradient-norm clipping threshold its steps apply (0: off)."""
        return self._require_core().clip

    def needs_two_half_batches(self) -> bool:
        return self._require_core().needs_two_half_batches()

    def layer_diagnostics(self) -> list[dict[str, Any]]:
        return self._require_core().layer_diagnostics()

    @torch.no_grad()
    def stash_half_gradient(self) -> None:
        """Option II: keep the first half-batch's gradients and clear ``p.grad`` (weight each
        half's loss by 1/2); ``step`` reduces/combines both halves."""
        self._half = {}
        for name, p in self._named_params():
            if p.grad is not None:
                self._half[name] = self._local_grad(p).clone()
                p.grad = None

    def _has_half(self, name: str) -> bool:
        """Whether the stashed first half-batch has a gradient of parameter ``name``."""
        return self._half is not None and name in self._half

    # ------------------------------------------------------------------ step helpers
    @contextlib.contextmanager
    def _stepping(self) -> Iterator[None]:
        """Around one step: the meter counts the step; any failure is published so peers stuck
        in a collective fail naming this rank, then re-raised."""
        self.meter.step = self._require_core().t + 1
        try:
            yield
        except Exception as exc:
            self.coll.publish_error(exc)
            raise

    @staticmethod
    @torch.no_grad()
    def _combine_halves(pieces: Sequence[LocalPiece], halves: Sequence[torch.Tensor | None] | None) -> None:
        """Option II: with the second half's (reduced) ``grad`` and the first half's ``halves``
        (aligned with ``pieces``; ``None``: no stash this step), set ``diff2 = 2(h − g)`` and
        ``grad = g + h`` — ∇_A − ∇_B and the full-batch gradient when each half's loss was
        weighted 1/2. A half without a gradient counts as zeros (DDP's convention)."""
        for pc, h in zip(pieces, halves if halves is not None else [None] * len(pieces)):
            pc.diff2 = None
            if halves is None or (h is None and pc.grad is None):
                continue
            g = pc.grad if pc.grad is not None else torch.zeros_like(h)
            h = h if h is not None else torch.zeros_like(g)
            pc.diff2 = 2.0 * (h - g)
            pc.grad = g + h

    @staticmethod
    def _release_differences(pieces: Sequence[LocalPiece]) -> None:
        """Drop Option II's ``diff2`` once the core step has consumed it (a deferred variance keeps
        its own references): otherwise a copy of every piece would live through the next forward
        and backward, memory the planner does not count."""
        for pc in pieces:
            pc.diff2 = None

    @staticmethod
    def _signature(specs: Iterable[ParamSpec]) -> list[tuple[Any, ...]]:
        """What every rank must agree on about the model: names, shapes, geometries, blocks."""
        return [(s.name, s.shape, s.geometry.value, tuple(b.rows for b in s.blocks)) for s in specs]

    def _check_same_model(self, signature: list[Any], what: str) -> None:
        """Raise on every rank if any rank of ``self.coll``'s group has another ``signature``:
        one all-reduce of its digest (:func:`~lanton_dist.engine.agree.check_same`, O(1) bytes
        per rank); the error names the first rank and entry that differ. ``what`` names it."""
        device = agree.params_device(p for g in self._groups for p in g["params"])
        agree.check_same(signature, self.coll.group, device, what)

    # ------------------------------------------------------------------ sharded checkpoints (DCP)
    def dcp_state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state as a flat ``torch.distributed.checkpoint`` state dict
        (:mod:`lanton_dist.engine.checkpoint` keys): the core's state of its non-empty pieces and
        the groups' learning rates (``meta/lr``)."""
        sd = core_state_dict(self._require_core(), self._local_pieces())
        sd["meta/lr"] = torch.tensor([g["lr"] for g in self._groups], dtype=torch.float64)
        return sd

    def load_dcp_state(self, path: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load :meth:`dcp_state_dict` from the checkpoint ``path`` (written at any world size),
        with ``extra`` entries in the same pass (returned, filled)."""
        extra = dict(extra or {})
        extra["meta/lr"] = torch.zeros(len(self._groups), dtype=torch.float64)
        load_core_state(self._require_core(), self._local_pieces(), path, extra)
        for g, lr in zip(self._groups, extra["meta/lr"].tolist()):
            g["lr"] = lr
        return extra


class PieceOptimizer(ShardedOptimizer):
    """Base of the framework adapters: :class:`~lanton_dist.engine.core.ShardedCore` over this
    rank's pieces with an :class:`~lanton_dist.engine.exchange.AllToAllExchange`.

    Subclasses supply :meth:`_local_pieces` (this rank's :class:`LocalPiece` of every parameter,
    possibly empty, views of the framework's sharded storage, with gradients) and call
    :meth:`_setup` with the piece ranges of every parameter once the framework has sharded the
    model.

    Args:
        groups, algorithm, process_group, meter, hyper: see :class:`ShardedOptimizer`; ``specs``
            are the logical (unsharded) shapes.
        bucket_mb, pad, window: see :class:`~lanton_dist.engine.exchange.AllToAllExchange`.
        overlap, defer_variance, estimate_every, option, ratio_anchor, nuclear_estimator,
        wd_lr, lmo, skip_nonfinite, clip_grad_norm: see :class:`~lanton_dist.engine.core.ShardedCore`.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], algorithm: str = "lanton", *,
                 process_group: dist.ProcessGroup | None = None, meter: CommMeter | None = None,
                 bucket_mb: float = 25.0, pad: bool = False, window: int = 2, overlap: bool = True,
                 defer_variance: bool = True, estimate_every: int = 10, option: str = "I", ratio_anchor: str = "max",
                 nuclear_estimator: str = "auto", wd_lr: str = "group", lmo: LMOConfig | None = None,
                 skip_nonfinite: bool = True, clip_grad_norm: float = 0.0, **hyper: Any) -> None:
        super().__init__(groups, algorithm, process_group=process_group, meter=meter, **hyper)
        self.named = [(s, gi) for gi, g in enumerate(self._groups) for s in g["specs"]]
        self.specs = [s for s, _ in self.named]
        self._exchange_args = dict(bucket_mb=bucket_mb, pad=pad, window=window)
        self._core_args = dict(estimate_every=estimate_every, option=option, ratio_anchor=ratio_anchor,
                               overlap=overlap, nuclear_estimator=nuclear_estimator, wd_lr=wd_lr, lmo=lmo,
                               skip_nonfinite=skip_nonfinite, defer_variance=defer_variance,
                               clip_grad_norm=clip_grad_norm)
        self.plan: OwnershipPlan = plan_ownership(self.specs, self.world, (lmo or LMOConfig()).ns_steps)
        self.ranges: dict[str, Ranges] = {}
        self.held: dict[str, Ranges] = {}
        self.exchange: AllToAllExchange | None = None

    # ------------------------------------------------------------------ set-up
    def _setup(self, ranges: dict[str, Ranges], dtype: torch.dtype, plan: OwnershipPlan | None = None,
               held: dict[str, Ranges] | None = None, orders: dict[str, BlockLayout] | None = None) -> None:
        """Build the exchange and the core once every parameter's piece ranges are known
        (``plan``: owners imposed by the framework instead of the FLOP-balanced plan; ``held``,
        ``orders``: replicated pieces and storage orders, see :class:`AllToAllExchange`)."""
        if plan is not None:
            self.plan = plan
        for s in self.specs:
            if s.name not in ranges:
                raise ValueError(f"no piece ranges for {s.name}")
            check_ranges(s.name, s.numel, ranges[s.name], self.world)
        self.held = dict(held or ranges)
        signature = [(*sig, tuple(ranges[s.name]), tuple(self.held[s.name]))
                     for sig, s in zip(self._signature(self.specs), self.specs)]
        self._check_same_model(signature, "model or sharding layout; every rank of the process group must build "
                                          "the same model and shard it the same way")
        self.ranges = dict(ranges)
        self.exchange = AllToAllExchange(self.specs, self.ranges, self.plan, self.coll, held=self.held, orders=orders,
                                         **self._exchange_args)
        self.core = ShardedCore(self.specs, {s.name: gi for s, gi in self.named}, self._groups, self.algorithm,
                                self.coll, self.exchange, dtype=dtype, **self._core_args)
        self.meter.step = 0

    def _piece(self, spec: ParamSpec, group: int, param: torch.Tensor, grad: torch.Tensor | None) -> LocalPiece:
        """A :class:`LocalPiece` at this rank's (held) range of ``spec``; ``param``/``grad`` 1-D views."""
        a, b = self.held[spec.name][self.rank]
        if param.numel() != b - a or (grad is not None and grad.numel() != b - a):
            raise RuntimeError(f"{spec.name}: local shard has {param.numel()} elements, the layout says {b - a} "
                               "(was the model resharded after the optimizer was built?)")
        return LocalPiece(spec, group, a, b, param, grad)

    def owned_hidden_bytes(self) -> int:
        """Bytes of the hidden matrices this rank owns (one copy, in the pieces' dtype)."""
        pieces = self._local_pieces()
        elem = pieces[0].param.element_size() if pieces else 4
        return sum(s.numel for s in self.specs if self.plan.owner.get(s.name) == self.rank) * elem

    @torch.no_grad()
    def _run_core(self, pieces: list[LocalPiece], present: list[str] | None = None) -> bool:
        """One core step on ``pieces`` (Option II halves combined), inside :meth:`_stepping`.
        ``present``: the parameters that had a gradient on this rank, for frameworks that
        zero-fill absent ones (``None``: those whose piece has a ``grad``; see
        :meth:`ShardedCore.step`)."""
        with self._stepping():
            half, self._half = self._half, None
            self._combine_halves(pieces, None if half is None else [half.get(pc.name) for pc in pieces])
            self.combined_sq = None if half is None else pieces_sq_sum(pieces)
            stepped = self._require_core().step(pieces, present)
            self._release_differences(pieces)
            return stepped

    # ------------------------------------------------------------------ per-rank state (one file per rank)
    def local_state_dict(self) -> dict[str, Any]:
        """This rank's state as a plain dict (for frameworks that save one file per rank)."""
        sd = self._require_core().state_dict(self._local_pieces())
        state = {f"{n}|{a}|{b}": {k: v.clone() for k, v in st.items()} for (n, a, b), st in sd.pop("pieces").items()}
        hyper = [{k: v for k, v in g.items() if k not in ("params", "specs", "names")} for g in self._groups]
        return {"lanton_core": dict(sd, state=state, world=self.world, rank=self.rank, ranges=self.ranges),
                "param_groups": hyper}

    def load_local_state_dict(self, sd: dict[str, Any]) -> None:
        """Inverse of :meth:`local_state_dict`; the layout (world size, ranges) must be the same."""
        core = self._require_core()
        if "lanton_core" not in sd:
            raise ValueError(f"not a {type(self).__name__} state dict (keys: {sorted(sd)[:5]})")
        c = sd["lanton_core"]
        if c["world"] != self.world or c["ranges"] != self.ranges or c["rank"] != self.rank:
            raise ValueError("optimizer state was saved with another sharding layout (world size, partitioning or "
                             "rank); resharding per-rank state is not supported by this path")
        if len(sd["param_groups"]) != len(self._groups):
            raise ValueError(f"state has {len(sd['param_groups'])} param groups, optimizer has {len(self._groups)}")
        pieces = {}
        for key, st in c["state"].items():
            name, start, stop = key.rsplit("|", 2)
            pieces[(name, int(start), int(stop))] = st
        core.load_state_dict({**c, "pieces": pieces}, self._local_pieces())
        for g, saved in zip(self._groups, sd["param_groups"]):
            g.update(saved)
