"""What the planner predicts, per rank and step (:class:`Collective`, :class:`RankStep`), the
per-stage structure it predicts from (:class:`StagePlan`) and the registry of data-parallel
strategy models (:data:`STRATEGY_MODELS`, filled by :mod:`lanton_dist.plan.strategies`)."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lanton_dist.engine.layout import Layout
from lanton_dist.engine.meter import sent_bytes
from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.groups import Geometry, ParamSpec

if TYPE_CHECKING:
    from lanton_dist.plan.planner import StepPlanner


@dataclass(frozen=True)
class Collective:
    """One predicted collective on one rank; ``sent_bytes``/``tensor_bytes`` as the meter's
    :class:`~lanton_dist.engine.meter.CommRecord` (integers). ``self_numel``: elements this rank
    does not send (all-to-all, reduce, broadcast; the meter's rule)."""

    op: str
    phase: str
    group: str
    group_size: int
    numel: int
    elem_size: int
    self_numel: int = 0

    @property
    def tensor_bytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def sent_bytes(self) -> int:
        return sent_bytes(self.op, self.numel, self.elem_size, self.group_size, self.self_numel)

    def key(self) -> tuple[str, str, int, int, int, int, int]:
        """The fields a meter record is compared on (group names are roles here, not names)."""
        return (self.op, self.phase, self.group_size, self.numel, self.elem_size, self.tensor_bytes, self.sent_bytes)

    def latency_steps(self) -> int:
        """Latency-bound hops: ``W−1`` for ring reduce-scatter/all-gather/all-to-all; for
        all-reduce the smaller of the ring's ``2(W−1)`` and a tree's ``2⌈log₂W⌉`` (NCCL picks
        trees for small messages such as the scalar phases)."""
        w = self.group_size
        if w == 1:
            return 0
        if self.op == "all_reduce":
            return min(2 * (w - 1), 2 * math.ceil(math.log2(w)))
        return w - 1


@dataclass
class RankStep:
    """Everything one rank does in one step: ``collectives`` (issue order), NS FLOPs of the LMO
    (``ns_flops``), estimator FLOPs (``estimator_flops``), elements updated per geometry."""

    stage: int
    dp_rank: int
    tp_rank: int
    step: int
    collectives: list[Collective]
    ns_flops: int
    estimator_flops: int
    owned: dict[str, int]

    def bytes_by_phase(self, key: str = "sent_bytes") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for c in self.collectives:
            out[c.phase] += getattr(c, key)
        return dict(out)


@dataclass
class StagePlan:
    """One pipeline stage: full specs, TP-local specs, the ownership and DP layout."""

    index: int
    specs: list[ParamSpec]
    local: list[ParamSpec]
    ownership: OwnershipPlan          # over the NS ranks (dp·tp in owner mode, dp otherwise)
    dp_plan: OwnershipPlan            # the DP owner of each hidden matrix (what the layout uses)
    layout: Layout | None             # engine layout (zero1/2/3); None otherwise
    ns_ranks: int                     # ranks the NS work is split over (per stage)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)   # derived figures (layout-only)

    def memo(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    @cached_property
    def hidden(self) -> list[ParamSpec]:
        return [s for s in self.specs if s.geometry is Geometry.HIDDEN]


@dataclass(frozen=True)
class StrategyModel:
    """How one data-parallel strategy moves data. ``validated_by`` names what its predictions
    were checked against (None: a model only). Register more with :func:`register_strategy`.

    ``rank_class(planner, stage, dp_rank, tp_rank)`` (optional): a key such that ranks of a stage
    with equal keys issue the same multiset of collectives at every step; the planner then
    predicts one rank per class (with its own per-rank figures — NS work, TP exchange, owned
    elements — added to the key), so a summary costs the number of classes, not of ranks.
    ``None``: every rank is its own class."""

    name: str
    collectives: Callable[["StepPlanner", StagePlan, int, int, int], list[Collective]]
    owned: Callable[["StepPlanner", StagePlan, int, int], dict[str, int]]
    validated_by: str | None = None
    description: str = ""
    rank_class: Callable[["StepPlanner", StagePlan, int, int], Hashable] | None = None


STRATEGY_MODELS: dict[str, StrategyModel] = {}


def register_strategy(model: StrategyModel) -> StrategyModel:
    """Add (or replace) a strategy model, e.g. one for an adapter in ``lanton_dist.integrations``.

    A model is two functions of ``(planner, stage, dp_rank, tp_rank[, step])``: the collectives
    one rank issues at a step (:class:`Collective`, in issue order; step 0 = construction) and the
    elements it updates per geometry. An adapter built on
    :class:`~lanton_dist.engine.optimizer.PieceOptimizer` (a DeepSpeed one, say) needs only
    its framework's own collectives plus :func:`~lanton_dist.plan.strategies.piece_exchange_collectives`;
    validate it as ``tests/test_plan.py`` does FSDP2 (meter records vs predictions per step)."""
    STRATEGY_MODELS[model.name] = model
    return model

