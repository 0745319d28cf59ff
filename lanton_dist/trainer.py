"""The training loop, as a library function: :func:`train`.

One loop for every execution backend. Everything that differs between single-process and
distributed training goes through one seam, :func:`lanton_dist.backends.setup_backend`, which
returns a :class:`~lanton_dist.backends.Backend` (``none``, ``zero``, ``ddp``, ``fsdp2``,
``deepspeed``) for the :class:`~lanton_dist.model.Transformer`, or
:func:`lanton_dist.megatron_backend.setup_megatron_backend` (``megatron``: Megatron-core's own
LLaMA ``GPTModel``); the loop does not change. Before anything is built the config is checked
(:func:`lanton_dist.config.check_run_config`) and, on resume, compared with the checkpoint's.

Per step ``s`` (0-based; the record written after it has ``step = s + 1``):

* data shard ``d`` of ``D`` (:meth:`~lanton_dist.backends.Backend.data_shard`: the rank and
  world, or Megatron's data-parallel replica) takes rows ``[d·b, (d+1)·b)`` of the
  deterministic global batch of step ``s`` (:meth:`lanton_dist.data.TokenDataset.get_batch`,
  ``b = global_batch / D``);
* :meth:`~lanton_dist.backends.Backend.forward_backward` runs them: split into micro-batches
  of ``train.micro_batch`` rows (0: all ``b`` rows at once), each micro-batch's mean loss
  weighted ``rows / b`` so the accumulated gradient is the gradient of the per-rank mean loss
  (the backend's reduction makes it the global mean); when the optimizer asks for Option II
  (``needs_two_half_batches()``) as two halves, each half's loss weighted ½, with
  ``stash_half_gradient()`` between them (Megatron: one pipeline schedule per micro-batch set or half);
* optimizer step, scheduler step (linear warm-up + cosine), ``metrics.jsonl`` record; every
  ``train.log_every`` steps (and the last) also one progress line — printed whether or not
  stdout is a terminal — with tokens/s, the global gradient norm
  (:meth:`~lanton_dist.backends.Backend.grad_norm`), peak memory and MFU, the same numbers in
  the record (:mod:`lanton_dist.training_log`); every LANTON estimation step
  (``step mod optim.estimate_every == 0``) the per-layer H, α and rate factors (``layers``).

Checkpoints are atomic directories ``checkpoints/step_N`` (:mod:`lanton_dist.checkpoint_dir`).
Resuming (``train.resume: true``) loads the newest complete one: model, optimizer and
scheduler state, the step (which is also the data position, since batches are functions of
the step) and the RNG states — the continued run is bit-identical to an uninterrupted one.
Each checkpoint's ``COMMITTED`` marker carries a manifest that resume verifies, falling back
to the previous checkpoint when a file is damaged. ``train.max_consecutive_skips`` bad steps
in a row (skipped, non-finite or a loss spike) stop the run
(:class:`~lanton_dist.divergence.Diverged`, no ``COMPLETED``); around bad steps checkpoints are
written, pruned and set aside by :class:`~lanton_dist.divergence.GoodCheckpoints`, so the newest
kept one predates the trouble. Rank 0 holds the run directory's lock
(:mod:`lanton_dist.run_lock`) for the whole run: a second run on it is refused.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lanton_dist import checkpoint_dir, run_lock
from lanton_dist.backends import Backend, OptimizerFactory, data_parallel_size, micro_slices, setup_backend
from lanton_dist.config import ConfigError, RunConfig, check_run_config, to_dict
from lanton_dist.data import TokenDataset, build_dataset, unigram_baseline
from lanton_dist.divergence import Diverged, DivergenceGuard, GoodCheckpoints
from lanton_dist.megatron_backend import setup_megatron_backend
from lanton_dist.model import Transformer
from lanton_dist.preemption import COMPLETED, StopRequest, any_rank
from lanton_dist.schedule import build_scheduler
from lanton_dist.training_log import (MetricsLog, RunShape, TensorBoardLog, Throughput, format_line, model_flops_per_token,
                                      layer_record, plot_rate_factors, read_metrics)

__all__ = ["Backend", "StepResult", "micro_slices", "setup_backend", "read_metrics", "train", "train_step", "evaluate"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ============================================================================ metrics
def diagnostics_summary(opt: torch.optim.Optimizer) -> dict[str, dict[str, float]] | None:
    """Per geometry group: min/max of LANTON's ``lr_factor`` and ``H`` (None for other optimizers)."""
    if not hasattr(opt, "layer_diagnostics"):
        return None
    out: dict[str, dict[str, float]] = {}
    for row in opt.layer_diagnostics():
        s = out.setdefault(
            row["geometry"], {"lr_factor_min": math.inf, "lr_factor_max": -math.inf, "H_min": math.inf, "H_max": -math.inf, "layers": 0}
        )
        s["lr_factor_min"] = min(s["lr_factor_min"], row["lr_factor"])
        s["lr_factor_max"] = max(s["lr_factor_max"], row["lr_factor"])
        s["H_min"] = min(s["H_min"], row["H"])
        s["H_max"] = max(s["H_max"], row["H"])
        s["layers"] += 1
    return out


