"""LANTON on Megatron-core tensor/pipeline/data parallelism — a thin adapter over the engine.

Each rank holds TP shards of its pipeline stage's parameters. LANTON sees the *logical*
(TP-gathered) tensors described by :func:`~.megatron_model.logical_param_specs`:

* **DP** — the ZeRO engine (:class:`~lanton_dist.engine.ShardedLANTON`) runs over the
  data-parallel group on the TP-local shards: an owner-aligned reduce-scatter hands one DP
  rank whole TP shards of the matrices it owns; the updated shards are all-gathered back.
  The ownership plan depends only on shard shapes, so every TP rank of a DP index owns the
  same matrices.
* **TP** — :class:`TensorParallelExchange` brings the TP shards of each matrix to one TP
  rank (FLOP-balanced over the TP group) with one all-to-all, runs Newton–Schulz / the
  nuclear norm on the whole matrix, and returns each TP rank its shard with one all-to-all:
  each matrix is orthogonalised once per TP×DP group. ColumnParallel (dim 0) and
  RowParallel (dim 1) shards are concatenated along their partition dim; fused
  ``linear_qkv`` / ``linear_fc1`` act per logical block (q, k, v / gate, up).
* **Scalars over the whole job** — vocab-parallel embedding/output ℓ1 sums, vector norms and
  the variance vector are reduced over the world (TP-replicated norm gains contribute from
  TP rank 0 only), and the core's layer list spans all pipeline stages, so the group-wide α
  max covers every stage with one all-reduce per estimation step.

A parameter whose ``.grad`` is None on every rank of the job is skipped for the step (the
engine reports presence into the core's skip vote, over the whole job); one that some DP ranks
lack is reduced with their zeros.

A local shard is placed in its logical tensor's flattening at ``tp_rank · numel(shard)``
(TP-rank-major order: row-major for dim-0 shards). Checkpoints
(:mod:`lanton_dist.engine.checkpoint`) reshard across DP sizes, not across TP sizes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lanton_dist.config import RunConfig
from lanton_dist.engine.core import LocalPiece
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.engine.ownership import plan_ownership
from lanton_dist.engine.phases import announces
from lanton_dist.engine.zero import LogicalView, ShardedLANTON
from lanton_dist.factory import hyper_parameters, lanton_options, param_groups
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.integrations.megatron_model import MegatronParam, logical_param_specs


class TensorParallelExchange:
    """Whole hidden matrices from their TP shards (a :class:`~lanton_dist.engine.core.MatrixExchange`).

    Collective over ``tp_group``: every TP rank calls it with the same matrices in the same
    order (those its DP rank owns). Tensors are 1-D TP-local shards (``numel(shard)``) of
    ``dtype`` on ``device`` (the parameters'); every buffer handed to a collective — also an
    empty one, when a TP rank owns nothing in a call — is of that dtype and device (NCCL
    rejects CPU tensors).
    """

    def __init__(self, infos: dict[str, MegatronParam], coll: Collectives, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.infos = infos  # global name → MegatronParam
        self.coll = coll
        self.tp, self.rank = coll.world, coll.rank
        self.device, self.dtype = torch.device(device), dtype
        self._owner: dict[str, int] = {}

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, device=self.device, dtype=self.dtype)

    def owned(self, pieces: list[LocalPiece]) -> list[str]:
        """The matrices among ``pieces`` (every hidden piece of this DP rank) this TP rank owns:
        their FLOP-balanced plan over the TP group (as the planner's TP plan), fixed here for the
        ``gather``/``scatter`` calls that pass subsets of them (a matrix's owner, where its
        optimizer state lives, must not move when another matrix misses a step)."""
        names = [p.name for p in pieces]
        if not all(n in self._owner for n in names):
            self._owner = plan_ownership([self.infos[n].spec for n in names], self.tp, balance_numel=False).owner
        return [n for n in names if self._owner[n] == self.rank]

    def _owners(self, names: list[str]) -> dict[str, int]:
        missing = [n for n in names if n not in self._owner]
        if missing:
            raise RuntimeError(f"TensorParallelExchange: no owner planned for {missing[:3]}; call owned() with every "
                               "hidden piece first (ShardedCore does at every step)")
        return {n: self._owner[n] for n in names}

    def _shard_numel(self, name: str) -> int:
        return self.infos[name].spec.numel // self.tp

    @announces()
    def gather(self, pieces: list[LocalPiece], tensors: list[torch.Tensor], phase: str) -> dict[str, torch.Tensor]:
        names = [p.name for p in pieces]
        owner = self._owners(names)
        local = dict(zip(names, tensors))
        send = [torch.cat([local[n].reshape(-1) for n in names if owner[n] == d] or [self._empty()]) for d in range(self.tp)]
        mine = [n for n in names if owner[n] == self.rank]
        per_source = sum(self._shard_numel(n) for n in mine)
        inp = torch.cat(send)
        out = inp.new_empty(per_source * self.tp)
        self.coll.all_to_all(out, inp, [per_source] * self.tp, [s.numel() for s in send], phase).wait()
        result, chunks = {}, out.split(per_source) if per_source else [out] * self.tp
        offsets = [0] * self.tp
        for n in mine:
            info, k = self.infos[n], self._shard_numel(n)
            parts = []
            for s in range(self.tp):
                parts.append(chunks[s][offsets[s] : offsets[s] + k].view(info.local_shape))
                offsets[s] += k
            result[n] = torch.cat(parts, dim=info.partition_dim) if info.is_sharded else parts[0]
        return result

    @announces()
    def scatter(self, pieces: list[LocalPiece], owned: dict[str, torch.Tensor], phase: str) -> list[torch.Tensor]:
        names = [p.name for p in pieces]
        owner = self._owners(names)
        mine = [n for n in names if owner[n] == self.rank]
        send = []
        for d in range(self.tp):
            parts = [self._shard_of(owned[n], n, d).reshape(-1) for n in mine]
            send.append(torch.cat(parts) if parts else self._empty())
        inp = torch.cat(send)
        in_counts = [sum(self._shard_numel(n) for n in names if owner[n] == s) for s in range(self.tp)]
        out = inp.new_empty(sum(in_counts))
        self.coll.all_to_all(out, inp, in_counts, [s.numel() for s in send], phase).wait()
        chunks = out.split(in_counts)
        offsets = [0] * self.tp
        result = []
        for n in names:
            s, k = owner[n], self._shard_numel(n)
            result.append(chunks[s][offsets[s] : offsets[s] + k])
            offsets[s] += k
        return result

    def _shard_of(self, full: torch.Tensor, name: str, rank: int) -> torch.Tensor:
        info = self.infos[name]
        if not info.is_sharded:
            return full
        return full.chunk(self.tp, dim=info.partition_dim)[rank].contiguous()


def build_megatron_optimizer(model: nn.Module, cfg: RunConfig, *, meter: CommMeter | None = None) -> ShardedLANTON:
    """LANTON (or ``cfg.optim.name``) for one rank of a Megatron LLaMA run (TP × PP × DP).

    Needs Megatron's parallel state initialised. Gradients are reduced over the DP group by
    the engine (do not wrap the model in Megatron's DDP); ``step()`` reduces, updates and
    re-gathers the TP-local parameters.
    """
    from megatron.core import parallel_state as ps

    infos = logical_param_specs(model, cfg)
    tp_rank = ps.get_tensor_model_parallel_rank()
    meter = meter or CommMeter()
    local_specs, views = {}, {}
    for name, info in infos.items():
        local = ParamSpec(info.global_name, info.spec.geometry, info.local_shape, info.spec.role)
        local_specs[name] = local
        replicated = not info.is_sharded and info.tp_size > 1
        views[info.global_name] = LogicalView(
            info.spec, offset=(tp_rank * local.numel if info.is_sharded else 0),
            weight=0.0 if (replicated and tp_rank != 0) else 1.0,
        )
    groups = param_groups(model, cfg.optim, specs=local_specs, every_geometry=True)
    tp_coll = Collectives(meter, ps.get_tensor_model_parallel_group(), "tp")
    first = next(p for g in groups for p in g["params"])
    exchange = TensorParallelExchange({i.global_name: i for i in infos.values()}, tp_coll, device=first.device,
                                      dtype=first.dtype)
    return ShardedLANTON(
        groups, cfg.optim.name, process_group=ps.get_data_parallel_group(), scalar_world=True,
        bucket_mb=cfg.parallel.bucket_mb, overlap=cfg.parallel.overlap, meter=meter,
        logical=views, exchange=exchange, **lanton_options(cfg.optim), **hyper_parameters(cfg.optim),
    )


def describe_plan(opt: ShardedLANTON) -> dict[str, Any]:
    """Which matrices this rank's DP shard owns, for logs."""
    return {"dp_owned": [pc.name for pc in opt.pieces if pc.spec.geometry is Geometry.HIDDEN],
            "dp_imbalance": opt.plan.imbalance, "world": dist.get_world_size()}
