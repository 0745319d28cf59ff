"""``parallel.backend: megatron``: Megatron-core's LLaMA ``GPTModel`` (TP × PP × DP) as a
:class:`~lanton_dist.backends.Backend` of the one training loop (:mod:`lanton_dist.trainer`).

:func:`setup_megatron_backend` creates the process group (NCCL on GPU, gloo on CPU; a
one-process group without torchrun), Megatron's TP/PP/DP groups from ``parallel.tp`` /
``parallel.pp`` (DP = world / (tp·pp)), this rank's pipeline stage of the model
(:mod:`lanton_dist.integrations.megatron_model`, fp32 parameters) and its optimizer
(:func:`make_optimizer`). What differs from the other backends:

* **Rows.** Data-parallel replica ``d`` of ``D`` computes rows ``[d·b, (d+1)·b)`` of every
  global batch (``b = global_batch / D``, :meth:`MegatronBackend.data_shard`); the TP and PP
  ranks of one replica see the same rows.
* **Forward/backward** of those rows goes through Megatron's ``get_forward_backward_func()``
  (the 1F1B pipeline schedule when pp > 1) with ``b / train.micro_batch`` micro-batches; each
  micro-batch's loss is its mean over tokens divided by the number of micro-batches
  (Megatron's reduction), so the accumulated gradient is the one of the mean loss.
* **Loss.** Only the last pipeline stage has it: there, TP rank 0 contributes the mean of its
  replica's rows, every other rank 0; :meth:`~MegatronBackend.reduce_loss` sums over the job
  and divides by ``D``: the global mean, on every rank.
* **Checkpoints** (inside the loop's atomic ``step_N`` directories): with more than one
  process the engine's own DCP files (:mod:`lanton_dist.engine.checkpoint`: owner-only and
  DP-sharded optimizer state, model tensors keyed by global name, ``@tp<r>of<T>`` for
  TP-sharded ones); in one process ``state.pt`` (model by global name + optimizer state).
  A multi-process checkpoint resumes at another data-parallel size (``reshards``: the engine's
  DCP state reshards over DP, the model keys do not depend on it); ``parallel.tp``/``pp`` must
  match (:data:`lanton_dist.config.RESUME_MUST_MATCH`), and one-process ``state.pt`` and
  multi-process DCP checkpoints do not load into each other (a config error).
* **CPU.** Megatron-core needs CUDA. ``train.device: cpu`` on a machine without CUDA installs
  the CI/test shim :mod:`lanton_dist.integrations.megatron_cpu` (removed again by
  :meth:`~MegatronBackend.close`); ``train.device: auto`` without CUDA is a config error.
* **Option II** runs the schedule once per half of the replica's rows (each half's loss
  weighted ½, the optimizer's ``stash_half_gradient()`` between them), as the other backends.
"""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lanton_dist.backends import (STATE_FILE, DistributedBackend, OptimizerFactory, asks_two_half_batches, init_distributed,
                                  load_optimizer_state, micro_slices, optimizer_state, pieces_grad_norm, resolve_device)
from lanton_dist.config import ConfigError, RunConfig
from lanton_dist.engine.meter import fail_fast
from lanton_dist.factory import build_optimizer, param_groups

__all__ = ["MegatronBackend", "setup_megatron_backend", "make_optimizer", "make_forward_step"]

MODEL_KEY = "model"


