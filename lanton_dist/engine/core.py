"""The optimizer math over this rank's pieces of every parameter — shared by the ZeRO engine
and every framework adapter.

A :class:`LocalPiece` is elements ``[start, stop)`` of a parameter's row-major flattening
that this rank updates: whole hidden matrices on their owner (ZeRO engine), row shards
(FSDP2), flat partitions (DeepSpeed)… Elementwise work (momentum, sign LMO, AdamW, weight
decay, the update) runs on pieces. A :class:`MatrixExchange` brings a hidden matrix's pieces
to its one owner (:meth:`MatrixExchange.owned`) and the owner's result back;
:class:`LocalExchange` is the no-traffic case where pieces are already whole.

**Owner-held state.** Under a Newton–Schulz algorithm (LANTON, Scion, D-Muon) a hidden
matrix's optimizer state lives on its owner only, whole: its momentum and Option I's previous
gradient are flat ``numel`` tensors under key ``(name, 0)`` of :attr:`ShardedCore.state`;
other ranks hold nothing for it. Each step every rank sends its piece of the matrix's reduced
(clipped) gradient to the owner (``lmo_gather``, the gather the LMO needs anyway); the *owner
step* (:meth:`ShardedCore._owner_step`) updates the momentum, on Option I estimation steps
forms D = G_t − G_{t−1} from the stored gradient and stores G_t when the next step estimates,
and runs Newton–Schulz on the effective momentum; each rank gets its piece of the direction
back (``lmo_scatter``). So LANTON moves D-Muon's tensor bytes plus scalar all-reduces: Option
I never sends gradient differences. Option II's D = ∇_A − ∇_B is not derivable from stored
state: its estimation steps still gather the half-batch difference pieces
(``variance_gather``). Embed/head and vector parameters (and AdamW's hidden matrices) keep
elementwise state on their pieces, keyed ``(name, start)``. :meth:`ShardedCore.state_dict`
writes an owned matrix's state as the chunk ``(name, 0, numel)``; loading fills each owner's
whole matrices from any chunk layout (:meth:`ShardedCore.load_state_dict`).

Reductions, all over the scalar group (every rank holding pieces):

* ``finite`` — one ``(1 + L)`` vector per step (also with ``skip_nonfinite=False``): the
  non-finite count (any non-finite gradient anywhere skips the step on all ranks, state
  untouched) and which layers' parameters have a gradient on some rank (L logical layers, as
  below). A parameter no rank has a gradient for is skipped (no momentum decay, weight decay,
  update or tracker update); one that some ranks lack was reduced with zeros by the caller
  (DDP's convention). With gradient clipping on (``clip_grad_norm`` c > 0) the vector has one
  more entry, the ``weight``-ed Σ G² of every piece's reduced gradient: after the SUM (the same
  one host read) ‖G‖₂ is known on every rank, a non-finite one skips the step, and every live
  piece's ``grad`` (and Option II's ``diff2``) is scaled in place by
  min(1, c/(‖G‖₂ + 1e-6)) — a device tensor — before momentum, AdamW moments or the Option I
  stored gradient read it (:mod:`lanton_dist.clipping`; the reference does the same). The
  pre-clip norm stays in ``grad_norm`` for the log line.
* ``norm`` — Σ B² of vector-group pieces (their RMS LMO needs ‖B‖₂), every step.
* ``variance`` — on estimation steps, a ``(2L,)`` vector over all L logical layers of the
  model: each layer's dual-norm contribution (owner's s·‖D‖_nuclear for hidden blocks,
  partial c·Σ|D| or Σ D² for pieces; s and c the LMO's own scales,
  :func:`lanton_dist.lmo.pair_scale`) and a presence count, posted after the LMO (the owners
  form Option I's hidden D in the owner step). After the SUM every rank
  updates the replicated trackers H, the "estimated" mask E (H updated at least once) and
  the rate factors, so the group-wide max α costs no extra collective. The anchor runs over
  estimated layers only; the others run at factor 1. Option I compares with G_{t−1} only: a
  matrix or piece that missed a step drops its stored gradient. With ``overlap=True`` the
  reduction is waited for at the start of the next step and its factors apply from then on —
  the reference's ``delay_lr_factor=True``.
  With ``defer_variance=True`` as well (exchanges with ``launch_gather``), the owners'
  nuclear norms (and Option II's gather of D to the owners) are left in flight at the
  end of the estimation step (the owners compute on a background thread) and are finished,
  then all-reduced, at the start of the next step: the same numbers, overlapped with the
  next forward pass. On a GPU with ``overlap=True`` the owner's nuclear norms run on a side
  CUDA stream (:mod:`lanton_dist.engine.streams`) and are waited for, filled and
  all-reduced at the start of the next step, so they overlap the parameter all-gather and
  the next forward and backward; on CPU they run inline and are all-reduced in the step.

**Early owner step** (:meth:`ShardedCore.start_owner_step`): the ZeRO engine hands the owner the
whole reduced gradients of a bucket's matrices as soon as the bucket's reduction lands, during
backward; the owner advances a *copy* of their momentum and runs Newton–Schulz on it right
away. At ``step()`` each such matrix commits the copy (the stored momentum is swapped, not
recomputed) and uses the direction — the same operations on the same numbers as the step would
run, so the result is bit-identical — provided the step is taken, the matrix is stepped, the
gradient was not clipped (:func:`lanton_dist.clipping.certainly_unclipped` on the vote's host
read, no extra one) and its group's momentum settings did not change; otherwise the copy is
dropped and the step computes as usual. The transient cost: a momentum copy and a direction
per owned matrix, held from backward to step (planner: ``early_peak_extra``).

Exchanges may implement two optional, pipelined entry points the core prefers when present:
``apply(pieces, tensors, fn, gather_phase, scatter_phase)`` (gather → ``fn`` on the owner's
whole matrices → scatter, bucket by bucket; ``fn`` is the owner step) and
``launch_gather(pieces, tensors, phase)`` (returns a pending gather, an :class:`OwnerWork`
with ``map(fn)`` / ``start(fn)`` + ``result()``; Option II's differences).
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from lanton_dist import clipping, noise
from lanton_dist import lmo as lmo_mod
from lanton_dist.adamw import adamw_step_
from lanton_dist.engine.device_lists import DeviceLists
from lanton_dist.engine.meter import Collectives
from lanton_dist.engine.phases import announces, phase
from lanton_dist.engine.streams import SideStream
from lanton_dist.groups import Geometry, ParamSpec, block_scale
from lanton_dist.lmo import LMOConfig
from lanton_dist.names import ALGORITHMS, OPTIONS
from lanton_dist.nuclear import resolve_estimator



@dataclass
class LocalPiece:
    """This rank's elements ``[start, stop)`` of parameter ``spec`` (flattened, row-major).

    ``param``/``grad`` are 1-D tensors of ``stop − start`` elements on this rank; ``param`` is
    updated in place. ``diff2`` (Option II) is ∇_A − ∇_B of the same elements. ``weight`` is
    this piece's share in the scalar sums (0 for a replica whose twin elsewhere contributes).
    """

    spec: ParamSpec
    group: int
    start: int
    stop: int
    param: torch.Tensor
    grad: torch.Tensor | None = None
    diff2: torch.Tensor | None = None
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.spec.numel


class StateSlot(NamedTuple):
    """Elements ``[start, stop)`` of parameter ``name`` this rank holds optimizer state for;
    ``like``: a tensor of the state's dtype and device (the piece's parameter)."""

    name: str
    start: int
    stop: int
    like: torch.Tensor


class MatrixExchange(Protocol):
    """Moves hidden matrices between their pieces and their owner."""

    def gather(self, pieces: list[LocalPiece], tensors: list[torch.Tensor], phase: str) -> dict[str, torch.Tensor]:
        """Whole ``spec.shape`` matrices, keyed by name, of the parameters this rank owns,
        assembled from every rank's ``tensors`` (1-D, aligned with ``pieces``)."""

    def scatter(self, pieces: list[LocalPiece], owned: dict[str, torch.Tensor], phase: str) -> list[torch.Tensor]:
        """This rank's 1-D piece of each owner result, aligned with ``pieces``."""

    def owned(self, pieces: list[LocalPiece]) -> list[str]:
        """Names of the matrices among ``pieces`` (every hidden piece of this rank) whose owner is
        this rank: where their whole-matrix optimizer state lives. The same answer for the same
        pieces at every step; :meth:`ShardedCore.step` calls it first, and later ``gather`` /
        ``scatter`` calls of the step may pass any subset of them."""


