"""Distributed execution backends for the training loop (:func:`lanton_dist.trainer.setup_backend`).

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

All are launched with ``torchrun --nproc-per-node N launch/train.py ...``; gloo on CPU,
NCCL on GPU (``cuda:$LOCAL_RANK``). A failure on any rank is published so the others stop
with an error naming it (:func:`lanton_dist.engine.meter.fail_fast`).
"""
from __future__ import annotations

import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lanton_dist.config import RunConfig
from lanton_dist.engine import build_sharded_optimizer, checkpoint
from lanton_dist.engine.meter import fail_fast
from lanton_dist.trainer import Backend, OptimizerFactory, micro_slices, resolve_device


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
    world = dist.get_world_size()
    if cfg.train.global_batch % world:
        raise ValueError(f"train.global_batch {cfg.train.global_batch} is not divisible by the world size {world}")
    return device


class _DistributedBackend(Backend):
    def reduce_loss(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    def step(self) -> None:
        with fail_fast():
            self.optimizer.step()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class EngineBackend(_DistributedBackend):
    """``parallel.backend: zero``."""

    name = "zero"

    def backward(self, loss: torch.Tensor) -> None:
        with fail_fast():
            loss.backward()

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        """A sharded DCP directory ``path`` (without ``.pt``); every rank writes its pieces."""
        checkpoint.save(self.optimizer, str(_dir(path)), self.model,
                        extra={"loop": {f"rank{self.rank}": pickle.dumps(extra)}})

    def load(self, path: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        keys = dcp.FileSystemReader(str(_dir(path))).read_metadata().state_dict_metadata
        key = f"rank{self.rank}" if f"loop.rank{self.rank}" in keys else "rank0"  # resharded: rank 0's
        extra: dict[str, Any] = {"loop": {key: None}}
        checkpoint.load(self.optimizer, str(_dir(path)), self.model, extra=extra)
        return pickle.loads(extra["loop"][key])


class DDPBackend(_DistributedBackend):
    """``parallel.backend: ddp``: gradients all-reduced by DDP, the optimizer replicated."""

    name = "ddp"

    def unwrap(self) -> nn.Module:
        return self.model.module


class DeepSpeedBackend(_DistributedBackend):
    """``parallel.backend: deepspeed``: ``model`` is the DeepSpeed engine, ``optimizer`` the
    LANTON client optimizer (its param groups carry the scheduled rates)."""

    name = "deepspeed"

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

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        self.model.save_checkpoint(str(_dir(path)), tag="state", save_latest=False)
        if self.is_main:
            (_dir(path) / "loop.pkl").write_bytes(pickle.dumps({"world": self.world, "loop": extra}))

    def load(self, path: Path) -> dict[str, Any]:
        """Same world size only: ZeRO partitions and LANTON's per-rank pieces follow it."""
        saved = pickle.loads((_dir(path) / "loop.pkl").read_bytes())
        if saved["world"] != self.world:
            raise ValueError(f"{_dir(path)} was written by {saved['world']} DeepSpeed ranks, this run has {self.world}: "
                             "DeepSpeed checkpoints resume at the same world size (use parallel.backend zero or "
                             "fsdp2, whose DCP checkpoints reshard)")
        loaded, _ = self.model.load_checkpoint(str(_dir(path)), tag="state")
        if loaded is None:
            raise FileNotFoundError(f"{_dir(path)}: no DeepSpeed checkpoint (tag 'state')")
        return saved["loop"]


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
        # DeepSpeed clips the global gradient norm at 1.0 unless told otherwise; the loop does
        # not clip on any other backend, and clipped gradients change LANTON's momentum mix.
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
    }


class FSDP2Backend(_DistributedBackend):
    """``parallel.backend: fsdp2``."""

    name = "fsdp2"

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        self.optimizer.save(str(_dir(path)), self.model)
        if self.is_main:
            (_dir(path) / "loop.pkl").write_bytes(pickle.dumps(extra))

    def load(self, path: Path) -> dict[str, Any]:
        self.optimizer.load(str(_dir(path)), self.model)
        return pickle.loads((_dir(path) / "loop.pkl").read_bytes())


def _dir(path: Path) -> Path:
    return path.with_suffix("") if path.suffix == ".pt" else path


def setup_distributed_backend(cfg: RunConfig, model: nn.Module, factory: OptimizerFactory) -> Backend:
    """The backend for ``cfg.parallel.backend`` in ``zero | ddp | fsdp2 | deepspeed`` (the
    process group is created here)."""
    device = init_distributed(cfg)
    model.to(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    p = cfg.parallel
    if p.backend == "zero":
        opt = build_sharded_optimizer(model, cfg.optim, bucket_mb=p.bucket_mb, overlap=p.overlap)
        return EngineBackend(model, opt, device, rank, world)
    if p.backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lanton_dist.integrations.fsdp2 import build_fsdp2_optimizer

        mesh = init_device_mesh(device.type, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_fsdp2_optimizer(model, cfg.optim, bucket_mb=p.bucket_mb, overlap=p.overlap)
        return FSDP2Backend(model, opt, device, rank, world)
    if p.backend == "deepspeed":
        from lanton_dist.integrations.deepspeed import initialize

        engine, opt = initialize(model, cfg.optim, deepspeed_config(cfg, world), bucket_mb=p.bucket_mb,
                                 overlap=p.overlap)
        return DeepSpeedBackend(engine, opt, device, rank, world)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return DDPBackend(ddp, factory(model, cfg.optim), device, rank, world)