def group_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {str(g.get("geometry", i)): float(g["lr"]) for i, g in enumerate(opt.param_groups)}


def plot_losses(records: list[dict[str, Any]], path: Path, title: str, unigram: float | None = None) -> Path:
    """Train and validation loss against step, one PNG at ``path`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=3, label="validation")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram baseline {unigram:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================ the loop
class StepResult(NamedTuple):
    """One training step: the global mean loss (scalar tensor), whether the batch ran as two
    halves, and the global gradient norm (scalar tensor; None when not asked for or not
    measured, see :meth:`~lanton_dist.backends.Backend.grad_norm`)."""

    loss: torch.Tensor
    two_halves: bool
    grad_norm: torch.Tensor | None


def train_step(
    backend: Backend, x: torch.Tensor, y: torch.Tensor, micro_batch: int, dtype: str, *, grad_norm: bool = False
) -> StepResult:
    """Forward/backward of this rank's rows ``x, y`` ``(b, T)``
    (:meth:`~lanton_dist.backends.Backend.forward_backward`) and one optimizer step; with
    ``grad_norm`` also the global norm of the gradient that step used (a log step)."""
    total, two = backend.forward_backward(x, y, micro_batch, dtype)
    backend.clip_gradients()  # optim.clip_grad_norm for optimizers that do not clip in their step
    backend.step()
    norm = backend.grad_norm(two) if grad_norm else None
    backend.zero_grad()
    return StepResult(backend.reduce_loss(total), two, norm)


@torch.no_grad()
def evaluate(backend: Backend, data: TokenDataset, global_batch: int, n_batches: int, dtype: str) -> float:
    """Global mean validation loss over the fixed batches ``0 … n_batches−1`` of the val split."""
    model = backend.model
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=backend.device)
    for i in range(n_batches):
        x, y = data.get_batch(i, global_batch, *backend.data_shard(), split="val")
        x, y = x.to(backend.device), y.to(backend.device)
        total += backend.eval_loss(x, y, dtype)
    model.train(was_training)
    return float(backend.reduce_loss(total / n_batches))


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=False)


def train(cfg: RunConfig, *, optimizer_factory: OptimizerFactory | None = None, log: Callable[[str], None] = print,
          stop: StopRequest | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.steps`` (or ``train.stop_after``) and return a summary.

    Writes into ``train.out_dir``: ``metrics.jsonl``, ``loss.png``, ``summary.json``,
    ``rate_factors.png`` (LANTON: the layer × estimation-step heat map of its rate factors),
    ``tensorboard/`` (with ``logging.tensorboard``),
    ``checkpoints/step_*`` (every ``checkpoint_every`` steps and at the end; the newest
    ``keep_checkpoints`` are kept) and, once all ``train.steps`` are done, ``COMPLETED``. With
    ``stop`` (a :class:`~lanton_dist.preemption.StopRequest`, asked once per step by every rank)
    a requested run checkpoints at the end of the current step and returns early. The summary
    has ``final_train_loss`` (mean of the last ``log_every`` steps), ``last_train_loss``,
    ``final_val_loss``, ``unigram_baseline``, ``steps`` (the last step run), ``tokens``,
    ``wall_s``, ``num_params``, ``skipped_steps``, ``stopped`` (on request) and the paths
    (``rate_factor_plot`` None for other optimizers). A run resumed at its last step trains
    nothing and evaluates the checkpoint, so ``final_val_loss`` is still reported.

    Raises :class:`~lanton_dist.config.ConfigError` for a config it cannot run or a resume
    that does not match its checkpoint (both before a model is built; also
    :class:`~lanton_dist.run_lock.RunLocked` when another run holds ``train.out_dir``),
    :class:`~lanton_dist.divergence.Diverged` after ``train.max_consecutive_skips`` bad steps, and
    :class:`~lanton_dist.checkpoint_dir.OutOfSpace` when a checkpoint save finds the disk full.
    """
    check_run_config(cfg, data_parallel_size(cfg))
    with run_lock.hold(cfg.train.out_dir, is_main=int(os.environ.get("RANK", "0")) == 0, say=log):
        return _train_locked(cfg, optimizer_factory, log, stop)