class OwnerWork:
    """Whole matrices on their owner, with the owner-side work ``fn(names, matrices)`` run on them
    in the caller's thread (:meth:`map`) or a background one (:meth:`start` + :meth:`result`).
    Subclasses supply :meth:`map`; the background thread only waits and computes (it posts no
    collective, so the issue order stays the same on every rank)."""

    _thread: threading.Thread | None = None
    _result: dict[str, Any] | None = None
    _error: BaseException | None = None

    def map(self, fn: Callable[[list[str], list[torch.Tensor]], list[Any]]) -> dict[str, Any]:
        """``{name: result}`` of ``fn`` on the whole matrices this rank owns."""
        raise NotImplementedError

    def start(self, fn: Callable[[list[str], list[torch.Tensor]], list[Any]]) -> None:
        """Run :meth:`map` on a background thread; :meth:`result` joins it."""
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def work() -> None:
            try:
                if device is not None:  # a new thread starts on device 0
                    torch.cuda.set_device(device)
                with torch.no_grad():
                    self._result = self.map(fn)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._error = exc
        self._thread = threading.Thread(target=work, name="lanton-owner", daemon=True)
        self._thread.start()

    def result(self) -> dict[str, Any]:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._result or {}


class _ReadyGather(OwnerWork):
    """Whole matrices already on this rank (``{name: matrix}``): a completed gather, or the
    owner's own gradient differences."""

    def __init__(self, owned: dict[str, torch.Tensor]) -> None:
        self._owned = owned

    def map(self, fn) -> dict[str, Any]:
        names = list(self._owned)
        return dict(zip(names, fn(names, [self._owned[n] for n in names]))) if names else {}


class _Early(NamedTuple):
    """An owner step started during backward: the advanced momentum copy, its direction, and
    the group's momentum settings it used."""

    momentum: torch.Tensor
    direction: torch.Tensor
    settings: tuple[Any, ...]


class LocalExchange:
    """Pieces are whole matrices on their owner: gather and scatter are views, no traffic."""

    def gather(self, pieces, tensors, phase):
        for p in pieces:
            if not p.whole:
                raise ValueError(f"{p.name}: LocalExchange needs whole hidden matrices, got elements {p.start}:{p.stop}")
        return {p.name: t.view(p.spec.shape) for p, t in zip(pieces, tensors)}

    def scatter(self, pieces, owned, phase):
        return [owned[p.name].reshape(-1) for p in pieces]

    def owned(self, pieces):
        return [p.name for p in pieces]


