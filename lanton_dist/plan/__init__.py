"""Analytic model of one optimizer step of LANTON, Scion, D-Muon and AdamW on LLaMA models.

For a model (a preset, a ``configs/*.yaml`` model section or custom dims) and a parallel
layout (nodes × GPUs per node, tensor parallel ``tp``, pipeline parallel ``pp``, data
parallel ``dp = world / (tp·pp)``, and a data-parallel *strategy*), :class:`StepPlanner`
predicts, per rank and per step:

* every collective the step issues — op, phase, group, element count and the bytes this rank
  sends (:class:`Collective`, the planner's twin of :class:`~lanton_dist.engine.meter.CommRecord`,
  using the meter's own :func:`~lanton_dist.engine.meter.sent_bytes`);
* Newton–Schulz FLOPs (the LMO of the hidden matrices this rank owns) and, on estimation
  steps, the nuclear-norm estimator's FLOPs;
* per-rank memory — parameters, gradients, communication buffers, optimizer state — and whether
  it fits the GPU (:mod:`.memory`; equal to what the ZeRO engine holds);
* the engine layout's padding, and the NS imbalance with whole matrices and with large matrices'
  Newton–Schulz split over teams of ranks (:mod:`lanton_dist.engine.split_plan`, the rule
  :mod:`lanton_dist.engine.splitns` runs) at ``OptimSettings.ns_split_tolerance``;
* the time these imply on given hardware (:class:`Hardware`).

The plan is *not* re-implemented: owners come from
:func:`lanton_dist.engine.ownership.plan_ownership` and the bucket layout (chunks, padding)
from :func:`lanton_dist.engine.layout.build_layout`, called with exactly the arguments the
engine uses. The model's parameters come from :func:`llama_specs`, which reproduces
:func:`lanton_dist.groups.classify_parameters` of :class:`lanton_dist.model.Transformer`
(names, order, shapes, geometry) without building the model (a 70B model need not fit).

Modules (one concern each; all torch-free, so ``lanton-dist plan`` starts in a fraction of a second):

* :mod:`.inputs`      — :data:`PRESETS`, :class:`Hardware` / :data:`HARDWARE`, :class:`ParallelLayout`,
  :class:`OptimSettings`.
* :mod:`.model`       — :func:`resolve_model`, :func:`llama_specs`, Megatron's TP/PP cuts of the list.
* :mod:`.predictions` — :class:`Collective`, :class:`RankStep`, :class:`StagePlan` and the
  :data:`STRATEGY_MODELS` registry (:func:`register_strategy`).
* :mod:`.strategies`  — the data-parallel strategy models (``zero1/2/3``, ``fsdp2``, ``deepspeed``,
  ``deepspeed3``, ``ddp``) and what each was validated against.
* :mod:`.planner`     — :class:`StepPlanner`: tensor/pipeline parallelism, the time model and the
  estimation overhead.
* :mod:`.memory`      — :class:`RankMemory` and :func:`rank_memory`, per strategy.
* :mod:`.splitns`     — :func:`split_collectives`: the collectives of split Newton–Schulz (its rule,
  :func:`plan_split` / :class:`SplitPlan`, is the engine's :mod:`lanton_dist.engine.split_plan`).
* :mod:`.report`      — :func:`plan_table` and :func:`estimation_growth`, the ``lanton-dist plan`` text.

Option names (algorithms, estimators, options) come from :mod:`lanton_dist.names`, the scalar
phases from :data:`lanton_dist.engine.meter.SCALAR_PHASES`, piece layouts from
:mod:`lanton_dist.engine.ranges`.
"""
from __future__ import annotations

from lanton_dist.plan.inputs import HARDWARE, PRESETS, TP_MODES, Hardware, OptimSettings, ParallelLayout
from lanton_dist.plan.memory import RankMemory, rank_memory
from lanton_dist.plan.model import check_tp, engine_order, llama_specs, local_spec, resolve_model, stage_specs, tp_split_dim
from lanton_dist.plan.planner import (ELEMENTWISE_ACCESSES, STATE_TENSORS, StepPlanner, block_estimator_flops, estimator_flops,
                                      estimator_seconds)
from lanton_dist.plan.predictions import STRATEGY_MODELS, Collective, RankStep, StagePlan, StrategyModel, register_strategy
from lanton_dist.plan.report import estimation_growth, human_bytes, plan_table
from lanton_dist.plan.splitns import SplitPlan, plan_split, split_collectives
from lanton_dist.plan.strategies import (ddp_buckets, deepspeed_ranges, engine_collectives, exchange_buckets,
                                         piece_exchange_collectives)

__all__ = [
    "PRESETS", "HARDWARE", "TP_MODES", "Hardware", "ParallelLayout", "OptimSettings",
    "resolve_model", "llama_specs", "tp_split_dim", "check_tp", "local_spec", "engine_order", "stage_specs",
    "Collective", "RankStep", "StagePlan", "StrategyModel", "STRATEGY_MODELS", "register_strategy",
    "engine_collectives", "ddp_buckets", "exchange_buckets", "piece_exchange_collectives", "deepspeed_ranges",
    "StepPlanner", "ELEMENTWISE_ACCESSES", "STATE_TENSORS", "estimator_flops", "estimator_seconds", "block_estimator_flops",
    "plan_table", "estimation_growth", "human_bytes",
    "RankMemory", "rank_memory", "SplitPlan", "plan_split", "split_collectives",
]