def _train_locked(cfg: RunConfig, optimizer_factory: OptimizerFactory | None, log: Callable[[str], None],
                  stop: StopRequest | None) -> dict[str, Any]:
    """:func:`train` while this run holds its directory's lock (:mod:`lanton_dist.run_lock`)."""
    t_cfg = cfg.train
    out = Path(t_cfg.out_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = checkpoint_dir.resume_point(cfg, log if is_main else (lambda _msg: None))
    seed_everything(t_cfg.seed)
    data = build_dataset(cfg.data, cfg.model.vocab_size)
    if cfg.parallel.backend == "megatron":  # each rank builds its own stage and TP shard of Megatron's model
        backend = setup_megatron_backend(cfg, optimizer_factory)
    else:
        model = Transformer(cfg.model, seed=t_cfg.seed, activation_checkpointing=t_cfg.activation_checkpointing)
        if t_cfg.compile:
            model.compile_blocks(t_cfg.compile_backend)
        backend = setup_backend(cfg, model, optimizer_factory)
    try:
        return _run(cfg, backend, data, out, log, stop, resume)
    finally:
        backend.close()


def _run(cfg: RunConfig, backend: Backend, data: TokenDataset, out: Path, log: Callable[[str], None],
         request: StopRequest | None, resume: tuple[Path, dict[str, Any]] | None) -> dict[str, Any]:
    t_cfg = cfg.train
    say = log if backend.is_main else (lambda _msg: None)
    opt = backend.optimizer
    sched = build_scheduler(opt, cfg.schedule.warmup_steps, t_cfg.steps, cfg.schedule.min_ratio)
    cfg_dict = to_dict(cfg)
    root = checkpoint_dir.root_of(out)
    stop = t_cfg.stop_after or t_cfg.steps
    dtype = t_cfg.dtype
    if dtype == "bf16" and backend.device.type != "cuda":
        say("train.dtype bf16 applies to CUDA only: running fp32 on CPU")

    start = 0
    resumed_from = None
    if resume is not None:
        path, loop = checkpoint_dir.intact_resume_point(
            cfg, resume, rank=backend.rank, world=backend.world, log=log, say=say,
            agree=functools.partial(any_rank, device=backend.device))
        if not backend.reshards and loop["world"] != backend.world:
            raise ConfigError(f"cannot resume from {path}: it was written by {loop['world']} {backend.name} ranks, this run "
                              f"has {backend.world}: {backend.name} checkpoints resume at the same world size (use "
                              "parallel.backend zero or fsdp2, whose DCP checkpoints reshard)")
        backend.load(path)
        checkpoint_dir.restore_scheduler(sched, loop["scheduler"])
        checkpoint_dir.load_rng(path, backend.rank)
        start = int(loop["step"])
        resumed_from = str(path)
        say(f"resumed from {path} at step {start}")

    metrics_path = out / "metrics.jsonl"
    metrics = MetricsLog(metrics_path, backend.is_main, start if resumed_from else None)
    board = TensorBoardLog(out / "tensorboard", backend.is_main and cfg.logging.tensorboard)
    if backend.is_main:
        (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        if start < t_cfg.steps:
            (out / COMPLETED).unlink(missing_ok=True)
    unigram = unigram_baseline(data.train, data.val, data.vocab_size)
    n_params = (
        backend.unwrap().num_params() if hasattr(backend.unwrap(), "num_params") else sum(p.numel() for p in backend.unwrap().parameters())
    )
    tokens_per_step = t_cfg.global_batch * cfg.data.seq_len
    say(
        f"{cfg.optim.name} | {n_params / 1e6:.2f}M params | {data.source} data: {data.train.numel():,} train / "
        f"{data.val.numel():,} val tokens | unigram baseline {unigram:.4f} nats | {stop - start} steps of "
        f"{tokens_per_step} tokens on {backend.device} (backend {backend.name}, world {backend.world})"
    )

    shape = RunShape.of(t_cfg.steps, tokens_per_step, model_flops_per_token(cfg.model, cfg.data.seq_len), backend.device,
                        backend.world, cfg.logging.peak_tflops)
    evaluating = bool(t_cfg.eval_every and t_cfg.eval_batches)
    val_loss = None
    if evaluating and (start == 0 or start == stop):
        # step 0; or a resumed run with no step left to run (killed after its last checkpoint):
        # evaluate the checkpoint so the summary is complete
        val_loss = evaluate(backend, data, t_cfg.global_batch, t_cfg.eval_batches, dtype)
        if start == 0:
            metrics.write({"step": 0, "tokens": 0, "val_loss": val_loss})
        say(f"step {start} | val {val_loss:.4f}")

    backend.model.train()
    guard = DivergenceGuard(t_cfg.max_consecutive_skips, backend.skipped_steps(), t_cfg.loss_spike_factor,
                            t_cfg.loss_spike_window)
    keeper = GoodCheckpoints(root, t_cfg.keep_checkpoints, is_main=backend.is_main, say=say)
    save = functools.partial(_save_checkpoint, backend, root, sched=sched, cfg_dict=cfg_dict)
    stopped = False
    bar = _progress(stop, start, backend.is_main and sys.stderr.isatty(), cfg.optim.name)
    emit = bar.write if not bar.disable else say  # one line per log step, on a terminal or not
    t_start = time.perf_counter()
    window = Throughput(start)
    try:
        for s in range(start, stop):
            t0 = time.perf_counter()
            step = s + 1
            logging_step = step % t_cfg.log_every == 0 or step == t_cfg.steps
            x, y = data.get_batch(s, t_cfg.global_batch, *backend.data_shard())
            x, y = x.to(backend.device), y.to(backend.device)
            lrs = group_lrs(opt)
            res = train_step(backend, x, y, t_cfg.micro_batch, dtype, grad_norm=logging_step)
            sched.step()
            loss = float(res.loss)
            rec: dict[str, Any] = {
                "step": step, "loss": loss, "lr": lrs, "tokens": step * tokens_per_step,
                "step_time": time.perf_counter() - t0, "skipped_steps": backend.skipped_steps(), "two_halves": res.two_halves,
            }
            if logging_step:
                norm = None if res.grad_norm is None else float(res.grad_norm)
                rec.update(shape.log_fields(window.lap(step, tokens_per_step), norm, backend.device), **window.progress(step, t_cfg.steps))
                diag = diagnostics_summary(opt)
                if diag is not None:
                    rec["lanton"] = diag
            if cfg.optim.name == "lanton" and step % cfg.optim.estimate_every == 0:
                layers = layer_record(opt)
                if layers is not None:
                    rec["layers"] = layers
            if evaluating and (step % t_cfg.eval_every == 0 or step == t_cfg.steps):
                t_eval = time.perf_counter()
                val_loss = evaluate(backend, data, t_cfg.global_batch, t_cfg.eval_batches, dtype)
                rec["val_loss"] = val_loss
                window.exclude(time.perf_counter() - t_eval)
            if logging_step or "val_loss" in rec:
                emit(format_line(rec, t_cfg.steps))
            metrics.write(rec)
            board.write(rec)
            if not math.isfinite(loss):
                say(f"step {step}: non-finite loss {loss}")
            try:
                guard.observe(step, rec["skipped_steps"], loss)  # same on every rank: the loss is global
            except Diverged as err:
                raise keeper.diverged(err) from None
            t_save = time.perf_counter()
            scheduled = bool(t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0)
            saved = keeper.after_step(step, guard.run, scheduled=scheduled, final=step == stop, save=functools.partial(save, step))
            if saved:
                window.exclude(time.perf_counter() - t_save)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if request is not None and step < stop and request.agreed(functools.partial(any_rank, device=backend.device)):
                say(f"step {step}: stop requested: checkpointing and exiting")
                if not saved:
                    keeper.after_step(step, guard.run, scheduled=False, final=True, save=functools.partial(save, step))
                stopped, stop = True, step
                break
    finally:
        bar.close()
        metrics.close()
        board.close()
    wall = time.perf_counter() - t_start
    backend.barrier()
    if backend.is_main and stop == t_cfg.steps and not stopped:
        (out / COMPLETED).write_text(f"{stop}\n")
    return _summarize(cfg, backend, out, metrics_path, unigram, n_params, stop, wall, resumed_from, val_loss, stopped,
                      say)


def _save_checkpoint(backend: Backend, root: Path, step: int, keep: int | None, *, sched: Any,
                     cfg_dict: dict[str, Any]) -> Path:
    """Checkpoint ``step`` atomically: the backend's files, every rank's RNG state, ``loop.json``;
    then prune to the newest ``keep`` (None: not now)."""
    def write(directory: Path) -> None:
        backend.save(directory)
        checkpoint_dir.save_rng(directory, backend.rank)

    loop = {"step": step, "backend": backend.name, "world": backend.world, "config": cfg_dict,
            "scheduler": sched.state_dict(), "skipped_steps": backend.skipped_steps()}
    return checkpoint_dir.save(root, step, write, loop, rank=backend.rank, world=backend.world, barrier=backend.barrier,
                               keep_last=keep)


def _summarize(cfg, backend, out, metrics_path, unigram, n_params, stop, wall, resumed_from, val_loss, stopped,
               say) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "optimizer": cfg.optim.name, "steps": stop, "tokens": stop * cfg.train.global_batch * cfg.data.seq_len,
        "num_params": n_params, "unigram_baseline": unigram, "final_val_loss": val_loss, "wall_s": wall,
        "skipped_steps": backend.skipped_steps(), "resumed_from": resumed_from,
        "out_dir": str(out), "metrics": str(metrics_path),
        "checkpoint": str(checkpoint_dir.step_dir(checkpoint_dir.root_of(out), stop)),
        "plot": str(out / "loss.png"), "device": str(backend.device), "world": backend.world, "stopped": stopped,
    }
    if backend.is_main:
        records = read_metrics(metrics_path)
        train_losses = [r["loss"] for r in records if "loss" in r]
        tail = train_losses[-cfg.train.log_every :]
        summary["final_train_loss"] = sum(tail) / len(tail)
        summary["last_train_loss"] = train_losses[-1]
        title = f"{cfg.optim.name}: {cfg.model.n_layers}L d{cfg.model.dim} on {cfg.data.source}"
        plot_losses(records, out / "loss.png", title, unigram)
        heat = plot_rate_factors(records, out / "rate_factors.png", f"LANTON rate factor per layer\n{title}")
        summary["rate_factor_plot"] = None if heat is None else str(heat)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        val = f"{val_loss:.4f}" if val_loss is not None else "n/a"
        say(f"done: {stop} steps in {wall:.1f}s | train {summary['final_train_loss']:.4f} | val {val} | unigram {unigram:.4f} | {out}")
    return summary

