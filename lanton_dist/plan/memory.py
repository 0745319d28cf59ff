"""Per-rank memory of one training setup: parameters, gradients, communication buffers and
optimizer state (activations apart), and whether it fits the GPU.

``zero1`` / ``zero2`` — what :class:`~lanton_dist.engine.ShardedLANTON` holds, checked byte for
byte against a built engine on CPU at world 2 and 3 (``tests/test_plan_memory.py``):

* parameters: the parameter bucket buffer (the padded layout; the model's parameters are views
  of it, every DP rank keeps a replica) plus own copies of the parameters the layout cannot hold
  contiguously (:meth:`~lanton_dist.engine.layout.Layout.flat_spans` is None);
* gradients: the gradient bucket buffer (``p.grad`` are views of it) plus those parameters'
  own ``p.grad``, alive from backward until ``step()`` frees them;
* buffers: none — the reductions and gathers run in place in the bucket buffers;
  Option II estimation steps add the stashed half-batch gradient, one padded buffer
  (``buffers_peak_extra``);
* state: :data:`~lanton_dist.plan.planner.STATE_TENSORS` per owned element, plus the core's
  replicated per-layer trackers ``H`` and ``F`` (``2L`` accumulation scalars);
  ``state_peak_extra``: Option I's previous gradient of the owned elements (held on the step
  before each estimation); ``early_peak_extra``: the momentum copies and directions of the owned
  matrices whose owner step starts during backward (:mod:`lanton_dist.engine.core`, with hook-launched
  reductions; at most every owned matrix, held from backward to ``step()``).

Other strategies are modelled from their documented behaviour, not measured: ``zero3`` keeps
parameters and gradients sharded (the rank's chunks) with the same bucket buffers; ``ddp`` holds
parameters, gradients, DDP's gradient buckets (one more model-size copy) and the full state;
``fsdp2`` holds dim-0 shards of parameters and gradients plus, at peak, the largest unit
unsharded (all-gather and reduce-scatter buffers, padded); ``deepspeed`` (ZeRO-1/2) the whole
model in ``param_bytes`` plus fp32 master and gradient partitions, ``deepspeed3`` only
partitions plus the largest parameter gathered. Their optimizer state is that of the elements
they keep state for (:meth:`StrategyModel.owned`): their pieces of elementwise state and, under a
Newton–Schulz algorithm, the hidden matrices they own, whole (the owner holds their momentum and
Option I's previous gradient; :mod:`lanton_dist.engine.core`). Parameters and gradients are
their pieces (:func:`~lanton_dist.plan.strategies.piece_elements`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.plan.predictions import StagePlan
from lanton_dist.plan.strategies import piece_elements

if TYPE_CHECKING:
    from lanton_dist.plan.planner import StepPlanner


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds (module doc); ``peak`` adds the transient extras to ``steady``."""

    parameters: int
    gradients: int
    buffers: int
    state: int
    buffers_peak_extra: int = 0
    state_peak_extra: int = 0
    early_peak_extra: int = 0

    @property
    def steady(self) -> int:
        return self.parameters + self.gradients + self.buffers + self.state

    @property
    def peak_extra(self) -> int:
        """The transient extras held at once: the early owner steps' momentum copies are never
        held on an Option II estimation step (the one with the stashed half buffer)."""
        return max(self.buffers_peak_extra, self.early_peak_extra) + self.state_peak_extra

    @property
    def peak(self) -> int:
        return self.steady + self.peak_extra


def _numel(specs: list[ParamSpec]) -> int:
    return sum(s.numel for s in specs)


def rank_memory(p: StepPlanner, st: StagePlan, d: int, t: int) -> RankMemory:
    """Memory of DP rank ``d``, TP rank ``t`` of stage ``st`` under ``p``'s strategy (module doc)."""
    E, o, L = p.optim.param_bytes, p.optim, p.layout
    owned = p.strategy.owned(p, st, d, t)
    state, state_extra = p.state_bytes(owned, st)
    local = _numel(st.local)
    if L.strategy in ("zero1", "zero2", "zero3"):
        lay = st.layout
        padded = lay.padded_numel
        if L.strategy == "zero3":
            shard = lay.held(d)
            half = (padded + shard) * E if (o.algorithm == "lanton" and o.option == "II") else 0
            return RankMemory(shard * E, shard * E, 2 * padded * E + shard * E, state, half, state_extra)
        option_two = o.algorithm == "lanton" and o.option == "II"
        numel = {s.name: s.numel for s in st.local}
        copied = sum(numel[n] for n, span in lay.flat_spans().items() if span is None)
        early = 2 * owned.get(Geometry.HIDDEN.value, 0) * E if o.uses_ns else 0   # momentum copy + direction
        return RankMemory((padded + copied) * E, (padded + copied) * E, 0, state,
                          padded * E if option_two else 0, 0 if option_two else state_extra, early)
    if L.strategy == "ddp":
        return RankMemory(local * E, local * E, local * E, state, 0, state_extra)
    if L.strategy == "fsdp2":
        shard = piece_elements(p, st, d)
        W = L.dp
        units: dict[str, int] = {}
        for s in st.local:
            key = ".".join(s.name.split(".")[:2]) if s.name.startswith("layers.") else "root"
            units[key] = units.get(key, 0) + math.ceil(s.shape[0] / W) * W * (s.numel // s.shape[0])
        return RankMemory(shard * E, shard * E, 2 * max(units.values()) * E, state, 0, state_extra)
    shard = piece_elements(p, st, d)
    if L.strategy == "deepspeed3":
        return RankMemory(shard * E, shard * 4, max(s.numel for s in st.local) * E, state, 0, state_extra)
    return RankMemory(local * E + shard * 4, shard * 4, local * E, state, 0, state_extra)