class ShardedCore:
    """Optimizer state and math for this rank's pieces (see module doc).

    Args:
        specs: every parameter of the model, in the same order on every rank.
        group_of: parameter name → index into ``param_groups`` (hyper-parameters, read live).
        param_groups: the owning optimizer's param groups (``lr`` may be changed by schedulers).
        algorithm: ``lanton`` | ``scion`` | ``dmuon`` | ``adamw``.
        coll: metered collectives over the scalar group.
        exchange: the :class:`MatrixExchange` for hidden matrices.
        options: ``estimate_every``, ``option``, ``ratio_anchor``, ``overlap``,
            ``nuclear_estimator``, ``wd_lr``, ``lmo`` (:class:`LMOConfig`), ``skip_nonfinite``,
            ``defer_variance`` (with ``overlap``: see module doc; ignored by exchanges without
            ``launch_gather``), ``clip_grad_norm`` (0: off; see module doc), ``polar``: the
            owner's LMO on whole hidden matrices, ``polar(specs, mats, lmo) -> directions``
            (default :func:`lanton_dist.lmo.hidden_directions`; the ZeRO engine's split
            Newton–Schulz, :mod:`lanton_dist.engine.splitns`, is called collectively: once per
            stepped step on every rank, with this rank's live matrices, possibly none).
        dtype: the parameters' dtype; trackers and norm sums use it promoted to at least fp32
            (the same on every rank, so the scalar collectives agree).
    """

    def __init__(self, specs: list[ParamSpec], group_of: dict[str, int], param_groups: list[dict[str, Any]],
                 algorithm: str, coll: Collectives, exchange: MatrixExchange, *, estimate_every: int = 10,
                 option: str = "I", ratio_anchor: str = "max", overlap: bool = True, nuclear_estimator: str = "auto",
                 wd_lr: str = "group", lmo: LMOConfig | None = None, skip_nonfinite: bool = True,
                 dtype: torch.dtype = torch.float32, defer_variance: bool = False, clip_grad_norm: float = 0.0,
                 polar: Callable[[list[ParamSpec], list[torch.Tensor], LMOConfig], list[torch.Tensor]] | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
        if not isinstance(estimate_every, int) or estimate_every < 1:
            raise ValueError(f"estimate_every must be an integer >= 1, got {estimate_every!r}")
        if option not in OPTIONS:
            raise ValueError(f"option must be 'I' or 'II', got {option!r}")
        if ratio_anchor not in noise.ANCHORS:
            raise ValueError(f"ratio_anchor must be one of {noise.ANCHORS}, got {ratio_anchor!r}")
        self.algorithm, self.coll, self.exchange = algorithm, coll, exchange
        self.param_groups, self.group_of = param_groups, group_of
        self.k, self.option, self.anchor, self.overlap = estimate_every, option, ratio_anchor, overlap
        self.estimator_name, self.wd_lr, self.skip_nonfinite = nuclear_estimator, wd_lr, skip_nonfinite
        self.noise_adaptive = algorithm == "lanton"
        self.clip = clipping.check_max_norm(clip_grad_norm)
        self.grad_norm: torch.Tensor | None = None  # pre-clip ‖G‖₂ of the last step (clipping on)
        self._grad_sq = 0.0                         # its square, as the vote's host read saw it
        self.defer_variance = bool(defer_variance and overlap and hasattr(exchange, "launch_gather"))
        self.lmo = (
            LMOConfig(scale_mode="moonlight", ns_steps=(lmo or LMOConfig()).ns_steps) if algorithm == "dmuon" else (lmo or LMOConfig())
        )
        self.specs = {s.name: s for s in specs}
        self.layer_start: dict[str, int] = {}
        groups_, gids, vector_numel = [], [], []
        for s in specs:
            self.layer_start[s.name] = len(gids)
            for _ in s.blocks:
                groups_.append(group_of[s.name])
                gids.append(noise.GEOMETRY_INDEX[s.geometry])
                vector_numel.append(s.numel if s.geometry is Geometry.VECTOR else 0)
        self.n_layers = len(gids)
        self.layer_group = groups_
        self.layer_gid = torch.tensor(gids, dtype=torch.long)
        self._all_vector_names = [s.name for s in specs if s.geometry is Geometry.VECTOR]
        self.acc_dtype = torch.promote_types(dtype, torch.float32)
        self._vector_numel = torch.tensor(vector_numel, dtype=self.acc_dtype)  # per layer; 0: not a vector
        self.H = torch.zeros(self.n_layers, dtype=self.acc_dtype)
        self.F = torch.ones(self.n_layers, dtype=self.acc_dtype)
        self.E = torch.zeros(self.n_layers, dtype=torch.bool)  # layers with a noise estimate
        self.N = torch.zeros(self.n_layers, dtype=self.acc_dtype)  # estimates of each layer (bias correction)
        self.A = torch.full((noise.N_GROUPS,), float("nan"), dtype=self.acc_dtype)  # auto α per geometry group
        self.t = 0
        self.param_steps = {s.name: 0 for s in specs}  # steps each parameter was stepped (AdamW)
        self.skipped_steps = 0
        self.state: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._deferred: tuple[Any, torch.Tensor] | None = None
        self._side: SideStream | None = None
        self._lists = DeviceLists()  # the step's index vectors and per-layer constants, on the device
        self.polar = polar or lmo_mod.hidden_directions
        self._early: dict[str, _Early] = {}   # owner steps started during backward (module doc)
        self._early_ok = False                # this step may use them (set by step())
        self.early_used = 0                   # matrices whose step used an early start (cumulative)

    # ------------------------------------------------------------------ public
    def needs_two_half_batches(self) -> bool:
        return self.noise_adaptive and self.option == "II" and noise.is_estimation_step(self.t + 1, self.k)

    @torch.no_grad()
    @announces("early_owner_step")
    def start_owner_step(self, names: list[str], grads: list[torch.Tensor]) -> None:
        """Start the owner step of whole hidden matrices ``names`` this rank owns, from their
        reduced gradients ``grads`` (``spec.shape``, final: the caller guarantees they do not
        change before ``step()``): a copy of each momentum advanced and its direction computed
        now, committed or dropped by the next :meth:`step` (module doc). Must be called with the
        same grouping the ``polar`` function batches by (the engine: one bucket per call)."""
        if not names or not self.owner_held(self.specs[names[0]]):
            return
        effective, moms, settings = [], [], []
        for n, grad in zip(names, grads):
            group = self.param_groups[self.group_of[n]]
            st = self.state.get((n, 0), {})
            copy = {"momentum": st["momentum"].clone()} if "momentum" in st else {}
            effective.append(self._advance_momentum(copy, grad.reshape(-1), group).view(self.specs[n].shape))
            moms.append(copy["momentum"])
            settings.append(self._momentum_settings(group))
        for n, m, d, k in zip(names, moms, self._polar(names, effective), settings):
            self._early[n] = _Early(m, d, k)

    def drop_early(self) -> None:
        """Forget owner steps started for gradients that will not be stepped (zero_grad, load)."""
        self._early.clear()

    def owner_held(self, spec: ParamSpec) -> bool:
        """Whether ``spec``'s state is held whole by its owner (hidden matrices under a
        Newton–Schulz algorithm) rather than piecewise (every other case)."""
        return spec.geometry is Geometry.HIDDEN and self.algorithm != "adamw"

    def state_key(self, piece: LocalPiece) -> tuple[str, int]:
        """Key of ``piece``'s state in :attr:`state`: ``(name, 0)`` for an owner-held matrix
        (present on its owner only), ``(name, start)`` for a piece."""
        return (piece.name, 0) if self.owner_held(piece.spec) else (piece.name, piece.start)

    def state_of(self, piece: LocalPiece) -> dict[str, torch.Tensor]:
        """The state of an elementwise ``piece`` (made on first use)."""
        return self.state.setdefault((piece.name, piece.start), {})

    def state_slots(self, pieces: list[LocalPiece]) -> list[StateSlot]:
        """Where this rank holds state for ``pieces`` (all of its pieces): each matrix it owns
        whole (``(name, 0, numel)``) and each elementwise piece (its ``(name, start, stop)``)."""
        held = [p for p in pieces if self.owner_held(p.spec)]
        mine = set(self.exchange.owned(held)) if held else set()
        return [StateSlot(p.name, 0, p.spec.numel, p.param) if self.owner_held(p.spec) else
                StateSlot(p.name, p.start, p.stop, p.param)
                for p in pieces if not self.owner_held(p.spec) or p.name in mine]

    @torch.no_grad()
    @announces("core")
    def step(self, pieces: list[LocalPiece], present: Collection[str] | None = None) -> bool:
        """One optimizer step on ``pieces`` (gradients already reduced). False if skipped.

        ``present``: names of the parameters that had a gradient on this rank before the
        reduction (``None``: those whose piece has a ``grad``). A parameter is stepped iff some
        rank of the scalar group reports it; a stepped piece without ``grad`` (another rank had
        the gradient) steps with zeros, and the ``grad`` of a piece whose parameter nobody
        reports (a framework's zero fill) is ignored: no momentum decay, weight decay, update
        or tracker update for it this step.
        """
        device = pieces[0].param.device if pieces else torch.device("cpu")
        self._to(device)
        agreed = self._agree(pieces, present, device)
        if agreed is None:
            self.skipped_steps += 1
            self.drop_early()
            return False
        live, stepped = agreed
        self._early_ok = not self.clip or clipping.certainly_unclipped(self._grad_sq, self.clip)
        held = [p for p in pieces if self.owner_held(p.spec)]
        if held:
            self.exchange.owned(held)  # fixes where each matrix's state lives before any gather
        if self.clip:
            coef = clipping.clip_coefficient(self.grad_norm, self.clip)
            for p in live:
                p.grad.mul_(coef)
                if p.diff2 is not None:
                    p.diff2.mul_(coef)
        self.finish_variance()
        self.t += 1
        for name in stepped:
            self.param_steps[name] += 1
        if self.noise_adaptive and self.option == "I":  # G̃ must be G_{t−1}: drop older ones
            live_ids = {id(p) for p in live}
            for p in pieces:
                if id(p) not in live_ids:
                    self.state.get(self.state_key(p), {}).pop("prev_grad", None)
        if self.algorithm in ("lanton", "scion"):
            self._lanton(live)
        elif self.algorithm == "dmuon":
            self._dmuon(live)
        else:
            self._adamw(live)
        self.drop_early()   # started for matrices not stepped: stale
        return True

    @announces("agree")
    def _agree(self, pieces: list[LocalPiece], present: Collection[str] | None,
               device: torch.device) -> tuple[list[LocalPiece], list[str]] | None:
        """The job-wide skip vote and gradient presence, in ONE all-reduce ("finite") of
        ``[non-finite count, presence of each layer…, (clipping) Σ G²]`` (``1 + n_layers``
        scalars, one more with clipping, the same size on every rank; a parameter's blocks
        share its flag) and one host read of it; sets ``grad_norm`` when clipping.
        Returns the pieces to step and the names of every parameter stepped job-wide
        (``None``: skip the step, a non-finite gradient or gradient norm somewhere)."""
        vec = torch.zeros(1 + self.n_layers + (1 if self.clip else 0), device=device, dtype=self.acc_dtype)
        grads = [p.grad for p in pieces if p.grad is not None and p.grad.numel()]
        if self.skip_nonfinite and grads:
            vec[0] = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().sum()
        counted = [p for p in pieces if p.grad is not None and p.grad.numel() and p.weight] if self.clip else []
        if counted:
            vec[-1] = clipping.sq_sum([p.grad for p in counted], self.acc_dtype, [p.weight for p in counted])
        names = set(present if present is not None else [p.name for p in pieces if p.grad is not None])
        if names:
            idx = [1 + self.layer_start[n] + b for n in sorted(names) for b in range(len(self.specs[n].blocks))]
            vec.index_fill_(0, self._lists.get("present", idx, torch.long, device), 1.0)
        self.coll.all_reduce(vec, "finite").wait()
        votes = vec.tolist()  # the step's one host read
        if self.clip:
            self.grad_norm = vec[-1].sqrt()
            self._grad_sq = votes[-1]
        if self.skip_nonfinite and (votes[0] > 0 or (self.clip and not math.isfinite(votes[-1]))):
            return None
        live = []
        for p in pieces:
            if votes[1 + self.layer_start[p.name]] > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p.param)
                live.append(p)
        return live, [n for n in self.specs if votes[1 + self.layer_start[n]] > 0]

    def stepped_counts(self) -> torch.Tensor:
        """``(n_params,)`` int64, in ``specs`` order: steps each parameter was stepped (AdamW's
        bias correction counts those, as torch's); replicated, for checkpoints."""
        return torch.tensor([self.param_steps[n] for n in self.specs], dtype=torch.long)

    def _load_stepped_counts(self, counts: torch.Tensor | None) -> None:
        """Inverse of :meth:`stepped_counts`; ``None`` (checkpoints from before the counts were
        kept) counts every parameter as stepped at every step: ``t``."""
        if counts is not None and counts.numel() != len(self.specs):
            raise ValueError(f"checkpoint has step counts of {counts.numel()} parameters, this model has {len(self.specs)}")
        values = [self.t] * len(self.specs) if counts is None else counts.tolist()
        self.param_steps = dict(zip(self.specs, (int(v) for v in values)))

    def drop_pending(self) -> None:
        """Forget work still pending (a variance reduction in flight, owner steps started early):
        its step is being replaced by a loaded state."""
        self._pending = self._deferred = None
        self.drop_early()

    def state_dict(self, pieces: list[LocalPiece]) -> dict[str, Any]:
        """The core's state for this rank's ``pieces`` (a pending variance reduction is completed
        first: a local wait, or with ``defer_variance`` the owners' norms and their all-reduce)::

            {"t": int, "skipped": int,                       # steps taken / skipped
             "H", "F": (L,) acc dtype, "E": (L,) bool,       # trackers, rate factors, estimated
             "N": (L,) acc dtype, "A": (3,) acc dtype,       # estimate counts, auto α (NaN: unset)
             "steps": (n_params,) int64,                     # stepped_counts()
             "pieces": {(name, start, stop): {key: 1-D tensor}}}  # chunks with state

        A chunk is a :meth:`state_slots` entry: an owned matrix whole, ``(name, 0, numel)``
        (row-major; non-owners have no chunk of it), or an elementwise piece.
        ``H``/``F``/``E``/``N``/``A``/``steps`` are copies, replicated on every rank; the chunk tensors are
        the live state (clone them to keep them past the next step)."""
        self.finish_variance()
        chunks = {}
        for slot in self.state_slots(pieces):
            st = self.state.get((slot.name, slot.start))
            if st:
                chunks[(slot.name, slot.start, slot.stop)] = dict(st)
        return {"t": self.t, "skipped": self.skipped_steps, "H": self.H.clone(), "F": self.F.clone(),
                "E": self.E.clone(), "N": self.N.clone(), "A": self.A.clone(), "steps": self.stepped_counts(),
                "pieces": chunks}

    def load_state_dict(self, sd: dict[str, Any], pieces: list[LocalPiece]) -> None:
        """Inverse of :meth:`state_dict`, resharding: ``sd["pieces"]`` may be chunks of another
        layout (another world size, other ranks' chunks too, per-piece chunks of hidden matrices
        from checkpoints written before owners held them whole). Each of this rank's
        :meth:`state_slots` (the matrices it owns, whole; its elementwise pieces) gets, per
        state key, the elements of the chunks of its parameter that overlap it — all of them,
        or ``ValueError``; an empty piece gets an empty tensor under every key stored for its
        parameter. Non-owners keep no state of a hidden matrix. ``E`` absent or ``None``
        (older checkpoints): ``H > 0``; ``N`` absent: ⌊t/k⌋ for estimated layers (an upper
        bound); ``A`` absent: unset (the next estimation step sets it); ``steps`` absent or ``None``: every parameter stepped
        ``t`` times. Work still pending from the replaced step is dropped."""
        if sd["H"].numel() != self.n_layers:
            raise ValueError(f"checkpoint has {sd['H'].numel()} layers, this model has {self.n_layers}")
        self.drop_pending()
        self.t, self.skipped_steps = int(sd["t"]), int(sd["skipped"])
        self.H.copy_(sd["H"])
        self.F.copy_(sd["F"])
        E = sd.get("E")
        self.E = self.H > 0 if E is None else E.to(device=self.H.device, dtype=torch.bool, copy=True)
        N, A = sd.get("N"), sd.get("A")
        self.N = self.E.to(self.N.dtype) * float(self.t // self.k) if N is None else N.to(self.N, copy=True)
        self.A = torch.full_like(self.A, float("nan")) if A is None else A.to(self.A, copy=True)
        self._load_stepped_counts(sd.get("steps"))
        chunks: dict[str, list[tuple[int, int, dict[str, torch.Tensor]]]] = defaultdict(list)
        for (name, start, stop), st in sd["pieces"].items():
            chunks[name].append((int(start), int(stop), st))
        self.state.clear()
        for slot in self.state_slots(pieces):
            state: dict[str, torch.Tensor] = {}
            filled: dict[str, int] = defaultdict(int)
            for start, stop, st in chunks.get(slot.name, ()):
                lo, hi = max(start, slot.start), min(stop, slot.stop)
                for key, value in st.items():
                    if slot.stop == slot.start:
                        state.setdefault(key, slot.like.new_empty(0))
                    elif lo < hi:
                        dst = state.setdefault(key, slot.like.new_zeros(slot.stop - slot.start))
                        dst[lo - slot.start : hi - slot.start].copy_(value.reshape(-1)[lo - start : hi - start])
                        filled[key] += hi - lo
            for key, n in filled.items():
                if n != slot.stop - slot.start:
                    raise ValueError(f"checkpoint covers {n} of {slot.stop - slot.start} elements of {slot.name}/{key}")
            if state:
                self.state[(slot.name, slot.start)] = state

    def finish_variance(self) -> None:
        """Wait for a pending variance reduction and refresh H and the rate factors
        (a deferred one is first completed: owners' nuclear norms, then the all-reduce)."""
        if self._deferred is None and self._pending is None:
            return
        with phase("variance_finish"):
            self._finish_variance()

    def _finish_variance(self) -> None:
        if self._deferred is not None:
            pending, vec = self._deferred
            self._deferred = None
            self._fill_hidden_norms(vec, pending.result())
            self._pending = (self.coll.all_reduce(vec, "variance"), vec)
        handle, vec = self._pending
        self._pending = None
        handle.wait()
        L = self.n_layers
        vals, present = vec[:L], vec[L:] > 0
        numel = self._vector_numel
        sq = torch.where(numel > 0, vals * numel, vals * vals)  # vectors: RMS² · n; others: the norm²
        groups = [self.param_groups[g] for g in self.layer_group]
        beta2 = self._lists.get("beta2", [g["beta2"] for g in groups], self.H.dtype, self.H.device)
        alpha = self._lists.get("alpha", [g["alpha"] for g in groups], self.H.dtype, self.H.device)
        auto = [g["alpha_mode"] == "auto" for g in groups]
        bias = [bool(g["bias_correction"]) for g in groups]
        self.H = torch.where(present, self.H * beta2 + sq * (1 - beta2), self.H)
        self.N = self.N + present.to(self.N.dtype)
        self.E = self.E | present
        self.F, self.A = noise.rate_factors(
            self.H, self.N, self.E, self.layer_gid, alpha, beta2, self.A, anchor=self.anchor,
            auto=self._lists.get("auto", auto, torch.bool, self.H.device) if any(auto) else None,
            bias=self._lists.get("bias", bias, torch.bool, self.H.device) if any(bias) else None)

    # ------------------------------------------------------------------ algorithms
    def _lanton(self, live: list[LocalPiece]) -> None:
        t = self.t
        estimate = self.noise_adaptive and noise.is_estimation_step(t, self.k)
        track = self.noise_adaptive and self.option == "I"
        keep = track and noise.keeps_previous_gradient(t, self.k)
        with phase("momentum"):  # owner-held matrices send their gradient: the owner step advances theirs
            sent = [p.grad if self.owner_held(p.spec) else
                    self._advance_momentum(self.state_of(p), p.grad, self.param_groups[p.group]) for p in live]
        # elementwise pieces' D before their stored gradient is replaced (the owner forms hidden ones)
        diffs = self._piece_differences(live) if estimate else []
        if track:
            for p in live:
                if not self.owner_held(p.spec):
                    self._store_previous(self.state_of(p), p.grad, keep)
        owner_diffs: dict[str, torch.Tensor] | None = {} if estimate and track else None
        directions = self._directions(live, sent, self._owner_step_fn(owner_diffs, track, keep))
        if estimate:
            self._launch_variance(live, diffs, owner_diffs)
            if not self.overlap:
                self.finish_variance()
        with phase("update"):
            for p, o in zip(live, directions):
                g = self.param_groups[p.group]
                start = self.layer_start[p.name]
                scale = block_scale(p.spec, self.F[start : start + len(p.spec.blocks)], (p.start, p.stop)).to(p.param.dtype)
                if g["weight_decay"]:
                    p.param.mul_(1 - g["lr"] * g["weight_decay"] * (scale if self.wd_lr == "layer" else 1.0))
                p.param.add_(o * (scale * g["lr"]))

    def _dmuon(self, live: list[LocalPiece]) -> None:
        hidden = [p for p in live if self.owner_held(p.spec)]
        directions = self._hidden_directions(hidden, [p.grad for p in hidden], self._owner_step_fn(None, False, False))
        with phase("update"):
            for p, o in zip(hidden, directions):
                g = self.param_groups[p.group]
                p.param.mul_(1 - g["lr"] * g["weight_decay"]).add_(o, alpha=g["lr"])
        self._adamw([p for p in live if not self.owner_held(p.spec)])

    def _owner_step_fn(self, diffs: dict[str, torch.Tensor] | None, track: bool,
                       keep: bool) -> Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]]:
        """:meth:`_owner_step` with this step's flags, as the exchanges call it: ``fn(names, grads)``."""
        return lambda names, grads: self._owner_step(names, grads, diffs, track, keep)

    def _owner_step(self, names: list[str], grads: list[torch.Tensor], diffs: dict[str, torch.Tensor] | None,
                    track: bool, keep: bool) -> list[torch.Tensor]:
        """The owner's step of whole hidden matrices: ``grads`` are their reduced gradients
        (``spec.shape``, gathered from every rank's piece). Updates the momentum held here
        (whole, flat, key ``(name, 0)``) by the algorithm's rule; with ``diffs`` (an Option I
        estimation step) puts D = G_t − G_{t−1} of each matrix that has a stored gradient into
        it; with ``track`` (Option I) keeps G_t as the next stored gradient if ``keep``, else
        drops it. Returns −s·polar of each effective momentum (:meth:`_polar`)."""
        effective: dict[str, torch.Tensor] = {}
        started: dict[str, torch.Tensor] = {}
        with phase("momentum"):
            for n, grad in zip(names, grads):
                spec, flat = self.specs[n], grad.reshape(-1)
                st = self.state.setdefault((n, 0), {})
                group = self.param_groups[self.group_of[n]]
                early = self._early.pop(n, None) if self._early_ok else None
                if early is not None and early.settings == self._momentum_settings(group):
                    st["momentum"] = early.momentum   # advanced during backward from this very gradient
                    started[n] = early.direction
                    self.early_used += 1
                else:
                    effective[n] = self._advance_momentum(st, flat, group).view(spec.shape)
                if diffs is not None and "prev_grad" in st:
                    diffs[n] = (flat - st["prev_grad"]).view(spec.shape)
                if track:
                    self._store_previous(st, flat, keep)
        rest = list(effective)
        started.update(zip(rest, self._polar(rest, list(effective.values()))) if rest else ())
        return [started[n] for n in names]

    @staticmethod
    def _momentum_settings(group: dict[str, Any]) -> tuple[Any, ...]:
        """The group values :meth:`_advance_momentum` reads (an early start is valid while they hold)."""
        return tuple(group.get(k) for k in ("beta1", "momentum", "nesterov"))

    def _advance_momentum(self, state: dict[str, torch.Tensor], grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance ``state["momentum"]`` (zeros like ``grad`` on first use) by ``grad`` under the
        algorithm's rule, with ``group``'s hyper-parameters; returns the effective momentum the
        LMO reads (the stored tensor itself unless Nesterov). D-Muon: M ← μ·M + G, effective
        G + μ·M with Nesterov. LANTON and Scion: the EMA M ← β₁·M + (1 − β₁)·G, effective
        β₁·M + (1 − β₁)·G once more with Nesterov."""
        mom = state.setdefault("momentum", torch.zeros_like(grad))
        if self.algorithm == "dmuon":
            mom.mul_(group["momentum"]).add_(grad)
            return grad.add(mom, alpha=group["momentum"]) if group["nesterov"] else mom
        mom.lerp_(grad, 1 - group["beta1"])
        return mom.lerp(grad, 1 - group["beta1"]) if group["nesterov"] else mom

    @staticmethod
    def _store_previous(state: dict[str, torch.Tensor], grad: torch.Tensor, keep: bool) -> None:
        """Option I's stored gradient: keep ``grad`` (G_t, copied) as the next step's G_{t−1} if
        ``keep`` (the next step estimates), else drop the stored one (D compares with G_{t−1} only)."""
        if keep:
            state["prev_grad"] = grad.clone()
        else:
            state.pop("prev_grad", None)

    @announces("update")
    def _adamw(self, pieces: list[LocalPiece]) -> None:
        for p in pieces:
            g = self.param_groups[p.group]
            st = self.state_of(p)
            if "exp_avg" not in st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p.param), torch.zeros_like(p.param)
            adamw_step_(p.param, p.grad, st["exp_avg"], st["exp_avg_sq"], self.param_steps[p.name], g["lr"],
                        tuple(g["adam_betas"]), g["adam_eps"], g["weight_decay"])

    # ------------------------------------------------------------------ pieces of the math
    @announces("polar")
    def _polar(self, names: list[str], mats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Owner side of the LMO: −s·polar of each whole matrix (Newton–Schulz, batched by shape)."""
        return self.polar([self.specs[n] for n in names], mats, self.lmo)

    @announces("dual_norms")
    def _dual_norms(self, names: list[str], mats: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Owner side of the variance: per parameter, the dual norm s·‖D_b‖_nuclear of each of its
        blocks (s the LMO's scale, :func:`lanton_dist.lmo.pair_scale`)."""
        if not names:
            return []
        with torch.no_grad():
            estimator = resolve_estimator(self.estimator_name, mats[0].device)
            flat = iter(lmo_mod.hidden_dual_norms([self.specs[n] for n in names], mats, estimator, lmo=self.lmo))
            return [[next(flat) for _ in self.specs[n].blocks] for n in names]

    def _fill_hidden_norms(self, vec: torch.Tensor, norms: dict[str, list[torch.Tensor]]) -> None:
        """Write the owner's per-block dual norms into ``vec[:L]`` and mark them present in
        ``vec[L:]``: one stack and two indexed writes, whatever the number of matrices."""
        if not norms:
            return
        idx = self._lists.get("owned_norms", [self.layer_start[n] + b for n, values in norms.items() for b in range(len(values))],
                              torch.long, vec.device)
        vec.index_put_((idx,), torch.stack([v for values in norms.values() for v in values]).to(vec.dtype))
        vec.index_fill_(0, idx + self.n_layers, 1.0)

    @announces("lmo")
    def _hidden_directions(self, hidden: list[LocalPiece], grads: list[torch.Tensor],
                           owner_step: Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each rank's reduced gradient pieces of the ``hidden`` matrices go to their owners
        (``lmo_gather``), ``owner_step`` runs there on the whole matrices, and each rank gets its
        piece of the resulting directions (``lmo_scatter``)."""
        apply = getattr(self.exchange, "apply", None)
        if apply is not None:
            return apply(hidden, grads, owner_step, "lmo_gather", "lmo_scatter")
        owned = self.exchange.gather(hidden, grads, "lmo_gather")
        names = list(owned)
        dirs = owner_step(names, [owned[n] for n in names])
        return self.exchange.scatter(hidden, dict(zip(names, dirs)), "lmo_scatter")

    def _directions(self, live: list[LocalPiece], sent: list[torch.Tensor],
                    owner_step: Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The LMO direction of every live piece. ``sent``: per piece, the reduced gradient of
        an owner-held matrix (it goes to the owner, :meth:`_hidden_directions`) or the
        effective momentum of an elementwise piece."""
        out: list[torch.Tensor | None] = [None] * len(live)
        hidden = [i for i, p in enumerate(live) if self.owner_held(p.spec)]
        for i, d in zip(hidden, self._hidden_directions([live[i] for i in hidden], [sent[i] for i in hidden], owner_step)):
            out[i] = d
        vector_names = self._all_vector_names
        if vector_names:
            index = {n: j for j, n in enumerate(vector_names)}
            sums = torch.zeros(len(vector_names), device=self.H.device, dtype=self.acc_dtype)
            vectors = [i for i, p in enumerate(live) if p.spec.geometry is Geometry.VECTOR]
            for i in vectors:
                sums[index[live[i].name]] += lmo_mod.sq_partial(sent[i]) * live[i].weight
            self.coll.all_reduce(sums, "norm").wait()
            for i in vectors:
                out[i] = lmo_mod.vector_direction(sent[i], sums[index[live[i].name]].sqrt(), live[i].spec.numel)
        for i, p in enumerate(live):
            if p.spec.geometry is Geometry.EMBED_HEAD:
                out[i] = lmo_mod.sign_direction(p.spec, sent[i], self.lmo)
        return out  # type: ignore[return-value]

    def _piece_differences(self, live: list[LocalPiece]) -> list[torch.Tensor | None]:
        """D of each live piece whose differences travel as pieces, aligned with ``live``:
        Option II's ``diff2`` (every piece; a missing one is an error), Option I's
        G_t − G_{t−1} of elementwise pieces with a stored gradient; ``None`` otherwise (Option
        I's hidden differences are formed by their owners, :meth:`_owner_step`)."""
        out: list[torch.Tensor | None] = []
        for p in live:
            if self.option == "II":
                if p.diff2 is None:
                    raise RuntimeError(f"step {self.t} estimates with Option II but {p.name} has no half-batch "
                                       "gradient: call stash_half_gradient() between the two half-batch backward passes")
                out.append(p.diff2)
            elif self.owner_held(p.spec):
                out.append(None)
            else:
                prev = self.state_of(p).get("prev_grad")
                out.append(None if prev is None else p.grad - prev)
        return out

    @announces("variance_estimate")
    def _launch_variance(self, live: list[LocalPiece], diffs: list[torch.Tensor | None],
                         owner_diffs: dict[str, torch.Tensor] | None) -> None:
        """Post this estimation step's variance reduction. ``diffs``: :meth:`_piece_differences`
        of ``live``; ``owner_diffs``: Option I's whole-matrix D of the matrices this rank owns
        (formed by :meth:`_owner_step`). Option II's hidden ``diff2`` pieces are gathered to the
        owners (``variance_gather``: D = ∇_A − ∇_B is not derivable from stored state)."""
        L = self.n_layers
        vec = torch.zeros(2 * L, device=self.H.device, dtype=self.acc_dtype)
        hidden = [(p, d) for p, d in zip(live, diffs) if p.spec.geometry is Geometry.HIDDEN and d is not None]
        pending: OwnerWork
        if owner_diffs is not None:
            pending, kept = _ReadyGather(owner_diffs), list(owner_diffs.values())
        else:
            launch = getattr(self.exchange, "launch_gather", None)
            if launch is not None:
                pending = launch([p for p, _ in hidden], [d for _, d in hidden], "variance_gather")
            else:
                pending = _ReadyGather(self.exchange.gather([p for p, _ in hidden], [d for _, d in hidden], "variance_gather"))
            kept = [d for _, d in hidden]
        side = self._side_stream() if self.overlap and not self.defer_variance else None
        if self.defer_variance:
            pending.start(self._dual_norms)
        elif side is not None and side.defers:
            gathered = pending
            pending = side.launch(lambda: gathered.map(self._dual_norms), keep=kept)
        else:
            self._fill_hidden_norms(vec, pending.map(self._dual_norms))
        for p, d in zip(live, diffs):
            if d is None or p.spec.geometry is Geometry.HIDDEN:
                continue
            s = self.layer_start[p.name]
            part = lmo_mod.sign_dual_partial(p.spec, d, self.lmo) if p.spec.geometry is Geometry.EMBED_HEAD else lmo_mod.sq_partial(d)
            vec[s] += part * p.weight
            vec[L + s] += p.weight
        if self.defer_variance or (side is not None and side.defers):
            self._deferred = (pending, vec)
        else:
            self._pending = (self.coll.all_reduce(vec, "variance"), vec)

    # ------------------------------------------------------------------ bookkeeping
    def _side_stream(self) -> SideStream:
        """The side stream of the parameters' device (made on first use)."""
        if self._side is None or self._side.device != self.H.device:
            self._side = SideStream(self.H.device)
        return self._side

    def _to(self, device: torch.device) -> None:
        if self.H.device != device:
            self.H, self.F, self.E = self.H.to(device), self.F.to(device), self.E.to(device)
            self.N, self.A = self.N.to(device), self.A.to(device)
            self.layer_gid, self._vector_numel = self.layer_gid.to(device), self._vector_numel.to(device)

    def layer_diagnostics(self) -> list[dict[str, Any]]:
        """Per logical layer (replicated on every rank): name, geometry, H, α, factor, lr."""
        rows = []
        for name, s in self.specs.items():
            g = self.param_groups[self.group_of[name]]
            for b, blk in enumerate(s.blocks):
                i = self.layer_start[name] + b
                h = float(self.H[i])
                used = h / (1 - g["beta2"] ** float(self.N[i])) if g.get("bias_correction") and self.N[i] > 0 else h
                a = float(self.A[noise.GEOMETRY_INDEX[s.geometry]]) if g.get("alpha_mode") == "auto" else math.nan
                a = g.get("alpha", 1.0) if a != a else a
                rows.append(dict(name=blk.name, geometry=s.geometry.value, H=h,
                                 alpha=a / math.sqrt(a ** 2 + used) if "alpha" in g else 1.0,
                                 lr_factor=float(self.F[i]), lr=g["lr"] * float(self.F[i])))
        return rows
