"""LANTON (and Scion, D-Muon, AdamW) on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps every parameter as a DTensor ``Shard(0)`` over a 1-D device mesh: rank r holds
rows ``[r·c, (r+1)·c) ∩ [0, d0)``, ``c = ⌈d0/W⌉`` (uneven and empty shards allowed), and after
``backward`` the gradient is reduce-scattered (averaged) into the same layout. The optimizer
works directly on those local shards:

* momentum, sign/RMS LMOs, AdamW and weight decay are elementwise on the shards; the
  embed_head and vector groups never gather anything (their norms are scalar all-reduces);
* each hidden matrix's gradient shards go to its owner (FLOP-balanced plan) through the
  bucketed :class:`~lanton_dist.engine.exchange.AllToAllExchange` — one all-to-all per
  bucket each way, Newton–Schulz of bucket i overlapping the transfer of bucket i+1 — where
  the owner keeps the matrix's momentum and Option I's previous gradient whole (the core's
  owner-held state), so every Newton–Schulz runs once per matrix per step across the job and
  nothing is all-gathered;
* on estimation steps the owner forms D = G_t − G_{t−1} itself; with ``defer_variance=True``
  (the default) it computes the nuclear norms on a background thread while the next forward
  runs, and step t+1 starts by all-reducing them — the one-step delay of the engine's
  ``overlap=True`` (the reference with ``delay_lr_factor=True``). Option II's D = ∇_A − ∇_B
  cannot be rebuilt from stored state: its pieces are gathered to the owners on estimation steps.

Extra traffic over FSDP2+AdamW per step: ≈ 2 × the owned hidden bytes (the all-to-all
optimum, exactly D-Muon's) plus scalar all-reduces (Option II: plus D on estimation steps).

**2-D meshes.** Every parameter's layout is read from its DTensor placements (each rank's
block: DTensor's shard arithmetic, derived locally for every rank at construction) over the
job's process group (all ranks of the parameters' meshes):

* HSDP (``fully_shard(mesh=("replicate", "shard"))``, placements ``(Replicate(), Shard(0))``):
  the R replicas of a row shard hold the same range. Elementwise work runs on every replica
  (identical, after HSDP's all-reduce of the gradients); scalar sums count the first replica
  only (``LocalPiece.weight``). For Newton–Schulz and the nuclear norm each replica sends a
  disjoint 1/R of its shard to the matrix's owner (so the gathered ranges tile the matrix over
  all R·S ranks and owners are spread over both mesh dims: **each matrix once per job**) and
  the owner returns the result to all R holders of each shard (one all-to-all each way).
* FSDP × TP (``parallelize_module`` on a ("dp", "tp") mesh, then ``fully_shard`` over "dp"):
  column-parallel weights (``(_StridedShard(0), Shard(0))``) are row ranges; row-parallel
  ones (``(Shard(0), Shard(1))``) are row × column blocks, which are not flat ranges of the
  row-major flattening. Pieces then index a *storage order* in which every block is one range
  (column bands one after the other, :class:`~lanton_dist.engine.ranges.BlockLayout`); the
  owner converts between it and the matrix. TP-replicated parameters (embeddings, head,
  norms under FSDP) are replicas as in HSDP. Fused weights (several logical blocks) must be
  sharded along dim 0. Checkpoints record the storage orders and refuse another TP split.

Bytes of one LMO exchange, whole job, per step, in units of M = the hidden matrices' bytes
(one copy); R replicas × S shards, W = R·S (``AllToAllExchange.optimum_sent_elements``
counts it per rank; the meter agrees, ``tests/test_fsdp2_mesh.py``):

=============  ==========================  ======================  ==========================
R × S          NS once per job (this)      NS once per replica      cross-replica (this / per
               gather + scatter to R        (plain FSDP2 in each     replica), in M
               holders: 1−1/W + R−1/S       replica): 2R(1−1/S)
=============  ==========================  ======================  ==========================
2 × 2          2.25 M, NS 1×               2.00 M, NS 2×            1.5 / 0
2 × 8          2.81 M, NS 1×               3.50 M, NS 2×            1.5 / 0
4 × 8          4.84 M, NS 1×               7.00 M, NS 4×            3.75 / 0
8 × 8          8.86 M, NS 1×               14.0 M, NS 8×            7.9 / 0
=============  ==========================  ======================  ==========================

Running it once moves fewer bytes from S ≥ 3 (R = 2) and saves (R−1)/R of the Newton–Schulz
FLOPs, but about (R−1)·M of its bytes cross the replicate dimension (typically between
nodes), where repeating it per replica stays inside each replica's shard group.

Usage::

    for block in model.layers: fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LANTONFSDP2(model, OptimConfig(...))
    loss.backward(); opt.step(); opt.zero_grad()
    opt.save(path, model) / opt.load(path, model)      # torch.distributed.checkpoint

Parameters without a gradient: FSDP2 leaves ``.grad`` None for a parameter no rank used;
a parameter only some ranks use needs FSDP2's ``model.set_reduce_scatter_unused_params(True)``
(otherwise its reduce-scatters mismatch across ranks), which reduces zeros for the others
and zero-fills the gradient even where no rank used it. Presence is therefore recorded by
a post-accumulate-grad hook on each unsharded parameter (installed by a forward pre-hook of
its FSDP module) and the core skips a parameter no rank had a gradient for.

Process group: the FSDP mesh's for one 1-D mesh, else the default group, unless
``process_group`` is given (it must span exactly the ranks of the parameters' meshes).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lanton_dist.engine.checkpoint import model_tensors
from lanton_dist.engine.core import LocalPiece
from lanton_dist.engine.meter import CommMeter
from lanton_dist.engine.optimizer import PieceOptimizer
from lanton_dist.engine.ranges import BlockLayout, Ranges, replica_ranges
from lanton_dist.lanton import run_closure


#: Checkpoint key prefix of a matrix's non-row-major storage order.
_ORDER_KEY = "storage_order/"


def _job_group(params: list[tuple[str, torch.Tensor]], process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The process group spanning every rank that holds a piece of the model: the mesh's group
    for one 1-D mesh (plain FSDP2), else the default group (HSDP, FSDP × TP), unless
    ``process_group`` is given; it must hold exactly the ranks of the parameters' meshes."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard  # FSDP2 over a TP Shard(0)

    if not params:
        raise ValueError("the model has no trainable parameters")
    ranks: set[int] = set()
    meshes = []
    for name, p in params:
        if not isinstance(p, DTensor):
            raise ValueError(f"{name} is not a DTensor: wrap the model with torch.distributed.fsdp.fully_shard "
                             "(per block and the root) before building LANTONFSDP2")
        if not all(isinstance(pl, (Shard, _StridedShard, Replicate)) for pl in p.placements):
            raise ValueError(f"{name}: placements {tuple(p.placements)}; LANTONFSDP2 supports Shard and Replicate")
        if p.device_mesh not in meshes:
            meshes.append(p.device_mesh)
            ranks.update(p.device_mesh.mesh.flatten().tolist())
    if process_group is None:
        if len(meshes) == 1 and meshes[0].ndim == 1:
            return meshes[0].get_group()
        process_group = dist.group.WORLD
    if sorted(dist.get_process_group_ranks(process_group)) != sorted(ranks):
        raise ValueError(f"process_group must span exactly the ranks of the parameters' device meshes ({sorted(ranks)}); "
                         "pass process_group= when the model lives on part of the job")
    return process_group


def _mesh_coordinates(mesh) -> dict[int, tuple[int, ...]]:
    """Global rank → its coordinate in ``mesh`` (a DeviceMesh) — or, for a rank outside it, in
    the copy of ``mesh`` that rank belongs to (a sliced or flattened mesh such as ``mesh["dp"]``
    has one copy per coordinate of the other dims: torch's mesh layout over the root's ranks)."""
    copies = mesh.mesh.reshape(1, *mesh.mesh.shape)
    layout, rank_map = getattr(mesh, "_layout", None), getattr(mesh, "_rank_map", None)
    if layout is not None and rank_map is not None:
        copies = layout.remap_to_tensor(rank_map)
    shape = tuple(mesh.mesh.shape)
    out = {}
    for copy in copies.reshape(copies.shape[0], -1).tolist():
        for flat, rank in enumerate(copy):
            coord, rest = [], flat
            for size in reversed(shape):
                coord.append(rest % size)
                rest //= size
            out[rank] = tuple(reversed(coord))
    return out


def _blocks_of_every_rank(shape: tuple[int, ...], mesh, placements, ranks: list[int],
                          coords: dict[int, tuple[int, ...]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(global offset, local shape)`` of a DTensor of ``shape`` on ``mesh`` with ``placements``
    for each of ``ranks`` (global ranks, in process-group order); ``((), (0,))`` — what DTensor
    reports — for a rank outside the mesh."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    out = []
    for r in ranks:
        if r not in coords:
            out.append(((), (0,)))
            continue
        local, offset = _compute_local_shape_and_global_offset(shape, tuple(mesh.mesh.shape), list(coords[r]), placements)
        out.append((tuple(offset), tuple(local)))
    return out


class LANTONFSDP2(PieceOptimizer):
    """The sharded optimizer for an FSDP2 model (see module doc).

    Args:
        model: wrapped with ``fully_shard`` (every trainable parameter a ``Shard(0)`` DTensor).
        cfg: :class:`~lanton_dist.config.OptimConfig` (``cfg.name`` picks the algorithm).
        process_group: default the FSDP mesh's group.
        meter: a :class:`~lanton_dist.engine.meter.CommMeter` (new by default).
        bucket_mb, pad, window: exchange buckets (see :class:`AllToAllExchange`).
        overlap, defer_variance: variance reduction one step late (default), and its gather and
            nuclear norms overlapped with the next forward (default).
        groups: param groups to use instead of ``param_groups(model, cfg)``.
    """

    def __init__(self, model: nn.Module, cfg, *, process_group: dist.ProcessGroup | None = None,
                 meter: CommMeter | None = None, bucket_mb: float = 25.0, pad: bool = False, window: int = 2,
                 overlap: bool = True, defer_variance: bool = True, groups: list[dict[str, Any]] | None = None) -> None:
        from lanton_dist.factory import hyper_parameters, lanton_options, param_groups

        groups = groups if groups is not None else param_groups(model, cfg)
        pg = _job_group([(s.name, p) for g in groups for p, s in zip(g["params"], g["specs"])], process_group)
        super().__init__(groups, cfg.name, process_group=pg, meter=meter, bucket_mb=bucket_mb, pad=pad, window=window,
                         overlap=overlap, defer_variance=defer_variance, **lanton_options(cfg), **hyper_parameters(cfg))
        self._params = [p for g in self._groups for p in g["params"]]
        self._index = {s.name: i for i, s in enumerate(self.specs)}
        self.layouts, held = self._mesh_layouts()
        ranges, self._weights = {}, {}
        for s in self.specs:
            ranges[s.name], weights = replica_ranges(held[s.name])
            self._weights[s.name] = weights[self.rank]
        self._setup(ranges, self._params[0].dtype, held=held, orders=self.layouts)
        self._seen: set[int] = set()  # parameters with a gradient this step (presence hooks)
        self._hooked: dict[int, int] = {}  # id of an unsharded parameter → its index
        from torch.distributed.fsdp import FSDPModule

        index = {id(p): k for k, p in enumerate(self._params)}
        self._presence_hooks = []
        for fsdp_module in model.modules():
            if isinstance(fsdp_module, FSDPModule):
                owned = [(m, attr, index[id(q)]) for m in fsdp_module.modules()
                         for attr, q in m.named_parameters(recurse=False) if id(q) in index]
                self._presence_hooks.append(fsdp_module.register_forward_pre_hook(functools.partial(self._watch, owned)))

    def _mesh_layouts(self) -> tuple[dict[str, BlockLayout], dict[str, Ranges]]:
        """Every rank's block of every parameter — the storage layouts and each rank's held
        range — derived locally from the placements (DTensor's shard arithmetic is
        deterministic; :func:`_blocks_of_every_rank`): nothing is communicated."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        ranks = dist.get_process_group_ranks(self.coll.group)  # global ranks, in group-rank order
        coords: dict[int, dict[int, tuple[int, ...]]] = {}  # id(mesh) → global rank → coordinate
        cache: dict[tuple[Any, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        layouts, held = {}, {}
        for p, s in zip(self._params, self.specs):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if math.prod(shape) != p.to_local().numel():
                raise ValueError(f"{s.name}: local tensor has {p.to_local().numel()} elements, its placements "
                                 f"{tuple(p.placements)} give {tuple(shape)}: unsupported sharding")
            mesh = p.device_mesh
            if id(mesh) not in coords:
                coords[id(mesh)] = _mesh_coordinates(mesh)
            key = (tuple(p.shape), id(mesh), tuple(p.placements))
            if key not in cache:
                cache[key] = _blocks_of_every_rank(tuple(p.shape), mesh, p.placements, ranks, coords[id(mesh)])
            every = cache[key]
            if every[self.rank] != (tuple(offset), tuple(shape)):
                raise RuntimeError(f"{s.name}: the block derived for rank {self.rank} {every[self.rank]} is not DTensor's "
                                   f"{(tuple(offset), tuple(shape))} (torch's shard arithmetic changed?)")
            layouts[s.name], held[s.name] = BlockLayout.from_blocks(s.name, s.shape, every)
            if not layouts[s.name].row_major and len(s.blocks) > 1:
                raise ValueError(f"{s.name}: a fused weight ({len(s.blocks)} logical blocks) sharded along columns; "
                                 "its per-block rates need row-major pieces (shard it along dim 0)")
        return layouts, held

    # ------------------------------------------------------------------ presence
    def _watch(self, params: list[tuple[nn.Module, str, int]], _module: nn.Module, _args: Any) -> None:
        """Forward pre-hook of an FSDP module, after FSDP2's own (which put its parameters'
        unsharded tensors on their modules): hook each unsharded parameter once. Parameters of
        nested FSDP modules are still sharded here; their own module's hook takes them."""
        for module, attr, k in params:
            q = module._parameters.get(attr)
            if q is not None and q is not self._params[k] and q.requires_grad and id(q) not in self._hooked:
                q.register_post_accumulate_grad_hook(functools.partial(self._mark, k))
                self._hooked[id(q)] = k

    def _mark(self, k: int, _param: torch.Tensor) -> None:
        self._seen.add(k)

    def _present(self) -> list[str]:
        """Parameters with a gradient on this rank this step: those whose unsharded parameter
        accumulated one (FSDP2's ``set_reduce_scatter_unused_params(True)`` zero-fills the
        others), plus any with a gradient whose FSDP module never ran a forward here."""
        hooked = set(self._hooked.values())
        return [s.name for k, (p, s) in enumerate(zip(self._params, self.specs))
                if k in self._seen or (k not in hooked and (p.grad is not None or self._has_half(s.name)))]

    # ------------------------------------------------------------------ pieces
    def _local_pieces(self) -> list[LocalPiece]:
        out = []
        for p, (s, gi) in zip(self._params, self.named):
            local = p._local_tensor
            grad = None if p.grad is None else p.grad._local_tensor.reshape(-1)
            piece = self._piece(s, gi, local.view(-1), grad)
            piece.weight = self._weights[s.name]
            out.append(piece)
        return out

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(s.name, p) for p, s in zip(self._params, self.specs)]

    def _local_grad(self, p: torch.Tensor) -> torch.Tensor:
        """Option II stash: the (reduce-scattered) local gradient shard, flat."""
        return p.grad._local_tensor.reshape(-1)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        try:
            self._run_core(self._local_pieces(), self._present())
        finally:
            self._seen = set()
        return loss

    def save(self, path: str, model: nn.Module | None = None) -> None:
        """Save optimizer state (and the FSDP2 model's sharded state dict) with
        ``torch.distributed.checkpoint`` to directory ``path``; each rank writes its shards."""
        sd = self.dcp_state_dict()
        sd.update(self._storage_orders())
        if model is not None:
            sd.update(model_tensors(model))
        dcp.save(sd, checkpoint_id=path, process_group=self.coll.group)

    def load(self, path: str, model: nn.Module | None = None) -> None:
        """Load :meth:`save`'s checkpoint (optimizer state reshards to any world size; the model's
        DTensor shards are loaded in place). The storage order of column-sharded matrices must be
        the one saved (the same tensor-parallel split); a clear error otherwise."""
        self._check_storage_orders(path)
        extra = {}
        if model is not None:
            extra = {k: v.detach() for k, v in model_tensors(model).items()}
        loaded = self.load_dcp_state(path, extra)
        if model is not None:
            model.load_state_dict({k[len("model/"):]: v for k, v in loaded.items() if k.startswith("model/")})

    def as_dtensor(self, name: str, piece: torch.Tensor | None) -> torch.Tensor:
        """This rank's ``piece`` (1-D, its held range; ``None``: zeros) of a tensor shaped like
        parameter ``name`` as a DTensor with the parameter's mesh and placements (e.g. its
        momentum, for DCP)."""
        from torch.distributed.tensor import DTensor

        p = self._params[self._index[name]]
        local = torch.zeros_like(p.to_local()) if piece is None else piece.view(p.to_local().shape)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def as_whole(self, name: str, matrix: torch.Tensor | None) -> torch.Tensor:
        """A whole-matrix state tensor of parameter ``name`` (1-D, row-major, as its owner holds
        it; ``None``: zeros) as a plain tensor of the parameter's shape, dtype and device."""
        p = self._params[self._index[name]]
        local = p.to_local()
        return torch.zeros(p.shape, dtype=local.dtype, device=local.device) if matrix is None else matrix.view(p.shape)

    def _storage_orders(self) -> dict[str, torch.Tensor]:
        """Checkpoint entries recording each non-row-major storage order (its column bands)."""
        return {f"{_ORDER_KEY}{n}": torch.tensor(lay.signature(), dtype=torch.long)
                for n, lay in self.layouts.items() if not lay.row_major}

    def _check_storage_orders(self, path: str) -> None:
        """Refuse a checkpoint whose pieces index another storage order (a different TP split):
        its flat ranges would land on the wrong elements."""
        meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        saved = {k: torch.empty(tuple(meta[k].size), dtype=torch.long) for k in meta if k.startswith(_ORDER_KEY)}
        if saved:
            dcp.load(saved, checkpoint_id=path, process_group=self.coll.group)
        mine = self._storage_orders()
        differ = sorted(k[len(_ORDER_KEY):] for k in set(saved) | set(mine)
                        if k not in saved or k not in mine or not torch.equal(saved[k], mine[k]))
        if differ:
            raise ValueError(f"{path}: saved with another column (tensor-parallel) split of {differ[:3]}; optimizer "
                             "state resharding works across FSDP/HSDP sizes with the same TP split only")

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("LANTONFSDP2 state is sharded: use opt.save(path, model) (torch.distributed.checkpoint)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("LANTONFSDP2 state is sharded: use opt.load(path, model) (torch.distributed.checkpoint)")


def build_fsdp2_optimizer(model: nn.Module, cfg, **kwargs: Any) -> LANTONFSDP2:
    """:class:`LANTONFSDP2` for ``cfg.name`` (any of lanton/scion/dmuon/adamw)."""
    return LANTONFSDP2(model, cfg, **kwargs)
