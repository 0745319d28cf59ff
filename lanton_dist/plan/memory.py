"""Per-rank memory of one training setup: parameters, gradients, communication buffers,
optimizer state and activations, and whether it fits the GPU.

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

Activations (:class:`ActivationSettings`, :func:`stage_activation_bytes`; an estimate, not
measured) follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022), for sequence length ``s``, micro-batch ``b``, hidden size ``h``, ``a`` heads,
tensor parallel ``t`` without sequence parallelism, 16-bit activations, per layer and micro-batch:

* without recomputation: ``s·b·h·(10 + 24/t)`` bytes, plus ``5·a·s²·b/t`` for the attention
  scores, softmax and its dropout mask when they are stored (``flash_attention=False``;
  ``s·b·h·(34 + 5·a·s/h)`` at ``t = 1``). The fused attention kernels (FlashAttention, which
  :func:`torch.nn.functional.scaled_dot_product_attention` runs on GPU) keep no ``s²`` term, the
  default here. The 34 counts the dropout masks of a GPT block and a 4h MLP: for our LLaMA
  (no dropout, SwiGLU) it is an upper bound;
* with full recomputation (``train.activation_checkpointing``: one checkpoint per block): the
  block input only, ``2·s·b·h`` bytes (not split over TP without sequence parallelism); the
  block being recomputed adds one layer's activations without recomputation at the backward's peak.

A pipeline stage ``i`` of ``p`` under 1F1B holds ``p − i`` micro-batches in flight of its
``L/p`` layers (the first stage: ``L`` layers' worth), and the last stage the fp32 logits of one
micro-batch for the loss, ``4·s·b·V/t`` bytes. ``activation_bytes`` scales the 16-bit figures
(4: fp32 activations, ×2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lanton_dist.config import ModelConfig
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


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationSettings:
    """What the activation estimate assumes (module doc): ``micro_batch`` sequences of
    ``seq_len`` tokens per forward, ``recompute`` (activation checkpointing of every block),
    ``flash_attention`` (no stored ``s²`` scores), ``activation_bytes`` per element (2 = bf16)."""

    seq_len: int
    micro_batch: int = 1
    recompute: bool = False
    flash_attention: bool = True
    activation_bytes: int = 2

    def __post_init__(self) -> None:
        for f in ("seq_len", "micro_batch"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be an integer >= 1, got {getattr(self, f)!r}")
        if self.activation_bytes not in (2, 4):
            raise ValueError(f"activation_bytes must be 2 or 4, got {self.activation_bytes}")


def layer_activation_bytes(m: ModelConfig, act: ActivationSettings, tp: int, recompute: bool) -> float:
    """Bytes one transformer layer keeps for the backward of one micro-batch on one TP rank (module doc)."""
    s, b, h, a = act.seq_len, act.micro_batch, m.dim, m.n_heads
    if recompute:
        sixteen_bit = 2 * s * b * h
    else:
        sixteen_bit = s * b * h * (10 + 24 / tp) + (0 if act.flash_attention else 5 * a * s * s * b / tp)
    return sixteen_bit * act.activation_bytes / 2


def stage_activation_bytes(m: ModelConfig, act: ActivationSettings, tp: int, pp: int) -> list[int]:
    """Peak activation bytes of one rank of each pipeline stage (1F1B; module doc)."""
    per_stage_layers = m.n_layers // pp
    out = []
    for i in range(pp):
        held = (pp - i) * per_stage_layers * layer_activation_bytes(m, act, tp, act.recompute)
        if act.recompute:  # the block being recomputed, at the backward's peak
            held += layer_activation_bytes(m, act, tp, recompute=False)
        if i == pp - 1:
            held += 4 * act.seq_len * act.micro_batch * m.vocab_size / tp
        out.append(int(held))
    return out


def stage_peaks(p: StepPlanner) -> list[int]:
    """The largest :attr:`RankMemory.peak` over the ranks of each pipeline stage of ``p`` (one
    representative per :attr:`~lanton_dist.plan.planner.StepPlanner.rank_classes` class: its
    members hold alike)."""
    peaks = [0] * p.layout.pp
    for (s, d, t), _ in p.rank_classes:
        peaks[s] = max(peaks[s], p.rank_memory(s, d, t).peak)
    return peaks


def fit_with_activations(p: StepPlanner, act: ActivationSettings) -> dict[str, object]:
    """Whether every rank of ``p`` holds its memory plus its stage's activations: ``total`` (the
    largest per-rank sum), ``activations`` (that stage's), ``stage``, ``gpu_bytes``, ``fits``."""
    acts = stage_activation_bytes(p.model, act, p.layout.tp, p.layout.pp)
    totals = [peak + a for peak, a in zip(stage_peaks(p), acts)]
    worst = max(range(len(totals)), key=lambda i: totals[i])
    return {"total": totals[worst], "activations": acts[worst], "stage": worst, "recompute": act.recompute,
            "gpu_bytes": p.hw.memory_bytes, "fits": totals[worst] <= p.hw.memory_bytes}
