"""LANTON (and Scion, D-Muon, AdamW) as the client optimizer of DeepSpeed ZeRO stages 1, 2 and 3.

DeepSpeed keeps fp32 master partitions and hands its *base* optimizer flat tensors instead of
the model's parameters:

* ZeRO-1/2: one flat buffer per param group, parameters laid end to end (``round_robin``
  order, alignment padding) and cut into W equal partitions — partitions cut across
  parameters;
* ZeRO-3: each parameter is cut into W padded partitions of ``partition_numel()`` elements;
  a rank's flat sub-group tensor is its partitions of the sub-group's parameters, end to end.

:meth:`LANTONDeepSpeed.attach` reads those layouts from the ZeRO optimizer and maps every
rank's flat ranges to per-parameter pieces (:func:`~lanton_dist.engine.ranges.flat_partition_ranges`,
:func:`~lanton_dist.engine.ranges.padded_partition_ranges`); the pieces are views of DeepSpeed's fp32 master
partition and of the gradient partition it hands over. :class:`~lanton_dist.engine.exchange.AllToAllExchange`
assembles whole matrices only on their owners, only for Newton–Schulz and the nuclear
norm; everything else is elementwise or a scalar all-reduce, and per-layer H, α and rates
are those of the whole model.

Hook point: DeepSpeed calls the base optimizer's ``step`` once per param group (ZeRO-1/2)
or sub-group (ZeRO-3), each time showing only that group's flat partition, and copies the
fp32 partition to the low-precision model copy right after each call. LANTON is one step
over the whole model (the group-wide max α couples the groups), so the adapter records
each call's gradient partition, runs the core at the last one, then refreshes the
low-precision partitions of the earlier groups itself — before DeepSpeed's all-gather
(ZeRO-1/2) or the next forward's parameter gather (ZeRO-3) reads them. (DeepSpeed's own
ZeRO Muon in ``runtime/zero/muon`` instead orthogonalises inside the gradient-partitioning
hooks, all-reducing matrices that straddle partitions to every partial owner and running the
same Newton–Schulz on each of them.)

Supported (tested on CPU gloo, ``DS_ACCELERATOR=cpu``): ZeRO stages 1, 2, 3; fp32 and bf16
(``bf16.enabled``; the master partitions the optimizer sees stay fp32); gradient
accumulation; gradient clipping (``OptimConfig.clip_grad_norm``, applied by the core to the
gradient partitions: :func:`initialize` maps a config's ``gradient_clipping`` onto it and turns
DeepSpeed's own off); optimizer CPU offload for stages 1/2/3 (``offload_optimizer.device=cpu`` with
``zero_force_ds_cpu_optimizer: false``); ``engine.save_checkpoint`` / ``load_checkpoint``
(same world size and layout). Refused with an error: models built under
``deepspeed.zero.Init`` (parameters already look 1-D, DeepSpeed issue #8438 — LANTON would
otherwise classify every matrix as a vector and silently skip Newton–Schulz), NVMe
offload, partial offload, MoE groups, ZenFlow, torch-autocast grad scaling, elastic
checkpoints, model/pipeline parallelism, any wrapper other than the ZeRO optimizers
(ZeRO stage 0, FP16/BF16_Optimizer), Option II (DeepSpeed accumulates micro-batch
gradients internally, so the two half-batch gradients never reach the optimizer separately).

Parameters without a gradient: DeepSpeed zero-fills them in its flat partitions, so the
adapter records presence itself (a post-accumulate-grad hook per parameter, OR-ed over the
micro-batches of an optimizer step) and the core skips a parameter no rank had a gradient
for. DeepSpeed ZeRO itself needs every rank to produce gradients for the same parameters: its
bucketed reductions follow each rank's autograd hooks, and rank-dependent use mismatches its
collectives (the job dies; checked on every stage on CPU gloo). A branch that only some ranks
use must run with weight 0 on the others — the DDP convention's result (reduced with zeros).

fp64 is not possible: DeepSpeed's master partitions are fp32 whatever the model dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lanton_dist.engine.core import LocalPiece
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.engine.ownership import plan_ownership
from lanton_dist.engine.optimizer import PieceOptimizer
from lanton_dist.engine.ranges import flat_partition_ranges, padded_partition_ranges


class _Flat:
    """One flat fp32 partition DeepSpeed steps: the tensor and, per parameter, (spec index,
    offset of this rank's piece inside the flat)."""

    def __init__(self, tensor: torch.Tensor, members: list[tuple[int, int]]) -> None:
        self.tensor, self.members = tensor, members


class LANTONDeepSpeed(PieceOptimizer):
    """Client optimizer for ``deepspeed.initialize`` (see module doc); prefer :func:`initialize`.

    Args:
        model: the model DeepSpeed will wrap, built normally (not under ``zero.Init``).
        cfg: :class:`~lanton_dist.config.OptimConfig`; ``cfg.name`` picks the algorithm.
        meter, bucket_mb, pad, window, overlap, defer_variance, groups: as for
            :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2`.

    The process group is DeepSpeed's data-parallel group, taken at :meth:`attach`.
    """

    def __init__(self, model: nn.Module, cfg, *, meter: CommMeter | None = None, bucket_mb: float = 25.0,
                 pad: bool = False, window: int = 2, overlap: bool = True, defer_variance: bool = True,
                 groups: list[dict[str, Any]] | None = None) -> None:
        from lanton_dist.factory import check_not_zero_init, hyper_parameters, lanton_options, param_groups

        check_not_zero_init(model.named_parameters())  # DeepSpeed issue #8438: matrices would look 1-D
        if cfg.name == "lanton" and cfg.option == "II":
            raise ValueError("Option II needs the two half-batch gradients separately; DeepSpeed accumulates "
                             "micro-batch gradients internally. Use option='I' with DeepSpeed.")
        groups = groups if groups is not None else param_groups(model, cfg)
        super().__init__(groups, cfg.name, process_group=None, meter=meter, bucket_mb=bucket_mb, pad=pad,
                         window=window, overlap=overlap, defer_variance=defer_variance, **lanton_options(cfg),
                         **hyper_parameters(cfg))
        self._ns_steps = cfg.ns_steps
        self._index = {id(p): k for k, p in enumerate(p for g in self._groups for p in g["params"])}
        self._flats: list[_Flat] = []
        self._grads: dict[int, torch.Tensor] = {}
        # DeepSpeed zero-fills absent gradients in its flat buffers: presence is recorded here,
        # per parameter, as autograd accumulates into it (all micro-batches of the step).
        self._seen: set[int] = set()
        self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._mark, k))
                       for g in self._groups for p in g["params"] for k in [self._index[id(p)]]]
        self._zopt = None
        self._resync: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ attach
    def attach(self, engine) -> "LANTONDeepSpeed":
        """Read the ZeRO partition layout of ``engine`` (returned by ``deepspeed.initialize`` with
        this optimizer) and build the exchange over its data-parallel group."""
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        zopt = engine.optimizer
        if isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
            stage = 3
        elif isinstance(zopt, DeepSpeedZeroOptimizer):
            stage = engine.zero_optimization_stage()
        else:
            raise ValueError(f"DeepSpeed wrapped the optimizer in {type(zopt).__name__}; LANTONDeepSpeed supports the "
                             "ZeRO optimizers only (zero_optimization.stage 1, 2 or 3)")
        if zopt.optimizer is not self:
            raise ValueError("engine.optimizer does not wrap this LANTONDeepSpeed instance")
        if getattr(engine, "mpu", None) is not None or getattr(engine, "pipeline_parallelism", False):
            raise ValueError("model/pipeline parallel DeepSpeed engines are not supported by LANTONDeepSpeed")
        for attr, what in (("zenflow", "ZenFlow"), ("torch_autocast_gradscaler", "torch autocast grad scaling"),
                           ("elastic_checkpoint", "elastic checkpoints"), ("swap_optimizer", "NVMe optimizer offload")):
            if getattr(zopt, attr, None):
                raise ValueError(f"{what} is not supported by LANTONDeepSpeed")
        if getattr(zopt, "has_moe_layers", False):
            raise ValueError("MoE parameter groups are not supported by LANTONDeepSpeed")
        group = zopt.dp_process_group
        self.coll = Collectives(self.meter, group, "dp")
        self.world, self.rank = self.coll.world, self.coll.rank
        self.plan = plan_ownership(self.specs, self.world, self._ns_steps)
        ranges: dict[str, tuple] = {}
        flats: list[_Flat] = []
        if stage == 3:
            if getattr(zopt, "partial_offload", 1.0) not in (0.0, 1.0):
                raise ValueError("partial optimizer offload is not supported by LANTONDeepSpeed")
            for i, params in enumerate(zopt.fp16_groups):
                if zopt.fp16_partitioned_groups_flat[i] is None:
                    raise ValueError("swapped (NVMe) ZeRO-3 partitions are not supported by LANTONDeepSpeed")
                members, off = [], 0
                for p in params:
                    k = self._member(p)
                    spec = self.specs[k]
                    pn = p.partition_numel()
                    ranges[spec.name] = padded_partition_ranges(spec.numel, pn, self.world)
                    members.append((k, off))
                    off += pn
                flats.append(_Flat(zopt.fp32_partitioned_groups_flat[i], members))

            def resync(i: int) -> None:
                zopt.fp16_partitioned_groups_flat[i].data.copy_(zopt.fp32_partitioned_groups_flat[i].data)
        else:
            import torch.distributed as dist

            for i, params in enumerate(zopt.round_robin_bit16_groups):
                if zopt.partition_count[i] != self.world:
                    raise ValueError(f"param group {i} is partitioned over {zopt.partition_count[i]} ranks, "
                                     f"the data-parallel group has {self.world}")
                P = int(zopt.partition_size[i])
                members = []
                for p, offset in zip(params, zopt.round_robin_bit16_offsets[i]):
                    k = self._member(p)
                    spec = self.specs[k]
                    ranges[spec.name] = flat_partition_ranges(offset, spec.numel, P, self.world)
                    a, b = ranges[spec.name][self.rank]
                    members.append((k, offset + a - self.rank * P if b > a else 0))
                flats.append(_Flat(zopt.single_partition_of_fp32_groups[i], members))

            def resync(i: int) -> None:
                part = zopt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=zopt.real_dp_process_group[i])]
                fp32 = zopt.single_partition_of_fp32_groups[i]
                if zopt.cpu_offload:
                    buf = zopt.param_buffer_of_bit16_for_cpu_offload_groups[i]
                    buf.data.copy_(fp32.data)
                    part.data.copy_(buf.data)
                else:
                    part.data.copy_(fp32.data)
        missing = [s.name for s in self.specs if s.name not in ranges]
        if missing:
            raise ValueError(f"DeepSpeed does not partition {missing[:3]}…: every optimized parameter must be trainable "
                             "and passed to deepspeed.initialize")
        self._flats, self._zopt, self._resync, self.stage = flats, zopt, resync, stage
        self._setup(ranges, flats[0].tensor.dtype)
        return self

    def _mark(self, k: int, _param: torch.Tensor) -> None:
        """Post-accumulate-grad hook of parameter ``k``: it has a gradient this optimizer step."""
        self._seen.add(k)

    def _member(self, p: torch.Tensor) -> int:
        k = self._index.get(id(p))
        if k is None:
            raise ValueError("DeepSpeed partitions a parameter this optimizer was not built with")
        return k

    # ------------------------------------------------------------------ pieces
    def _local_pieces(self) -> list[LocalPiece]:
        if not self._flats:
            raise RuntimeError("LANTONDeepSpeed is not attached: call opt.attach(engine) after deepspeed.initialize "
                               "(or use lanton_dist.integrations.deepspeed.initialize)")
        by_spec: dict[int, LocalPiece] = {}
        for f, flat in enumerate(self._flats):
            grad = self._grads.get(f)
            for k, off in flat.members:
                spec, gi = self.named[k]
                a, b = self.ranges[spec.name][self.rank]
                by_spec[k] = self._piece(spec, gi, flat.tensor.data[off : off + b - a],
                                         None if grad is None else grad.reshape(-1)[off : off + b - a])
        return [by_spec[k] for k in range(len(self.specs))]

    # ------------------------------------------------------------------ the hook
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Called by DeepSpeed once per flat partition (see module doc); the core runs at the last."""
        if closure is not None:
            raise ValueError("DeepSpeed does not pass closures to its base optimizer")
        if not self._flats:
            raise RuntimeError("LANTONDeepSpeed.step was called before attach(engine): use "
                               "lanton_dist.integrations.deepspeed.initialize, or call opt.attach(engine) "
                               "right after deepspeed.initialize")
        visible = [p for g in self.param_groups for p in g["params"]]
        hit = [f for f, flat in enumerate(self._flats) if any(p is flat.tensor for p in visible)]
        if len(hit) != 1:
            raise RuntimeError(f"expected DeepSpeed to step one flat partition, it showed {len(hit)}")
        f = hit[0]
        if f != len(self._grads):
            raise RuntimeError(f"DeepSpeed stepped partition {f} after {sorted(self._grads)}; expected them in order")
        grad = self._flats[f].tensor.grad
        if grad is None:
            raise RuntimeError(f"DeepSpeed gave flat partition {f} no gradient")
        self._grads[f] = grad
        if f < len(self._flats) - 1:
            return None
        present = [self.specs[k].name for k in sorted(self._seen)]
        try:
            stepped = self._run_core(self._local_pieces(), present)
        finally:
            self._grads, self._seen = {}, set()
        if stepped:
            for i in range(len(self._flats) - 1):
                self._resync(i)
        return None

    # ------------------------------------------------------------------ checkpoints (per rank, via DeepSpeed)
    def state_dict(self) -> dict[str, Any]:
        """This rank's state; DeepSpeed's ``save_checkpoint`` stores it in the rank's optimizer file."""
        return self.local_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by DeepSpeed's ``load_checkpoint``; same world size and layout as at save time."""
        self.load_local_state_dict(state_dict)