# ============================================================================ model pieces
def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer for this rank's Megatron parameters. The one place that picks it.

    One process: :func:`lanton_dist.factory.build_optimizer` on the local parameters with the
    logical ParamSpecs (fused ``linear_qkv`` → q/k/v blocks, ``linear_fc1`` → gate/up).
    Otherwise the TP/PP/DP-aware engine
    (:func:`lanton_dist.integrations.megatron.build_megatron_optimizer`): gradient
    reduce-scatter over DP to matrix owners, TP-gathered Newton–Schulz and dual norms on one
    rank per matrix, scalar reductions (and the group-wide α max) over the whole job.
    """
    from lanton_dist.integrations.megatron import build_megatron_optimizer
    from lanton_dist.integrations.megatron_model import logical_param_specs

    if dist.get_world_size() > 1:
        return build_megatron_optimizer(model, cfg)
    specs = logical_param_specs(model, cfg)
    groups = param_groups(model, cfg.optim, specs={name: info.spec for name, info in specs.items()})
    return build_optimizer(model, cfg.optim, groups)


def _loss_func(loss_mask: torch.Tensor, weight: float, output: torch.Tensor):
    """Megatron's 3-tuple loss: ``(weight · Σ token loss, token count, {"lm loss": [Σ, count]})``
    — ``weight`` scales what backward sees (½ for an Option II half-batch), not the report."""
    losses = output.float()
    mask = loss_mask.to(losses.device, torch.float32).view(-1)
    loss = torch.sum(losses.view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss * weight, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.detach().float()])}


def make_forward_step(device: torch.device, attn_mask: torch.Tensor, bf16: bool, weight: float = 1.0) -> Callable:
    """Megatron's ``forward_step_func``: the next micro-batch ``{tokens, labels, position_ids,
    loss_mask}`` (each ``(micro, T)``) through ``model``; bf16 autocast when ``bf16``; the loss
    backward sees is weighted ``weight``."""
    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: nn.Module):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(tokens, position_ids, attn_mask, labels=labels)
        return output, partial(_loss_func, batch["loss_mask"], weight)
    return forward_step


def micro_batches(x: torch.Tensor, y: torch.Tensor, micro: int) -> list[dict[str, torch.Tensor]]:
    """Rows ``x, y`` ``(b, T)`` as Megatron micro-batches of ``micro`` rows (``micro`` divides ``b``)."""
    seq = x.shape[1]
    out = []
    for sl in micro_slices(x.shape[0], micro, 1)[0]:
        rows = x[sl].shape[0]
        out.append({"tokens": x[sl], "labels": y[sl], "loss_mask": torch.ones(rows, seq, device=x.device),
                    "position_ids": torch.arange(seq, device=x.device).expand(rows, seq)})
    return out


# ============================================================================ backend
class MegatronBackend(DistributedBackend):
    """``parallel.backend: megatron``. ``rank``/``world`` are the process's global rank and the
    job's size (RNG files, checkpoints, MFU); the rows a process computes follow its
    data-parallel replica (:meth:`data_shard`). ``model`` is this rank's pipeline stage and TP
    shard; ``keys`` maps each of its parameter names to its checkpoint key."""

    name = "megatron"
    reshards = True  # across data-parallel sizes (DCP ↔ DCP); TP/PP must match: RESUME_MUST_MATCH

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, cfg: RunConfig,
                 keys: dict[str, str], shim: bool) -> None:
        from megatron.core import parallel_state as ps

        from lanton_dist.integrations.megatron_model import causal_attention_mask

        super().__init__(model, optimizer, device, dist.get_rank(), dist.get_world_size(),
                         clip_grad_norm=cfg.optim.clip_grad_norm)
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.counts_loss = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.seq_len = cfg.data.seq_len
        self.eval_micro_batch = cfg.train.micro_batch
        self.attn_mask = causal_attention_mask(cfg.data.seq_len, device)
        params = dict(model.named_parameters())
        self.params = {key: params[name] for name, key in keys.items()}
        self.shim = shim

    def data_shard(self) -> tuple[int, int]:
        return self.dp_rank, self.dp

    def _run_schedule(self, x: torch.Tensor, y: torch.Tensor, micro_batch: int, dtype: str,
                      forward_only: bool, weight: float = 1.0) -> torch.Tensor:
        """Rows ``x, y`` through Megatron's schedule (backward of ``weight`` × their mean loss);
        this rank's share of the global mean loss (float64 scalar: the replica's mean loss on TP
        rank 0 of the last stage, else 0)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = micro_batches(x, y, micro_batch)
        forward_step = make_forward_step(self.device, self.attn_mask, dtype == "bf16" and self.device.type == "cuda",
                                         weight)
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
            num_microbatches=len(batches), seq_length=self.seq_len, micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.counts_loss:
            for r in results:
                total += r["lm loss"].to(self.device, torch.float64)
        return total[0] / total[1].clamp(min=1)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, micro_batch: int, dtype: str) -> tuple[torch.Tensor, bool]:
        """One pipeline schedule over this replica's rows; when the optimizer asks for Option II
        (``needs_two_half_batches()``) one schedule per half of the rows, each half's mean loss
        weighted ½ and ``stash_half_gradient()`` between them (the other backends' rule)."""
        two = asks_two_half_batches(self.optimizer)
        with fail_fast():
            if not two:
                return self._run_schedule(x, y, micro_batch, dtype, forward_only=False), False
            half = x.shape[0] // 2
            first = self._run_schedule(x[:half], y[:half], micro_batch, dtype, forward_only=False, weight=0.5)
            self.optimizer.stash_half_gradient()
            second = self._run_schedule(x[half:], y[half:], micro_batch, dtype, forward_only=False, weight=0.5)
            return (first + second) / 2, True

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, dtype: str) -> torch.Tensor:
        return self._run_schedule(x, y, self.eval_micro_batch, dtype, forward_only=True)

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: only TP rank 0 of each replica's last stage holds its loss."""
        return self.dp

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def grad_norm(self, two_halves: bool) -> torch.Tensor | None:
        """From the sharded engine's pieces (:func:`~lanton_dist.backends.pieces_grad_norm`,
        TP replicas counted once), or in one process from ``p.grad``."""
        if hasattr(self.optimizer, "pieces"):
            return pieces_grad_norm(self.optimizer, self.device)
        return super().grad_norm(two_halves)

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        super().close()
        if self.shim:
            from lanton_dist.integrations import megatron_cpu

            megatron_cpu.uninstall()

    # ---------------------------------------------------------------- checkpoints
    @property
    def sharded(self) -> bool:
        return hasattr(self.optimizer, "pieces")

    def save(self, directory: Path) -> None:
        """Every rank writes its engine pieces and model tensors (DCP; replicated keys once),
        or in one process ``state.pt``."""
        from lanton_dist.engine import checkpoint as engine_ckpt

        if self.sharded:
            engine_ckpt.save(self.optimizer, str(directory), extra={MODEL_KEY: dict(self.params)})
        elif self.is_main:
            torch.save({MODEL_KEY: dict(self.params), "optimizer": optimizer_state(self.optimizer)}, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        """Read :meth:`save`'s checkpoint (DCP: at any data-parallel size). ``ConfigError``
        when it was written in the other form (one process vs several)."""
        from lanton_dist.engine import checkpoint as engine_ckpt

        one_process = (directory / STATE_FILE).exists()
        if self.sharded == one_process:
            wrote, runs = ("one process", "several") if one_process else ("several processes", "one")
            raise ConfigError(f"cannot resume from {directory}: it was written by {wrote} (Megatron's reference optimizer "
                              f"state.pt vs the sharded engine's DCP files) and this run has {runs}; resume with "
                              f"{'one process' if one_process else 'more than one process'}")
        with torch.no_grad():
            if self.sharded:
                extra = {MODEL_KEY: {k: torch.empty_like(p) for k, p in self.params.items()}}
                engine_ckpt.load(self.optimizer, str(directory), extra=extra)
                saved = extra[MODEL_KEY]
            else:
                ckpt = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
                if set(ckpt[MODEL_KEY]) != set(self.params):
                    raise ValueError(f"{directory}: the checkpoint's model tensors differ from this run's")
                saved = ckpt[MODEL_KEY]
                load_optimizer_state(self.optimizer, ckpt["optimizer"])
            for k, p in self.params.items():
                p.copy_(saved[k])
        if self.sharded:
            self.optimizer.sync_from_model()  # every rank continues from the saved weights


def checkpoint_keys(specs: dict[str, Any]) -> dict[str, str]:
    """Parameter name → checkpoint key: the global (pipeline-independent) name, suffixed
    ``@tp<r>of<T>`` when the parameter is TP-sharded."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    return {name: f"{info.global_name}@tp{tp_rank}of{info.tp_size}" if info.is_sharded else info.global_name
            for name, info in specs.items()}


# ============================================================================ setup
def _device(cfg: RunConfig) -> torch.device:
    """The process's device; Megatron on CPU only when asked for (``train.device: cpu``)."""
    if cfg.train.device == "auto" and not torch.cuda.is_available():
        raise ConfigError("train.device auto found no CUDA device: Megatron-core needs CUDA; set train.device cpu "
                          "to run it on the CPU through lanton_dist.integrations.megatron_cpu (tests and CI only)")
    device = resolve_device(cfg.train.device)
    if device.type == "cpu" and torch.cuda.is_available():
        raise ConfigError("train.device cpu with parallel.backend megatron: Megatron-core runs on CPU only where CUDA "
                          "is absent (the CI/test shim); use train.device cuda")
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(cfg: RunConfig, device: torch.device) -> torch.device:
    """torchrun's ``env://`` group (:func:`lanton_dist.backends.init_distributed`), or a
    one-process group on a free local port when launched without torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return init_distributed(cfg)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timedelta(seconds=cfg.parallel.timeout_s))
    return device


def setup_megatron_backend(cfg: RunConfig, optimizer_factory: OptimizerFactory | None = None) -> MegatronBackend:
    """The :class:`MegatronBackend` of ``cfg``: process group, Megatron's parallel state, this
    rank's model stage and :func:`make_optimizer`'s optimizer (``optimizer_factory`` must be
    None: the optimizer follows the TP/PP/DP layout). Raises
    :class:`~lanton_dist.config.ConfigError` for a TP/PP layout the world size or the model
    does not allow."""
    if optimizer_factory is not None:
        raise ValueError("parallel.backend megatron builds its optimizer from Megatron's TP/PP/DP layout "
                         "(lanton_dist.megatron_backend.make_optimizer): it takes no optimizer factory")
    from lanton_dist.integrations import megatron_model as mm

    device = _init_process_group(cfg, _device(cfg))
    shim = False
    with contextlib.ExitStack() as undo:  # a failed setup leaves no process group or shim behind
        undo.callback(lambda: dist.is_initialized() and dist.destroy_process_group())
        if device.type == "cpu":
            from lanton_dist.integrations import megatron_cpu

            shim = not megatron_cpu.installed()
            if shim:
                megatron_cpu.install()
                undo.callback(megatron_cpu.uninstall)
        try:
            mm.check_parallel_layout(cfg, dist.get_world_size())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        mm.initialize_model_parallel(cfg)
        undo.callback(mm.destroy_model_parallel)
        model = mm.build_gpt_model(cfg).to(device)
        specs = mm.logical_param_specs(model, cfg)
        backend = MegatronBackend(model, make_optimizer(model, cfg), device, cfg, checkpoint_keys(specs), shim)
        undo.pop_all()
    return backend
