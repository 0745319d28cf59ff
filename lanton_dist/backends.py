"""Execution backends of the training loop (:mod:`lanton_dist.trainer`): the one seam between
single-process and distributed training.

:func:`setup_backend` returns a :class:`Backend`: the module to run, the optimizer, this
process's ``rank``/``world``, the global-mean loss reduction, the gradient-sync context for
accumulation, and the backend's checkpoint files. :class:`Backend` itself is
``parallel.backend: none`` (one process); the distributed ones subclass it:

* ``zero`` — our engine: every rank holds the model and computes its rows of the global
  batch; :class:`~lanton_dist.engine.ShardedLANTON` reduce-scatters gradients to matrix
  owners, runs each Newton–Schulz once, and all-gathers parameters. Checkpoints are sharded
  DCP directories (reshardable to another world size).
* ``ddp`` — the redundant baseline: ``DistributedDataParallel`` all-reduces gradients and
  every rank runs the whole single-process optimizer (every Newton–Schulz on every rank).
* ``fsdp2`` — ``fully_shard`` per transformer block and root;
  :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2` (row shards to owners by all-to-all).
  Checkpoints: DCP directories (model shards + optimizer pieces).
* ``deepspeed`` — ``deepspeed.initialize`` with
  :class:`~lanton_dist.integrations.deepspeed.LANTONDeepSpeed` as the client optimizer, ZeRO
  stage ``parallel.zero_stage`` (1, 2 or 3); the engine runs forward/backward/step, micro
  batches are DeepSpeed gradient-accumulation steps. The model stays fp32 (``train.dtype:
  bf16`` autocasts on GPU as for the other backends; DeepSpeed's own ``bf16`` master-weight
  mode is available through :func:`~lanton_dist.integrations.deepspeed.initialize`).
  Checkpoints: ``engine.save_checkpoint`` directories (same world size to resume).

A backend writes its files into the directory :mod:`lanton_dist.checkpoint_dir` hands it
(the loop adds ``loop.json`` and the RNG states, and commits the directory atomically).
Distributed backends are launched with ``torchrun --nproc-per-node N launch/train.py ...``;
gloo on CPU, NCCL on GPU (``cuda:$LOCAL_RANK``). A failure on any rank is published so the
others stop with an error naming it (:func:`lanton_dist.engine.meter.fail_fast`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lanton_dist.config import TRAINER_BACKENDS, OptimConfig, RunConfig
from lanton_dist.engine import build_sharded_optimizer, checkpoint
from lanton_dist.engine.meter import fail_fast
from lanton_dist.engine.optimizer import pieces_sq_sum
from lanton_dist.factory import build_optimizer

OptimizerFactory = Callable[[nn.Module, OptimConfig], torch.optim.Optimizer]
STATE_FILE = "state.pt"
# Param-group entries that are code objects, not state: kept from the live optimizer on load.
NON_STATE_GROUP_KEYS: tuple[str, ...] = ("specs",)


# ============================================================================ single process
class Backend:
    """How this process takes part in training. This base class is the single-process
    backend (``parallel.backend: none``); distributed backends subclass it.

    Attributes:
        model: the module the loop calls, ``(B, T) int64 → (B, T, V)`` logits (may be a wrapper).
        optimizer: the optimizer the scheduler drives.
        device: where batches go. rank, world: this process and the data-parallel size.
        reshards: whether its checkpoints load at another world size.
        clip_grad_norm: the threshold :meth:`clip_gradients` applies (0: it does nothing).

    Gradient clipping (``optim.clip_grad_norm``): lanton_dist's optimizers clip inside their
    step (they expose ``clip_grad_norm``; :mod:`lanton_dist.clipping`); for any other optimizer
    (torch's AdamW, a custom factory's) the backend clips ``p.grad`` with
    ``torch.nn.utils.clip_grad_norm_`` in :meth:`clip_gradients`, the same rule.
    """

    name = "none"
    reshards = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, rank: int = 0, world: int = 1,
                 *, clip_grad_norm: float | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.rank = rank
        self.world = world
        self.clip_grad_norm = external_clip(optimizer, clip_grad_norm)
        self._pre_clip_norm: torch.Tensor | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, metrics and plots."""
        return self.rank == 0

    def unwrap(self) -> nn.Module:
        """The plain :class:`~lanton_dist.model.Transformer` (for parameter counts)."""
        return self.model

    def reduce_loss(self, t: torch.Tensor) -> torch.Tensor:
        """Global mean over ranks of this rank's mean loss ``t`` (a scalar tensor)."""
        return t

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward; ``sync=False`` may skip gradient reduction
        (accumulation), ``sync=True`` is the last micro-batch of a (half-)batch."""
        return contextlib.nullcontext()

    def data_shard(self) -> tuple[int, int]:
        """``(index, count)``: which rows of each global batch this process computes — rows
        ``[index·b, (index+1)·b)``, ``b = global_batch / count`` (here ``(rank, world)``)."""
        return self.rank, self.world

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, micro_batch: int, dtype: str) -> tuple[torch.Tensor, bool]:
        """Forward and backward of this process's rows ``x, y`` ``(b, T)`` int64: returns this
        rank's mean loss (a detached scalar on ``device``; :meth:`reduce_loss` makes it global)
        and whether the rows ran as two halves.

        The rows are cut into micro-batches of ``micro_batch`` rows (0: all at once), each
        micro-batch's mean loss weighted ``rows / b`` so the accumulated gradient is the one of
        the mean loss. When the optimizer asks for Option II (``needs_two_half_batches()``) the
        rows split into two halves (each half's loss weighted ½) and ``stash_half_gradient()``
        is called between them."""
        opt = self.optimizer
        two = asks_two_half_batches(opt)
        rows = x.shape[0]
        halves = micro_slices(rows, micro_batch, 2 if two else 1)
        total = torch.zeros((), device=self.device)
        for h, slices in enumerate(halves):
            for i, sl in enumerate(slices):
                xb, yb = x[sl], y[sl]
                with self.sync_context(i == len(slices) - 1), autocast(self.device, dtype):
                    logits = self.model(xb)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten())
                    weighted = loss * (xb.shape[0] / rows)
                    self.backward(weighted)
                total += weighted.detach()
            if two and h == 0:
                opt.stash_half_gradient()
        return total, two

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, dtype: str) -> torch.Tensor:
        """This rank's mean loss on rows ``x, y`` (no gradient; the caller sets eval mode)."""
        with autocast(self.device, dtype):
            logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self) -> None:
        """Before :meth:`step`: clip the gradients for an optimizer that does not clip itself
        (``clip_grad_norm`` > 0; ``torch.nn.utils.clip_grad_norm_`` over the model's gradients —
        the global gradient here and under DDP, ``Shard(0)`` DTensors under FSDP2 — keeping the
        pre-clip norm for :meth:`grad_norm`). A no-op otherwise."""
        if self.clip_grad_norm:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self._pre_clip_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def clipped_norm(self) -> torch.Tensor | None:
        """The pre-clip global gradient norm of the last step if it was clipped (by
        :meth:`clip_gradients`, or inside the step by an optimizer's sharded core, which computes
        it anyway), else None: no collective, no host read."""
        if self._pre_clip_norm is not None:
            return self._pre_clip_norm
        norm = getattr(getattr(self.optimizer, "core", None), "grad_norm", None)
        return None if norm is None else norm.float()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self, two_halves: bool) -> torch.Tensor | None:
        """Global L2 norm of the gradient the optimizer step just used, before clipping (as
        torch and Megatron report it): a scalar tensor on ``device``, the same on every rank;
        call after :meth:`step` and before :meth:`zero_grad` (on log steps only: it costs at
        most one scalar all-reduce).

        Here (one process, and DDP) ``p.grad`` of the unwrapped model is already the global
        gradient (lanton_dist's optimizers leave it unclipped; :meth:`clip_gradients` keeps the
        norm it clipped). After a two-half-batch step (Option II estimation step) ``p.grad``
        holds only the second half, the first being the optimizer's: the norm is the one the
        optimizer took of the combined gradient (``combined_grad_norm``, LANTON), else None."""
        clipped = self.clipped_norm()
        if clipped is not None:
            return clipped
        if two_halves:
            return getattr(self.optimizer, "combined_grad_norm", None)
        grads = [p.grad for p in self.unwrap().parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for non-finite gradients (a host-side counter)."""
        return int(getattr(self.optimizer, "skipped_steps", 0))

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def close(self) -> None:
        """Release process groups and the like."""

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """Write model and optimizer into ``directory`` (called on every rank; here rank 0
        writes ``state.pt``, tensors and plain containers only)."""
        if self.is_main:
            payload = {"model": self.unwrap().state_dict(), "optimizer": optimizer_state(self.optimizer)}
            torch.save(payload, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        """Restore model and optimizer from ``directory`` (``torch.load(weights_only=True)``)."""
        ckpt = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.unwrap().load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])


def external_clip(optimizer: torch.optim.Optimizer, clip_grad_norm: float | None) -> float:
    """The threshold a backend must clip at itself: 0 for an optimizer that clips in its own
    step (it has ``clip_grad_norm``; an error if that differs from the run's), the run's
    ``clip_grad_norm`` for any other; ``None``: the optimizer decides (0)."""
    own = getattr(optimizer, "clip_grad_norm", None)
    if clip_grad_norm is None:
        return 0.0
    if own is None:
        return float(clip_grad_norm)
    if own != clip_grad_norm:
        raise ValueError(f"the optimizer clips gradients at {own} but optim.clip_grad_norm is {clip_grad_norm}: "
                         "build it with the run's optim config")
    return 0.0


def asks_two_half_batches(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` wants this step's rows as two half-batches (an Option II estimation
    step: its ``needs_two_half_batches()``, then ``stash_half_gradient()`` between the halves);
    False for an optimizer without that method (torch's AdamW, a custom factory's)."""
    return bool(getattr(optimizer, "needs_two_half_batches", lambda: False)())


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` without code objects (ParamSpecs), so it loads with ``weights_only``."""
    sd = opt.state_dict()
    sd["param_groups"] = [{k: v for k, v in g.items() if k not in NON_STATE_GROUP_KEYS} for g in sd["param_groups"]]
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`: load, then put the live groups' ParamSpecs back."""
    kept = [{k: g[k] for k in NON_STATE_GROUP_KEYS if k in g} for g in opt.param_groups]
    opt.load_state_dict(sd)
    for g, k in zip(opt.param_groups, kept):
        g.update(k)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``train.dtype: bf16`` on CUDA; nothing otherwise (fp32)."""
    if dtype == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def micro_slices(rows: int, micro: int, halves: int) -> list[list[slice]]:
    """Row slices of a ``rows``-row batch: ``halves`` (1 or 2) lists of micro-batch slices."""
    if rows % halves:
        raise ValueError(
            f"Option II splits each rank's batch in two halves, but it has {rows} rows (odd); use an even global_batch / world"
        )
    per_half = rows // halves
    micro = min(micro or per_half, per_half)
    if per_half % micro:
        raise ValueError(f"train.micro_batch {micro} does not divide the {per_half} rows of each (half-)batch")
    return [[slice(h * per_half + i, h * per_half + i + micro) for i in range(0, per_half, micro)] for h in range(halves)]


def data_parallel_size(cfg: RunConfig) -> int:
    """The number of data-parallel batch shards (:meth:`Backend.data_shard`), known before
    :func:`setup_backend` runs, for the checks before training: 1 for ``none``, torchrun's
    ``WORLD_SIZE`` for the distributed backends, ``WORLD_SIZE / (tp·pp)`` for ``megatron``."""
    if cfg.parallel.backend == "none":
        return 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.backend == "megatron":
        return max(1, world // (cfg.parallel.tp * cfg.parallel.pp))
    return world


def setup_backend(cfg: RunConfig, model: nn.Module, optimizer_factory: OptimizerFactory | None = None) -> Backend:
    """The :class:`Backend` of ``cfg.parallel.backend`` for ``model`` (built on CPU from the seed).

    The one place that knows about process groups and wrappers: it places the model, builds
    the optimizer with ``optimizer_factory(model, cfg.optim)`` and reports rank/world.
    ``megatron`` builds Megatron-core's own model instead:
    :func:`lanton_dist.megatron_backend.setup_megatron_backend`.
    """
    factory = optimizer_factory or build_optimizer
    name = cfg.parallel.backend
    if name == "none":
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        if world_env > 1:
            raise ValueError(
                f"parallel.backend 'none' is single-process but WORLD_SIZE={world_env}; "
                f"supported backends: {TRAINER_BACKENDS}"
            )
        device = resolve_device(cfg.train.device)
        model.to(device)
        return Backend(model, factory(model, cfg.optim), device, clip_grad_norm=cfg.optim.clip_grad_norm)
    if name == "megatron":
        raise ValueError("parallel.backend 'megatron' builds Megatron-core's GPTModel, not this model: set it up with "
                         "lanton_dist.megatron_backend.setup_megatron_backend (lanton_dist.trainer.train does)")
    if name in TRAINER_BACKENDS[1:]:
        return setup_distributed_backend(cfg, model, factory)
    raise ValueError(f"unsupported parallel.backend {name!r}; supported backends: {TRAINER_BACKENDS}")


# ============================================================================ distributed
def init_distributed(cfg: RunConfig) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"parallel.backend {cfg.parallel.backend!r} is launched with torchrun "
                         "(e.g. torchrun --nproc-per-node 2 launch/train.py --config ...)")
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.parallel.timeout_s))
    return device


class DistributedBackend(Backend):
    """Base of the multi-process backends: the loss averaged over the world, a failing step
    reported on every rank (:func:`~lanton_dist.engine.meter.fail_fast`), the process group
    torn down at :meth:`close`."""

    @property
    def replicas(self) -> int:
        """How many ranks contribute a (half-)batch loss to :meth:`reduce_loss`'s sum."""
        return self.world

    def reduce_loss(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.replicas

    def step(self) -> None:
        with fail_fast():
            self.optimizer.step()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class EngineBackend(DistributedBackend):
    """``parallel.backend: zero``."""

    name = "zero"

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Accumulating micro-batches launch no reduce-scatter (``ShardedLANTON.no_sync``)."""
        return contextlib.nullcontext() if sync else self.optimizer.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        with fail_fast():
            loss.backward()

    def grad_norm(self, two_halves: bool) -> torch.Tensor | None:
        """:func:`pieces_grad_norm` (Option II steps included: the pieces hold both halves)."""
        return pieces_grad_norm(self.optimizer, self.device)

    def save(self, directory: Path) -> None:
        """A sharded DCP checkpoint in ``directory``; every rank writes its pieces."""
        checkpoint.save(self.optimizer, str(directory), self.model)

    def load(self, directory: Path) -> None:
        checkpoint.load(self.optimizer, str(directory), self.model)


def pieces_grad_norm(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Global L2 norm of the gradient a :class:`~lanton_dist.engine.ShardedLANTON` step used,
    after that step: each :class:`~lanton_dist.engine.core.LocalPiece` ``.grad`` is this rank's
    share of the reduced gradient (both halves combined on an Option II step) and ``.weight``
    its share in job-wide sums (0 for a replica counted elsewhere, e.g. Megatron's
    TP-replicated norms); one scalar all-reduce over the default (world) group — none when
    the step clipped: its core already has the pre-clip norm (``core.grad_norm``)."""
    if optimizer.core.grad_norm is not None:
        return optimizer.core.grad_norm.float()
    sq = pieces_sq_sum(optimizer.pieces, device)
    dist.all_reduce(sq)
    return sq.sqrt()


class DDPBackend(DistributedBackend):
    """``parallel.backend: ddp``: gradients all-reduced by DDP, the optimizer replicated."""

    name = "ddp"

    def unwrap(self) -> nn.Module:
        return self.model.module


class DeepSpeedBackend(DistributedBackend):
    """``parallel.backend: deepspeed``: ``model`` is the DeepSpeed engine, ``optimizer`` the
    LANTON client optimizer (its param groups carry the scheduled rates)."""

    name = "deepspeed"
    reshards = False

    def unwrap(self) -> nn.Module:
        return self.model.module

    def backward(self, loss: torch.Tensor) -> None:
        """One micro batch; the loop has already weighted it by its share of the rank's rows.
        DeepSpeed counts micro batches in ``engine.step``, so inside an accumulation window
        it is called here (it only advances the counter); the boundary step is :meth:`step`."""
        with fail_fast():
            self.model.backward(loss, scale_wrt_gas=False)
            if not self.model.is_gradient_accumulation_boundary():
                self.model.step()

    def step(self) -> None:
        with fail_fast():
            self.model.step()

    def zero_grad(self) -> None:
        """``engine.step`` has zeroed the gradients at the accumulation boundary."""

    def grad_norm(self, two_halves: bool) -> torch.Tensor | None:
        """The engine's global gradient norm of its last step (``get_global_grad_norm``; ZeRO
        computes it over its partitions); None if the engine did not compute one."""
        norm = self.model.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32, device=self.device)

    def skipped_steps(self) -> int:
        """The client optimizer's skipped steps plus DeepSpeed's own (loss-scale overflows)."""
        return super().skipped_steps() + int(getattr(self.model, "skipped_steps", 0))

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        """Same world size only (``reshards`` is False): ZeRO partitions and LANTON's per-rank
        pieces follow it; the loop checks the world size before calling this."""
        loaded, _ = self.model.load_checkpoint(str(directory), tag="state")
        if loaded is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag 'state')")


def deepspeed_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: one optimizer step per global batch, the rank's rows cut
    into ``train.micro_batch`` accumulation steps, ZeRO stage ``parallel.zero_stage``."""
    if cfg.parallel.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 1, 2 or 3 for the deepspeed backend, got {cfg.parallel.zero_stage}")
    rows = cfg.train.global_batch // world
    accumulation = len(micro_slices(rows, cfg.train.micro_batch, 1)[0])
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": rows // accumulation,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # DeepSpeed clips at 1.0 unless told otherwise; our client optimizer clips at
        # optim.clip_grad_norm itself (the same rule on every backend), so DeepSpeed never does.
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
    }


class FSDP2Backend(DistributedBackend):
    """``parallel.backend: fsdp2``."""

    name = "fsdp2"

    def grad_norm(self, two_halves: bool) -> torch.Tensor | None:
        """The pre-clip norm when the step clipped (:meth:`clipped_norm`, Option II steps
        included); after an unclipped Option II two-half step the optimizer's share of the
        combined gradient's Σ G² (``combined_sq``: ``p.grad`` holds only the second half);
        else from the ``Shard(0)`` DTensor gradients. One scalar all-reduce either way."""
        clipped = self.clipped_norm()
        if clipped is not None:
            return clipped
        if two_halves:
            sq = self.optimizer.combined_sq.clone()
        else:
            sq = torch.zeros((), device=self.device, dtype=torch.float32)
            for p in self.model.parameters():
                if p.grad is not None:
                    sq += p.grad.to_local().float().square().sum()
        dist.all_reduce(sq)
        return sq.sqrt()

    def save(self, directory: Path) -> None:
        self.optimizer.save(str(directory), self.model)

    def load(self, directory: Path) -> None:
        self.optimizer.load(str(directory), self.model)


def setup_distributed_backend(cfg: RunConfig, model: nn.Module, factory: OptimizerFactory) -> Backend:
    """The backend for ``cfg.parallel.backend`` in ``zero | ddp | fsdp2 | deepspeed`` (the
    process group is created here)."""
    device = init_distributed(cfg)
    model.to(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    p = cfg.parallel
    if p.backend == "zero":
        opt = build_sharded_optimizer(model, cfg.optim, bucket_mb=p.bucket_mb, overlap=p.overlap,
                                      overlap_grad_reduce=True, attach=True)
        return EngineBackend(model, opt, device, rank, world, clip_grad_norm=cfg.optim.clip_grad_norm)
    if p.backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lanton_dist.integrations.fsdp2 import build_fsdp2_optimizer

        mesh = init_device_mesh(device.type, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_fsdp2_optimizer(model, cfg.optim, bucket_mb=p.bucket_mb, overlap=p.overlap)
        return FSDP2Backend(model, opt, device, rank, world, clip_grad_norm=cfg.optim.clip_grad_norm)
    if p.backend == "deepspeed":
        from lanton_dist.integrations.deepspeed import initialize

        engine, opt = initialize(model, cfg.optim, deepspeed_config(cfg, world), bucket_mb=p.bucket_mb,
                                 overlap=p.overlap)
        return DeepSpeedBackend(engine, opt, device, rank, world, clip_grad_norm=cfg.optim.clip_grad_norm)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return DDPBackend(ddp, factory(model, cfg.optim), device, rank, world, clip_grad_norm=cfg.optim.clip_grad_norm)
