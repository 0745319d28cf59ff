"""Split Newton–Schulz in the ZeRO engine: the largest matrices' NS runs over a team of ranks.

The algorithm and the plan are :mod:`lanton_dist.engine.split_plan`'s (one owner of the rule,
torch-free, which the planner imports too): :func:`~lanton_dist.engine.split_plan.plan_split`
over the engine's ownership plan picks the matrices and their teams,
:func:`~lanton_dist.engine.split_plan.split_batches` the order and batching,
:class:`~lanton_dist.engine.split_plan.SplitBatch` each member's columns and rows.
:class:`SplitNewtonSchulz` executes it as the core's polar function
(:class:`~lanton_dist.engine.core.ShardedCore` ``polar=``): called on every rank at every
stepped step with this rank's live whole hidden matrices, it runs every split batch whose
team holds this rank — owner sends column blocks (``ns_split_scatter``), members iterate
(:func:`~lanton_dist.newton_schulz.newton_schulz_columns`: ``ns_gram``, ``ns_gram_gather``),
blocks come back (``ns_split_gather``), the owner applies the LMO scale — then this rank's
unsplit matrices as :func:`lanton_dist.lmo.hidden_directions` does.

Liveness: the team's collectives never depend on the step's data. A split matrix nobody had a
gradient for (skipped job-wide by the core, so absent from the owner's call) still runs, on
zeros the owner sends, and its result is dropped: no agreement beyond the core's is needed,
and the wasted work only concerns matrices that never get gradients. A skipped step (non-finite
gradient) calls nothing, on every rank alike.

Process groups: every rank creates every team's group (all ranks of the team; and the
iterating members' when the owner has no columns), in plan order, at construction — so the
engine's process group must be the whole world. Tensors sent are in the NS compute dtype (the
reference rounds to it before its first product), on the parameters' device; sizes come
from the plan, so there is no host read in the step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lanton_dist import lmo as lmo_mod
from lanton_dist.engine.meter import Collectives
from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.engine.split_plan import SplitBatch, SplitPlan, check_tolerance, plan_split, split_batches
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.lmo import LMOConfig
from lanton_dist.newton_schulz import default_ns_dtype, newton_schulz_columns


class SplitNewtonSchulz:
    """The core's polar function with the plan's matrices split over teams (module doc).

    Args:
        specs: every parameter of the model (local = logical: the ZeRO engine without TP views).
        ownership: the engine's whole-matrix ownership plan over ``coll``'s ranks.
        tolerance: per-rank NS target ``(1 + tolerance)·mean`` (:func:`plan_split`).
        ns_steps: the LMO's quintic steps (the plan's cost model).
        coll: the engine's data-parallel collectives (its meter records the split phases);
            its group must be the whole world.
        device, dtype: the parameters' (buffers and the default NS dtype).
    """

    def __init__(self, specs: list[ParamSpec], ownership: OwnershipPlan, tolerance: float, ns_steps: int,
                 coll: Collectives, device: torch.device, dtype: torch.dtype) -> None:
        if coll.world > 1 and coll.world != dist.get_world_size():
            raise ValueError("ns_split_tolerance needs the engine's process group to be the whole world "
                             f"(it is {coll.world} of {dist.get_world_size()} ranks): every rank creates every team's group")
        hidden = [s for s in specs if s.geometry is Geometry.HIDDEN]
        self.plan: SplitPlan = plan_split(hidden, ownership, ns_steps, tolerance=check_tolerance(tolerance))
        self.batches: list[SplitBatch] = split_batches(self.plan, hidden)
        self.specs = {s.name: s for s in hidden}
        self.rank = coll.rank
        self._like = torch.empty(0, device=device, dtype=dtype)
        self._groups: dict[tuple[int, ...], Collectives | None] = {}  # None: a team without this rank
        for batch in self.batches:  # every rank, same order
            for ranks in (batch.ranks, batch.iterating):
                if len(ranks) > 1 and ranks not in self._groups:
                    group = dist.new_group(list(ranks))
                    self._groups[ranks] = Collectives(coll.meter, group, batch.group) if self.rank in ranks else None

    def __call__(self, specs: list[ParamSpec], mats: list[torch.Tensor], cfg: LMOConfig) -> list[torch.Tensor]:
        """−s·polar of each of this rank's live whole ``mats`` (storage layout), the split ones
        with their teams; runs every split batch this rank is in (collectively, every step)."""
        index = {s.name: i for i, s in enumerate(specs)}
        out: list[torch.Tensor | None] = [None] * len(specs)
        for batch in self.batches:
            if self.rank not in batch.ranks:
                continue
            directions = self._run(batch, [mats[index[n]] if n in index else None for n in batch.names], cfg)
            for name, d in zip(batch.names, directions):
                if name in index:
                    out[index[name]] = d
        whole = [i for i, s in enumerate(specs) if s.name not in self.plan.teams]
        for i, d in zip(whole, lmo_mod.hidden_directions([specs[i] for i in whole], [mats[i] for i in whole], cfg)):
            out[i] = d
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ one batch
    def _run(self, batch: SplitBatch, mats: list[torch.Tensor | None], cfg: LMOConfig) -> list[torch.Tensor | None]:
        """One batch on this rank. The owner returns the directions of its ``mats`` (``None``
        where a matrix is not live: zeros were sent, the result is dropped); teammates ``[]``."""
        me, b, m = self.rank, len(batch.names), batch.m
        ns_dtype = cfg.ns_dtype or default_ns_dtype(self._like)
        team = self._groups[batch.ranks]
        blocks = [(q, batch.columns(q)) for q in batch.ranks]  # group rank order = ascending rank
        c0, c1 = batch.columns(me)
        specs = [self.specs[name] for name in batch.names]
        none = [0] * len(blocks)
        empty = self._like.new_empty(0, dtype=ns_dtype)
        if me == batch.owner:
            W = torch.stack([self._wide(s, x, ns_dtype) for s, x in zip(specs, mats)])
            others = [0 if q == me else b * m * (z - a) for q, (a, z) in blocks]
            send = torch.cat([W[..., a:z].reshape(-1) for q, (a, z) in blocks if q != me])
            team.all_to_all(empty, send, none, others, "ns_split_scatter").wait()
            mine = self._iterate(batch, W[..., c0:c1], cfg, ns_dtype) if c1 > c0 else W[..., c0:c1]
            received = empty.new_empty(sum(others))
            team.all_to_all(received, empty, others, none, "ns_split_gather").wait()
            parts = iter(received.split([k for k in others if k]))
            P = torch.cat([mine if q == me else next(parts).view(b, m, z - a) for q, (a, z) in blocks], dim=-1)
            return [None if x is None else self._direction(s, P[j], x, cfg) for j, (s, x) in enumerate(zip(specs, mats))]
        to_owner = [b * m * (c1 - c0) if q == batch.owner else 0 for q in batch.ranks]
        block = empty.new_empty(b, m, c1 - c0)
        team.all_to_all(block.view(-1), empty, to_owner, none, "ns_split_scatter").wait()
        if c1 > c0:
            block = self._iterate(batch, block, cfg, ns_dtype)
        team.all_to_all(empty, block.reshape(-1), none, to_owner, "ns_split_gather").wait()
        return []

    def _iterate(self, batch: SplitBatch, block: torch.Tensor, cfg: LMOConfig, ns_dtype: torch.dtype) -> torch.Tensor:
        """This member's ``(b, m, k)`` columns of the batch's polar factors (NS options of ``cfg``)."""
        m, members = batch.m, batch.iterating
        gram = self._groups.get(members)
        if gram is None:  # the team's only member with columns holds whole matrices: no collective
            return newton_schulz_columns(block, (0, m), _no_sum, _identity, cfg.ns_steps, 0, ns_dtype, **cfg.ns_options())
        row_counts = [batch.rows(q)[1] - batch.rows(q)[0] for q in members]

        def gram_sum(A: torch.Tensor) -> None:
            gram.all_reduce(A, "ns_gram").wait()

        def gather_rows(R: torch.Tensor) -> torch.Tensor:
            # rows first, (r, b, m): the members' parts concatenate into (m, b, m)
            mine = R.transpose(0, 1).reshape(1, -1)
            out = R.new_empty(m * R.size(0) * m)
            gram.all_to_all(out, mine.expand(len(members), -1).reshape(-1), [k * R.size(0) * m for k in row_counts],
                            [mine.numel()] * len(members), "ns_gram_gather").wait()
            return out.view(m, R.size(0), m).transpose(0, 1)

        return newton_schulz_columns(block, batch.rows(self.rank), gram_sum, gather_rows, cfg.ns_steps, 0, ns_dtype,
                                     **cfg.ns_options())

    # ------------------------------------------------------------------ orientation and scale
    def _wide(self, spec: ParamSpec, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The logical matrix of ``x`` (storage layout; ``None``: zeros) in its wide orientation, in ``dtype``."""
        d_out, d_in = spec.logical_shape
        if x is None:
            X = self._like.new_zeros(d_out, d_in, dtype=dtype)
        else:
            X = spec.blocks[0].gather(spec.logical(x)).to(dtype)
        return X.mT if d_out > d_in else X

    @staticmethod
    def _direction(spec: ParamSpec, P: torch.Tensor, x: torch.Tensor, cfg: LMOConfig) -> torch.Tensor:
        """−s·polar in ``x``'s storage layout and dtype from the wide-orientation polar factor ``P``
        (back to the logical orientation :meth:`_wide` left; scaled and placed as
        :func:`lanton_dist.lmo.hidden_directions` does). ``P`` may be scaled in place."""
        d_out, d_in = spec.logical_shape
        out = torch.empty_like(x)
        lmo_mod.scatter_block_direction(spec, spec.blocks[0], (P.mT if d_out > d_in else P).to(x.dtype), out, cfg.scale_mode)
        return out


def _no_sum(A: torch.Tensor) -> None:
    """The Gram sum of a team of one: nothing to add."""


def _identity(R: torch.Tensor) -> torch.Tensor:
    """The row gather of a team of one: its rows are all rows."""
    return R
