"""The planner's model of split Newton–Schulz: the collectives each rank issues for it
(:func:`split_collectives`, what the engine's meter records). The rule itself — which matrices
are split over which teams, and each member's columns and rows — is the engine's
(:mod:`lanton_dist.engine.split_plan`: :func:`plan_split`, :func:`split_batches`,
:class:`SplitPlan`, :class:`SplitBatch`), re-exported here; its module doc has the design.
"""
from __future__ import annotations

from lanton_dist.engine.split_plan import SPLIT_TOLERANCE, SplitBatch, SplitPlan, plan_split, split_batches
from lanton_dist.groups import ParamSpec
from lanton_dist.plan.predictions import Collective

__all__ = ["SPLIT_TOLERANCE", "SplitBatch", "SplitPlan", "plan_split", "split_batches", "split_collectives",
           "batch_collectives"]


def split_collectives(plan: SplitPlan, hidden: list[ParamSpec], rank: int, ns_steps: int, elem: int) -> list[Collective]:
    """What NS rank ``rank`` issues per step for the split matrices, in order (the engine's meter
    records exactly these): :func:`batch_collectives` of every :func:`split_batches` entry whose
    team it is in. ``elem``: bytes per element of the NS compute dtype (the engine sends in it)."""
    return [c for batch in split_batches(plan, hidden) if rank in batch.ranks
            for c in batch_collectives(batch, rank, ns_steps, elem)]


def batch_collectives(batch: SplitBatch, rank: int, ns_steps: int, elem: int) -> list[Collective]:
    """What team member ``rank`` issues for one batch of ``b`` matrices: the ``ns_split_scatter``
    all-to-all (the owner sends the teammates' blocks, ``b·m·(n − k_owner)`` elements; the others
    send nothing), then if it has columns and the team more than one such member, ``ns_steps`` ×
    (``ns_gram`` all-reduce of the ``b·m²`` Gram matrices; ``ns_gram_gather`` all-to-all sending
    its ``b·r·m`` polynomial rows to each of the ``c`` iterating members, itself included), then
    ``ns_split_gather`` (its ``b·m·k`` block back to the owner; the owner sends nothing)."""
    b, m, T = len(batch.names), batch.m, len(batch.members)
    c0, c1 = batch.columns(rank)
    owner = rank == batch.owner
    out = [Collective("all_to_all", "ns_split_scatter", batch.group, T, b * m * (batch.n - (c1 - c0)) if owner else 0, elem)]
    c = len(batch.iterating)
    if c1 > c0 and c > 1:
        r0, r1 = batch.rows(rank)
        out += [Collective("all_reduce", "ns_gram", batch.group, c, b * m * m, elem),
                Collective("all_to_all", "ns_gram_gather", batch.group, c, c * b * (r1 - r0) * m, elem,
                           b * (r1 - r0) * m)] * ns_steps
    out.append(Collective("all_to_all", "ns_split_gather", batch.group, T, 0 if owner else b * m * (c1 - c0), elem))
    return out