def initialize(model: nn.Module, cfg, config: dict[str, Any] | str, *, meter: CommMeter | None = None,
               bucket_mb: float = 25.0, pad: bool = False, window: int = 2, overlap: bool = True,
               defer_variance: bool = True, groups: list[dict[str, Any]] | None = None, **deepspeed_kwargs: Any):
    """``deepspeed.initialize`` with a :class:`LANTONDeepSpeed` client optimizer, attached.

    ``config`` is the DeepSpeed config (a dict or a JSON file path; ``zero_allow_untested_optimizer``
    is set for you; ``zero_force_ds_cpu_optimizer`` is set to False when optimizer offload is
    requested). Gradient clipping is the optimizer's (``cfg.clip_grad_norm``, the same rule on
    every backend, :mod:`lanton_dist.clipping`): a ``gradient_clipping`` > 0 in ``config`` becomes
    ``cfg.clip_grad_norm`` (with a warning saying so; an error if ``cfg`` sets another value),
    and DeepSpeed's own clipping is always set to 0 — also when the key is absent, where
    DeepSpeed would otherwise clip at 1.0.
    ``meter`` … ``groups`` configure the optimizer (see :class:`LANTONDeepSpeed`); every other
    keyword (``lr_scheduler``, ``training_data``, ``collate_fn``, ``model_parameters``, ``mpu``,
    …) goes to ``deepspeed.initialize`` unchanged — what DeepSpeed builds from them is on the
    engine (``engine.training_dataloader``, ``engine.lr_scheduler``).
    Needs ``torch.distributed`` initialised and ``LOCAL_RANK`` set (launchers do it).
    Returns ``(engine, optimizer)``.
    """
    import json

    import deepspeed

    for taken in ("model", "optimizer"):
        if taken in deepspeed_kwargs:
            raise ValueError(f"initialize sets deepspeed.initialize's {taken!r} itself; do not pass it")
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    config = dict(config)
    config.setdefault("zero_allow_untested_optimizer", True)
    zero = config.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    if "optimizer" in config:
        raise ValueError("remove the 'optimizer' section from the DeepSpeed config: LANTON is the client optimizer")
    cfg = _take_gradient_clipping(cfg, config)
    opt = LANTONDeepSpeed(model, cfg, meter=meter, bucket_mb=bucket_mb, pad=pad, window=window, overlap=overlap,
                          defer_variance=defer_variance, groups=groups)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, **deepspeed_kwargs)
    return engine, opt.attach(engine)


def _take_gradient_clipping(cfg, config: dict[str, Any]):
    """``cfg`` with DeepSpeed's ``gradient_clipping`` (if > 0) as its ``clip_grad_norm``; sets
    ``config["gradient_clipping"]`` to 0 so that DeepSpeed never clips (the core does)."""
    value = float(config.get("gradient_clipping") or 0.0)
    config["gradient_clipping"] = 0.0
    if not value:
        return cfg
    if cfg.clip_grad_norm and cfg.clip_grad_norm != value:
        raise ValueError(f"the DeepSpeed config's gradient_clipping {value} differs from the optimizer config's "
                         f"clip_grad_norm {cfg.clip_grad_norm}: set one of them")
    warnings.warn(f"DeepSpeed gradient_clipping {value} is applied by the LANTON client optimizer as clip_grad_norm "
                  "(the same rule on every backend); DeepSpeed's own clipping is set to 0", stacklevel=3)
    return dataclasses.replace(cfg, clip_grad_norm=value)
