"""The data-parallel strategy models: how each stack moves data in one step.

Registered in :data:`~lanton_dist.plan.predictions.STRATEGY_MODELS`; ``validated_by`` says what
each model was checked against.

``zero1`` / ``zero2``  :class:`~lanton_dist.engine.ShardedLANTON` (owner-aligned ZeRO): per step
    one reduction per bucket (``grad_reduce``: a reduce-scatter, or for a bucket of unequal chunks
    a reduce to each rank with a non-empty chunk, :mod:`lanton_dist.engine.layout`), the scalar all-reduces ``finite`` (1
    element), ``variance`` (2L elements, estimation steps), ``norm`` (one element per vector
    parameter, LANTON/Scion), Option II's ``grad_reduce_half`` (estimation steps), one
    gather per bucket (``param_gather``: all-gather, or broadcasts). ZeRO-1 and ZeRO-2 move the same bytes (they differ
    in gradient memory only). **Validated**: equal, integer for integer, to the engine's
    :class:`~lanton_dist.engine.meter.CommMeter` at world sizes 2–4 (``tests/test_plan.py``).
``zero3``  owner-aligned ZeRO-3 (modelled, not validated): as ``zero2`` but parameters stay
    sharded; the all-gather runs before forward and again before backward
    (``param_gather_fwd``/``param_gather_bwd``) instead of after the step.
``fsdp2``  FSDP2 + :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2`: parameters sharded on
    dim 0 in ``⌈d0/dp⌉``-row chunks (``torch.chunk`` rule). The optimizer's traffic — the
    bucketed all-to-alls of hidden matrices' reduced gradients to their owners (``lmo_gather``:
    each rank sends its rows of every matrix another rank owns; the owner keeps momentum and
    Option I's previous gradient whole) and of the directions back (``lmo_scatter``: each owner
    sends every rank its rows of the result), Option II's estimation steps add the all-to-all of
    half-batch gradient differences (``variance_gather``), and the scalars, with the variance
    all-reduce deferred to the next step (``defer_variance``) — is **validated**: the same multiset of collectives per rank and
    step as the adapter's meter, world 3 (``tests/test_plan.py``). FSDP2's own collectives
    (``fsdp_*`` phases; not metered) are modelled: one unit per transformer block plus the root
    (embedding, final norm, head), an all-gather per unit before forward and before backward
    (the root only before forward), a reduce-scatter per unit, all padded to ``⌈d0/dp⌉·dp`` rows.
``deepspeed`` / ``deepspeed3``  DeepSpeed ZeRO-1/2 and ZeRO-3 +
    :class:`~lanton_dist.integrations.deepspeed.LANTONDeepSpeed`: the same piece exchange
    (:func:`piece_exchange_collectives`) over DeepSpeed's partitions (:func:`deepspeed_ranges`:
    ZeRO-1/2 flat groups padded to ``2·dp`` and cut in ``dp``; ZeRO-3 ``⌈numel/dp⌉`` per
    parameter) in DeepSpeed's fp32 master dtype. **Validated**: partitions equal those the adapter
    reads from DeepSpeed, and collectives and NS FLOPs equal its meter and the counted calls, ZeRO-2
    and ZeRO-3 at world 3 (``tests/test_plan.py``). DeepSpeed's own collectives (``ds_*``) are
    modelled: ZeRO-1/2 a reduce-scatter and an all-gather of each padded flat group, ZeRO-3 per
    parameter a gather before forward and backward and a reduce-scatter.
``ddp``  replicated optimizer (modelled, not validated): one all-reduce per DDP bucket (whole
    tensors, reverse order, ``bucket_mb``) and every DP rank runs every Newton–Schulz and nuclear
    norm (the redundant scheme the spec measures at a third of a 1B model's fwd+bwd).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from lanton_dist.engine.layout import Layout
from lanton_dist.engine.ranges import Ranges, flat_partition_ranges, padded_partition_ranges, row_ranges
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.plan.inputs import OptimSettings
from lanton_dist.plan.model import engine_order
from lanton_dist.plan.predictions import Collective, StagePlan, StrategyModel, register_strategy

if TYPE_CHECKING:
    from lanton_dist.plan.planner import StepPlanner


def engine_collectives(layout: Layout, step: int, optim: OptimSettings, n_layers: int, n_vector: int, *,
                       rank: int = 0, group: str = "dp", scalar_group: tuple[str, int] | None = None,
                       norm_group: tuple[str, int] | None = None, gather_phases: tuple[str, ...] = ("param_gather",)) -> list[Collective]:
    """The collectives :class:`~lanton_dist.engine.ShardedLANTON` issues at ``step`` (0: the
    ``init_sync`` all-gather of construction), in issue order.

    Args:
        layout: the engine's layout (``build_layout(specs, plan, world, bucket_numel)``).
        rank: the DP rank (a bucket of unequal chunks is a reduce / broadcast per chunk, whose
            bytes depend on the rank).
        n_layers: logical layers L of the whole model (Σ blocks); the variance vector is 2L.
        n_vector: vector-geometry parameters of the whole model (the ``norm`` vector length).
        scalar_group / norm_group: ``(name, size)`` of the group of the scalar all-reduces
            (default: the DP group, as in the engine).
        gather_phases: phases of the parameter all-gather (``zero3`` gathers twice).
    """
    W, E, A = layout.world, optim.param_bytes, optim.scalar_bytes
    sg = scalar_group or (group, W)
    ng = norm_group or sg

    def per_bucket(op: str, phase: str) -> list[Collective]:
        out = []
        for b in layout.buckets:
            if b.uniform:
                out.append(Collective(op, phase, group, W, b.numel, E))
                continue
            gather = op == "all_gather"
            for q, n in b.chunks:
                quiet = rank == ((q - 1) % W if gather else q)   # the rank that sends nothing
                out.append(Collective("broadcast" if gather else "reduce", phase, group, W, n, E, n if quiet else 0))
        return out

    if step == 0:
        return per_bucket("all_gather", "init_sync")
    out = per_bucket("reduce_scatter", "grad_reduce")
    if optim.estimates(step) and optim.option == "II":
        out += per_bucket("reduce_scatter", "grad_reduce_half")
    out.append(Collective("all_reduce", "finite", sg[0], sg[1], 1 + n_layers, A))  # skip vote + presence per layer
    if optim.algorithm in ("lanton", "scion") and n_vector:
        out.append(Collective("all_reduce", "norm", ng[0], ng[1], n_vector, A))
    # after the LMO (the owners form D in their step); on cuda the engine issues it at the start of
    # the next step, after the owners' side-stream norms: the same bytes; the step time model
    # below does not overlap anything either way
    if optim.estimates(step):
        out.append(Collective("all_reduce", "variance", sg[0], sg[1], 2 * n_layers, A))
    for phase in gather_phases:
        out += per_bucket("all_gather", phase)
    return out



def ddp_buckets(specs: list[ParamSpec], bucket_numel: int) -> list[int]:
    """Element counts of DDP's gradient buckets: whole tensors in reverse order, each bucket
    closed once it reaches ``bucket_numel`` (DDP's small first bucket is ignored)."""
    buckets, cur = [], 0
    for s in reversed(specs):
        cur += s.numel
        if cur >= bucket_numel:
            buckets.append(cur)
            cur = 0
    if cur:
        buckets.append(cur)
    return buckets


def _piece_sizes(ranges: dict[str, Ranges]) -> Callable[[ParamSpec, int], int]:
    """``piece_numel(spec, rank)``: elements of ``spec`` that ``rank`` holds under ``ranges``."""
    return lambda s, r: ranges[s.name][r][1] - ranges[s.name][r][0]


def _scalar_groups(p: StepPlanner) -> tuple[tuple[str, int], tuple[str, int]]:
    """Groups of (finite/variance, norm): the DP group, or the world when TP or PP hold other
    parts of the model (the engine's ``scalar_world=True``, as the Megatron adapter runs it)."""
    L = p.layout
    if L.tp * L.pp == 1:
        return ("dp", L.dp), ("dp", L.dp)
    return ("world", L.world), ("world", L.world)


def _stage_vectors(p: StepPlanner, st: StagePlan) -> int:
    """Length of the ``norm`` vector: every vector parameter of the job (the core's layer list
    spans all pipeline stages)."""
    return p.n_vector_total


def _engine_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    """One layout and one scalar schedule per stage; a bucket's reduce/broadcast bytes depend
    on the DP rank ``d``: computed once per (kind of step, d) — the step matters only as
    construction or not and estimation or not (any k), the settings only through the bytes,
    the option and the algorithm."""
    sg, ng = _scalar_groups(p)
    gathers = ("param_gather_fwd", "param_gather_bwd") if p.layout.strategy == "zero3" else ("param_gather",)
    o = p.optim
    kind = (step == 0, o.estimates(step), o.param_bytes, o.scalar_bytes, o.option, o.algorithm)
    return list(st.memo(("engine_colls", p.layout, kind, p.n_layers_total, d),
                        lambda: engine_collectives(st.layout, step, p.optim, p.n_layers_total, _stage_vectors(p, st),
                                                   rank=d, scalar_group=sg, norm_group=ng, gather_phases=gathers)))


def _engine_rank_class(p: StepPlanner, st: StagePlan, d: int, t: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ranks issue the same engine collectives (as a multiset) when they hold the same chunk sizes
    in the buckets of unequal chunks (a reduce of chunk q sends nothing from rank q) and so does
    the next rank (a broadcast from chunk q sends nothing from rank q − 1): every other
    collective is the same on every rank (:func:`engine_collectives`)."""
    mine = _layout_chunks(st)
    return mine[d], mine[(d + 1) % st.layout.world]


def _layout_chunks(st: StagePlan) -> list[tuple[int, ...]]:
    """Per DP rank, the sorted sizes of its chunks in the buckets of unequal chunks (one pass over the layout)."""
    def build() -> list[tuple[int, ...]]:
        out: list[list[int]] = [[] for _ in range(st.layout.world)]
        for b in st.layout.buckets:
            if not b.uniform:
                for q, n in b.chunks:
                    out[q].append(n)
        return [tuple(sorted(x)) for x in out]
    return st.memo("layout_chunks", build)


def _engine_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    """Elements (DP rank ``d``, TP rank ``t``) keeps optimizer state for: its layout segment; with
    TP in ``owner`` mode, a hidden matrix's state is held whole by its TP owner instead
    (the Megatron adapter's ``TensorParallelExchange`` owner, :mod:`lanton_dist.engine.core`)."""
    by_owner = p.layout.tp > 1 and p.layout.tp_mode == "owner" and p.optim.uses_ns
    out = defaultdict(int, _pieces_by_geometry(st, by_owner)[d])
    if by_owner:
        q = d * p.layout.tp + t
        out[Geometry.HIDDEN.value] += _owned_hidden(st)[q]
    return dict(out)


def _pieces_by_geometry(st: StagePlan, skip_hidden: bool) -> list[dict[str, int]]:
    """Per DP rank, the elements of its layout pieces per geometry (hidden ones left out when
    ``skip_hidden``): one pass over the layout's pieces."""
    def build() -> list[dict[str, int]]:
        geo = {s.name: s.geometry for s in st.local}
        out: list[dict[str, int]] = [defaultdict(int) for _ in range(st.layout.world)]
        for b in st.layout.buckets:
            for pc in b.pieces:
                if not (skip_hidden and geo[pc.name] is Geometry.HIDDEN):
                    out[pc.rank][geo[pc.name].value] += pc.numel
        return [dict(x) for x in out]
    return st.memo(("pieces_by_geometry", skip_hidden), build)


def _owned_hidden(st: StagePlan) -> list[int]:
    """Elements of the whole hidden matrices each NS rank of ``st.ownership`` runs (and holds state for)."""
    def build() -> list[int]:
        out = [0] * st.ownership.world
        for s in st.hidden:
            out[st.ownership.owner[s.name]] += s.numel
        return out
    return st.memo("owned_hidden", build)


def _ddp_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    if step == 0:
        return []
    E, W = p.optim.param_bytes, p.layout.dp
    return [Collective("all_reduce", "grad_reduce", "dp", W, n, E) for n in ddp_buckets(st.local, p.bucket_numel)]


def _ddp_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in st.local:
        out[s.geometry.value] += s.numel
    return dict(out)


def _fsdp_units(st: StagePlan) -> list[list[ParamSpec]]:
    units: dict[str, list[ParamSpec]] = {}
    for s in st.local:
        key = ".".join(s.name.split(".")[:2]) if s.name.startswith("layers.") else "root"
        units.setdefault(key, []).append(s)
    return list(units.values())


def exchange_buckets(hidden: list[ParamSpec], bucket_bytes: int, elem: int) -> list[list[ParamSpec]]:
    """Buckets of :class:`~lanton_dist.engine.exchange.AllToAllExchange`: hidden matrices in
    canonical order, a new bucket whenever the next whole matrix would exceed ``bucket_bytes``."""
    groups: list[list[ParamSpec]] = [[]]
    size = 0
    for s in hidden:
        b = s.numel * elem
        if groups[-1] and size + b > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += b
    return [g for g in groups if g]


def piece_exchange_collectives(p: StepPlanner, st: StagePlan, d: int, step: int,
                               piece_numel: Callable[[ParamSpec, int], int], elem: int | None = None) -> list[Collective]:
    """What a :class:`~lanton_dist.engine.optimizer.PieceOptimizer` adapter meters on DP rank
    ``d`` at ``step``: the scalars and the bucketed all-to-alls of hidden pieces to their owners
    and back. ``piece_numel(spec, rank)``: elements of ``spec`` on ``rank`` in the framework's
    sharding (FSDP2: dim-0 rows; DeepSpeed: its flat partitions). ``elem``: bytes per element of
    the pieces (default ``param_bytes``; DeepSpeed's fp32 master partitions: 4). Buckets
    (:func:`exchange_buckets`) whose matrices lie whole on their owners issue nothing. The
    owners hold hidden matrices' state whole, so Option I forms D = G_t − G_{t−1} there: its
    LANTON moves D-Muon's bytes plus the scalars; only Option II gathers D (``variance_gather``)."""
    W, o = p.layout.dp, p.optim
    E = elem or o.param_bytes
    sg, ng = _scalar_groups(p)
    A = 8 if E >= 8 else 4
    out: list[Collective] = []
    out.append(Collective("all_reduce", "finite", sg[0], sg[1], 1 + p.n_layers_total, A))  # skip vote + presence
    variance = Collective("all_reduce", "variance", sg[0], sg[1], 2 * p.n_layers_total, A)
    if o.defer_variance and o.estimates(step - 1):
        out.append(variance)
    owner = st.dp_plan.owner
    buckets = st.memo(("exchange_buckets", p.layout.bucket_mb, E),
                      lambda: exchange_buckets([s for s in engine_order(st.local) if s.geometry is Geometry.HIDDEN],
                                               int(p.layout.bucket_mb * 2**20), E))
    # a bucket whose pieces all sit on their owners already moves nothing: no collective
    buckets = [b for b in buckets if any(piece_numel(s, r) for s in b for r in range(W) if r != owner[s.name])]

    def gathers(phase: str) -> list[Collective]:
        return [Collective("all_to_all", phase, "dp", W, sum(piece_numel(s, d) for s in b), E,
                           sum(piece_numel(s, d) for s in b if owner[s.name] == d)) for b in buckets]

    def scatters(phase: str) -> list[Collective]:
        return [Collective("all_to_all", phase, "dp", W, sum(s.numel for s in b if owner[s.name] == d), E,
                           sum(piece_numel(s, d) for s in b if owner[s.name] == d)) for b in buckets]

    if o.estimates(step):
        if o.option == "II":
            out += gathers("variance_gather")
        if not o.defer_variance:
            out.append(variance)
    if o.uses_ns and buckets:
        out += gathers("lmo_gather") + scatters("lmo_scatter")
    if o.algorithm in ("lanton", "scion") and p.n_vector_total:
        out.append(Collective("all_reduce", "norm", ng[0], ng[1], p.n_vector_total, A))
    return out


def _fsdp_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    """FSDP2 + :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2`: FSDP2's own all-gathers and
    reduce-scatters (``fsdp_*`` phases: modelled, not metered), then
    :func:`piece_exchange_collectives` with dim-0 row shards (what the adapter's meter records)."""
    if step == 0:
        return []
    W, E, o = p.layout.dp, p.optim.param_bytes, p.optim
    units = _fsdp_units(st)

    def padded(unit: list[ParamSpec]) -> int:
        return sum(math.ceil(s.shape[0] / W) * W * (s.numel // s.shape[0]) for s in unit)

    out = [Collective("all_gather", "fsdp_param_gather_fwd", "dp", W, padded(u), E) for u in units]
    out += [Collective("all_gather", "fsdp_param_gather_bwd", "dp", W, padded(u), E) for u in units
            if not any(s.name in ("tok_embeddings.weight", "lm_head.weight") for s in u)]
    out += [Collective("reduce_scatter", "fsdp_grad_reduce", "dp", W, padded(u), E) for u in reversed(units)]
    if o.estimates(step) and o.option == "II":
        out += [Collective("reduce_scatter", "fsdp_grad_reduce_half", "dp", W, padded(u), E) for u in reversed(units)]
    return out + piece_exchange_collectives(p, st, d, step, _fsdp_piece(p, st))


def _fsdp_piece(p: StepPlanner, st: StagePlan) -> Callable[[ParamSpec, int], int]:
    """FSDP2's dim-0 ``torch.chunk`` shards (:func:`~lanton_dist.engine.ranges.row_ranges`)."""
    return _piece_sizes(st.memo("fsdp_ranges", lambda: {s.name: row_ranges(s.shape, p.layout.dp) for s in st.local}))


def _owned_by_geometry(p: StepPlanner, piece: Callable[[ParamSpec, int], int], st: StagePlan, d: int) -> dict[str, int]:
    """Elements data-parallel rank ``d`` keeps optimizer state for, per geometry: its pieces
    (the stack's piece sizes) of elementwise state, and under a Newton–Schulz algorithm the
    hidden matrices it owns, whole (:class:`~lanton_dist.engine.core.ShardedCore`)."""
    out: dict[str, int] = defaultdict(int)
    for s in st.local:
        if s.geometry is Geometry.HIDDEN and p.optim.uses_ns:
            out[s.geometry.value] += s.numel if st.dp_plan.owner[s.name] == d else 0
        else:
            out[s.geometry.value] += piece(s, d)
    return dict(out)


def piece_elements(p: StepPlanner, st: StagePlan, d: int) -> int:
    """Elements of the local model DP rank ``d`` holds as its pieces under the FSDP2 or DeepSpeed
    sharding (its parameter and gradient shards)."""
    piece = _fsdp_piece(p, st) if p.layout.strategy == "fsdp2" else _ds_piece(p, st)
    return sum(piece(s, d) for s in st.local)


def _fsdp_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    return _owned_by_geometry(p, _fsdp_piece(p, st), st, d)


def deepspeed_ranges(local: list[ParamSpec], dp: int, stage: int) -> dict[str, Ranges]:
    """Each parameter's flat range on every DP rank under DeepSpeed ZeRO (``stage`` 1/2: one flat
    buffer per param group — the engine-ordered geometry groups — padded to a multiple of
    ``2·dp`` (``nccl_start_alignment_factor``) and cut into ``dp`` equal partitions, no
    ``parameter_alignment``, no round-robin; stage 3: every parameter cut into ``⌈numel/dp⌉``
    partitions), with the torch-free helpers of :mod:`lanton_dist.engine.ranges`."""
    if stage == 3:
        return {s.name: padded_partition_ranges(s.numel, math.ceil(s.numel / dp), dp) for s in local}
    out = {}
    for geometry in Geometry:
        group = [s for s in engine_order(local) if s.geometry is geometry]
        total = sum(s.numel for s in group)
        partition = math.ceil(total / (2 * dp)) * 2 * dp // dp
        offset = 0
        for s in group:
            out[s.name] = flat_partition_ranges(offset, s.numel, partition, dp)
            offset += s.numel
    return out


def _ds_stage(p: StepPlanner) -> int:
    return 3 if p.layout.strategy == "deepspeed3" else 2


def _ds_piece(p: StepPlanner, st: StagePlan) -> Callable[[ParamSpec, int], int]:
    return _piece_sizes(st.memo(("ds_ranges", _ds_stage(p)), lambda: deepspeed_ranges(st.local, p.layout.dp, _ds_stage(p))))


def _ds_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    """DeepSpeed ZeRO + :class:`~lanton_dist.integrations.deepspeed.LANTONDeepSpeed`: DeepSpeed's own
    collectives (``ds_*``: modelled, not metered — ZeRO-1/2: a reduce-scatter and an all-gather of
    each padded flat group; ZeRO-3: per parameter, gathers before forward and backward and a
    reduce-scatter), then :func:`piece_exchange_collectives` with DeepSpeed's partitions. DeepSpeed's
    fp32 master partitions make the exchange 4-byte whatever ``param_bytes`` says."""
    if step == 0:
        return []
    W, E = p.layout.dp, 4
    piece = _ds_piece(p, st)
    if _ds_stage(p) == 3:
        padded = [math.ceil(s.numel / W) * W for s in st.local]
        out = [Collective("all_gather", "ds_param_gather_fwd", "dp", W, n, E) for n in padded]
        out += [Collective("all_gather", "ds_param_gather_bwd", "dp", W, n, E) for n in padded]
        out += [Collective("reduce_scatter", "ds_grad_reduce", "dp", W, n, E) for n in reversed(padded)]
    else:
        flats = [sum(piece(s, r) for r in range(W) for s in st.local if s.geometry is g) for g in Geometry]
        flats = [math.ceil(n / (2 * W)) * 2 * W for n in flats if n]
        out = [Collective("reduce_scatter", "ds_grad_reduce", "dp", W, n, E) for n in flats]
        out += [Collective("all_gather", "ds_param_gather", "dp", W, n, E) for n in flats]
    return out + piece_exchange_collectives(p, st, d, step, piece, elem=E)


def _ds_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    return _owned_by_geometry(p, _ds_piece(p, st), st, d)


def _ddp_scalar_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    # DDP's replicated optimizer needs no scalar reductions over DP (every rank holds everything);
    # with PP the variance still spans the stages: one world all-reduce of 2L (for the group max).
    out = _ddp_colls(p, st, d, t, step)
    if p.layout.pp > 1 and p.optim.estimates(step):
        out.append(Collective("all_reduce", "variance", "world", p.layout.world, 2 * p.n_layers_total, p.optim.scalar_bytes))
    return out


register_strategy(StrategyModel("zero1", _engine_colls, _engine_owned, "ShardedLANTON + CommMeter, world 2-4 (tests/test_plan.py)",
                                "owner-aligned ZeRO-1 (ShardedLANTON); gradients stay whole until the step", _engine_rank_class))
register_strategy(StrategyModel("zero2", _engine_colls, _engine_owned, "ShardedLANTON + CommMeter, world 2-4 (tests/test_plan.py)",
                                "owner-aligned ZeRO-2 (ShardedLANTON)", _engine_rank_class))
register_strategy(StrategyModel("zero3", _engine_colls, _engine_owned, None,
                                "owner-aligned ZeRO-3: parameter all-gather before forward and backward", _engine_rank_class))
register_strategy(StrategyModel("fsdp2", _fsdp_colls, _fsdp_owned,
                                "LANTONFSDP2 + CommMeter, world 3, optimizer collectives (tests/test_plan.py); "
                                "FSDP2's own fsdp_* all-gathers/reduce-scatters are modelled",
                                "FSDP2 dim-0 shards; bucketed all-to-all of hidden matrices to owners and back"))
register_strategy(StrategyModel("deepspeed", _ds_colls, _ds_owned,
                                "LANTONDeepSpeed (ZeRO-2) + CommMeter, world 3, optimizer collectives and partitions "
                                "(tests/test_plan.py); DeepSpeed's own ds_* collectives are modelled",
                                "DeepSpeed ZeRO-1/2 flat partitions; bucketed all-to-all of hidden pieces to owners and back"))
register_strategy(StrategyModel("deepspeed3", _ds_colls, _ds_owned,
                                "LANTONDeepSpeed (ZeRO-3) + CommMeter, world 3, optimizer collectives and partitions "
                                "(tests/test_plan.py); DeepSpeed's own ds_* collectives are modelled",
                                "DeepSpeed ZeRO-3 per-parameter partitions; bucketed all-to-all to owners and back"))
register_strategy(StrategyModel("ddp", _ddp_scalar_colls, _ddp_owned, None,
                                "DDP all-reduce; replicated optimizer, redundant Newton-Schulz"))

