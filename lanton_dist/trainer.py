"""The training loop, as a library function: :func:`train`.

One loop for every execution backend. Everything that differs between single-process and
distributed training goes through one seam, :func:`setup_backend`, which returns a
:class:`Backend`: the module to run, the optimizer, this process's ``rank``/``world``, the
global-mean loss reduction, the gradient-sync context for accumulation, and checkpoint
save/load. ``parallel.backend: none`` (one process) is implemented here; ``zero`` (our
sharded engine), ``ddp`` and ``fsdp2`` live in :mod:`lanton_dist.backends` as :class:`Backend`
subclasses, and the loop does not change.

Per step ``s`` (0-based; the record written after it has ``step = s + 1``):

* rank ``r`` takes rows ``[r·b, (r+1)·b)`` of the deterministic global batch of step ``s``
  (:meth:`lanton_dist.data.TokenDataset.get_batch`, ``b = global_batch / world``);
* the rows are split into micro-batches of ``train.micro_batch`` rows (0: all ``b`` rows at
  once); each micro-batch's mean loss is weighted ``rows / b`` so the accumulated gradient is
  the gradient of the per-rank mean loss; the backend's reduction makes it the global mean;
* when the optimizer asks for Option II (``needs_two_half_batches()``), the rows are split into
  two halves — every micro-batch then lies in one half and its weight ``rows / b`` equals
  ``½ · rows / (b/2)``: each half's loss is weighted ½ — and ``stash_half_gradient()`` is
  called between the halves;
* optimizer step, scheduler step (linear warm-up + cosine), ``metrics.jsonl`` record.

Resuming (``train.resume: true``) loads the newest ``checkpoints/step_*`` in ``out_dir``:
model, optimizer and scheduler state, the step (which is also the data position, since
batches are functions of the step) and the RNG states — the continued run is bit-identical
to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lanton_dist.config import TRAINER_BACKENDS, OptimConfig, RunConfig, to_dict
from lanton_dist.data import TokenDataset, build_dataset, unigram_baseline
from lanton_dist.factory import build_optimizer
from lanton_dist.model import Transformer
from lanton_dist.preemption import COMPLETED, StopRequest, any_rank
from lanton_dist.schedule import build_scheduler

OptimizerFactory = Callable[[nn.Module, OptimConfig], torch.optim.Optimizer]
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step_(\d+)(\.pt)?$")
KEEP_CHECKPOINTS = 2
# Config entries a resumed run must share with the checkpoint it continues.
RESUME_MUST_MATCH: tuple[str, ...] = (
    "model", "data", "optim", "schedule", "train.steps", "train.global_batch", "train.seed",
)
# Param-group entries that are code objects, not state: kept from the live optimizer on load.
NON_STATE_GROUP_KEYS: tuple[str, ...] = ("specs",)


# ============================================================================ backend seam
class Backend:
    """How this process takes part in training. This base class is the single-process
    backend (``parallel.backend: none``); distributed backends subclass it.

    Attributes:
        model: the module the loop calls, ``(B, T) int64 → (B, T, V)`` logits (may be a wrapper).
        optimizer: the optimizer the scheduler drives.
        device: where batches go. rank, world: this process and the data-parallel size.
    """

    name = "none"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.rank = rank
        self.world = world

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

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def close(self) -> None:
        """Release process groups and the like."""

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: Path, extra: dict[str, Any]) -> None:
        """Write model, optimizer and ``extra`` (loop state) to ``path`` atomically (main only)."""
        if not self.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": self.unwrap().state_dict(), "optimizer": optimizer_state(self.optimizer), "extra": extra}
        tmp = path.with_name(f"tmp_{path.name}")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model and optimizer from ``path``; return the ``extra`` given to :meth:`save`."""
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.unwrap().load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        return ckpt["extra"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def setup_backend(cfg: RunConfig, model: nn.Module, optimizer_factory: OptimizerFactory | None = None) -> Backend:
    """The :class:`Backend` of ``cfg.parallel.backend`` for ``model`` (built on CPU from the seed).

    The one place that knows about process groups and wrappers: it places the model, builds
    the optimizer with ``optimizer_factory(model, cfg.optim)`` and reports rank/world.
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
        return Backend(model, factory(model, cfg.optim), device)
    if name in TRAINER_BACKENDS[1:]:
        from lanton_dist.backends import setup_distributed_backend

        return setup_distributed_backend(cfg, model, factory)
    if name == "megatron":
        raise ValueError("parallel.backend 'megatron' trains Megatron-core's GPTModel: launch it with "
                         f"launch/pretrain_llama.py; this loop supports {TRAINER_BACKENDS}")
    raise ValueError(f"unsupported parallel.backend {name!r}; supported backends: {TRAINER_BACKENDS}")


# ============================================================================ state helpers
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


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``out_dir``, oldest first."""
    d = out_dir / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _config_value(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def check_resume_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ``ValueError`` listing :data:`RESUME_MUST_MATCH` entries that differ."""
    diff = [k for k in RESUME_MUST_MATCH if _config_value(saved, k) != _config_value(current, k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {_config_value(saved, k)!r} vs now {_config_value(current, k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the run config differs from the checkpoint's in {diff} ({detail})")


def validate(cfg: RunConfig) -> None:
    """Clear errors for settings the loop cannot run."""
    t = cfg.train
    if t.steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {t.steps}")
    if t.global_batch < 1:
        raise ValueError(f"train.global_batch must be >= 1, got {t.global_batch}")
    for name in ("micro_batch", "eval_every", "eval_batches", "checkpoint_every", "stop_after"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.log_every < 1:
        raise ValueError(f"train.log_every must be >= 1, got {t.log_every}")
    if t.stop_after > t.steps:
        raise ValueError(f"train.stop_after ({t.stop_after}) cannot exceed train.steps ({t.steps})")
    if t.dtype not in ("fp32", "bf16"):
        raise ValueError(f"train.dtype must be fp32 or bf16, got {t.dtype!r}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_seq_len {cfg.model.max_seq_len}")
    if cfg.schedule.warmup_steps < 0 or not 0.0 <= cfg.schedule.min_ratio <= 1.0:
        raise ValueError(f"schedule needs warmup_steps >= 0 and 0 <= min_ratio <= 1, got {cfg.schedule}")


def micro_slices(rows: int, micro: int, halves: int) -> list[list[slice]]:
    """Row slices of a ``rows``-row batch: ``halves`` (1 or 2) lists of micro-batch slices."""
    if rows % halves:
        raise ValueError(f"Option II splits each rank's batch in two halves, but it has {rows} rows (odd); use an even global_batch / world")
    per_half = rows // halves
    micro = min(micro or per_half, per_half)
    if per_half % micro:
        raise ValueError(f"train.micro_batch {micro} does not divide the {per_half} rows of each (half-)batch")
    return [[slice(h * per_half + i, h * per_half + i + micro) for i in range(0, per_half, micro)] for h in range(halves)]


# ============================================================================ metrics
class MetricsLog:
    """``metrics.jsonl`` writer (main rank only); on resume keeps the records up to the resumed step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w")
        for ln in kept:
            self._f.write(ln + "\n")
        self._f.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def diagnostics_summary(opt: torch.optim.Optimizer) -> dict[str, dict[str, float]] | None:
    """Per geometry group: min/max of LANTON's ``lr_factor`` and ``H`` (None for other optimizers)."""
    if not hasattr(opt, "layer_diagnostics"):
        return None
    out: dict[str, dict[str, float]] = {}
    for row in opt.layer_diagnostics():
        s = out.setdefault(row["geometry"], {"lr_factor_min": math.inf, "lr_factor_max": -math.inf, "H_min": math.inf, "H_max": -math.inf, "layers": 0})
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
def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    backend: Backend, x: torch.Tensor, y: torch.Tensor, micro_batch: int, dtype: str
) -> tuple[torch.Tensor, bool]:
    """Forward/backward of this rank's rows ``x, y`` ``(b, T)`` and one optimizer step.

    Returns the global mean loss (scalar tensor) and whether the batch ran as two halves.
    """
    opt = backend.optimizer
    two = bool(getattr(opt, "needs_two_half_batches", lambda: False)())
    rows = x.shape[0]
    halves = micro_slices(rows, micro_batch, 2 if two else 1)
    total = torch.zeros((), device=backend.device)
    for h, slices in enumerate(halves):
        for i, sl in enumerate(slices):
            xb, yb = x[sl], y[sl]
            with backend.sync_context(i == len(slices) - 1), _autocast(backend.device, dtype):
                logits = backend.model(xb)
                loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten())
                weighted = loss * (xb.shape[0] / rows)
                backend.backward(weighted)
            total += weighted.detach()
        if two and h == 0:
            opt.stash_half_gradient()
    backend.step()
    backend.zero_grad()
    return backend.reduce_loss(total), two


@torch.no_grad()
def evaluate(backend: Backend, data: TokenDataset, global_batch: int, n_batches: int, dtype: str) -> float:
    """Global mean validation loss over the fixed batches ``0 … n_batches−1`` of the val split."""
    model = backend.model
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=backend.device)
    for i in range(n_batches):
        x, y = data.get_batch(i, global_batch, backend.rank, backend.world, split="val")
        x, y = x.to(backend.device), y.to(backend.device)
        with _autocast(backend.device, dtype):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    model.train(was_training)
    return float(backend.reduce_loss(total / n_batches))


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=False)


def train(cfg: RunConfig, *, optimizer_factory: OptimizerFactory | None = None, log: Callable[[str], None] = print,
          stop: StopRequest | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.steps`` (or ``train.stop_after``) and return a summary.

    Writes into ``train.out_dir``: ``metrics.jsonl``, ``loss.png``, ``summary.json``,
    ``checkpoints/step_*.pt`` (every ``checkpoint_every`` steps and at the end) and, once all
    ``train.steps`` are done, ``COMPLETED``. With ``stop`` (a
    :class:`~lanton_dist.preemption.StopRequest`, asked once per step by every rank) a
    requested run checkpoints at the end of the current step and returns early. The summary
    has ``final_train_loss`` (mean of the last ``log_every`` steps), ``last_train_loss``,
    ``final_val_loss``, ``unigram_baseline``, ``steps`` (the last step run), ``tokens``,
    ``wall_s``, ``num_params``, ``skipped_steps``, ``stopped`` (on request) and the paths.
    """
    validate(cfg)
    t_cfg = cfg.train
    out = Path(t_cfg.out_dir)
    seed_everything(t_cfg.seed)
    data = build_dataset(cfg.data, cfg.model.vocab_size)
    model = Transformer(cfg.model, seed=t_cfg.seed)
    backend = setup_backend(cfg, model, optimizer_factory)
    try:
        return _run(cfg, backend, data, out, log, stop)
    finally:
        backend.close()


def _run(cfg: RunConfig, backend: Backend, data: TokenDataset, out: Path, log: Callable[[str], None],
         request: StopRequest | None) -> dict[str, Any]:
    t_cfg = cfg.train
    say = log if backend.is_main else (lambda _msg: None)
    if t_cfg.global_batch % backend.world:
        raise ValueError(f"train.global_batch {t_cfg.global_batch} is not divisible by the world size {backend.world}")
    opt = backend.optimizer
    sched = build_scheduler(opt, cfg.schedule.warmup_steps, t_cfg.steps, cfg.schedule.min_ratio)
    cfg_dict = to_dict(cfg)
    stop = t_cfg.stop_after or t_cfg.steps
    dtype = t_cfg.dtype
    if dtype == "bf16" and backend.device.type != "cuda":
        say("train.dtype bf16 applies to CUDA only: running fp32 on CPU")

    start = 0
    resumed_from = None
    if t_cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            say(f"resume: no checkpoint in {out / CHECKPOINT_DIR}, starting from step 0")
        else:
            extra = backend.load(ckpt)
            check_resume_config(extra["config"], cfg_dict)
            sched.load_state_dict(extra["scheduler"])
            set_rng_state(extra["rng"])
            start = int(extra["step"])
            if int(extra["data_step"]) != start:
                raise ValueError(f"{ckpt}: data position {extra['data_step']} != step {start}")
            resumed_from = str(ckpt)
            say(f"resumed from {ckpt} at step {start}")
    if start > stop:
        raise ValueError(f"checkpoint step {start} is past the stop step {stop}")

    metrics_path = out / "metrics.jsonl"
    metrics = MetricsLog(metrics_path, backend.is_main, start if resumed_from else None)
    if backend.is_main:
        (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        if start < t_cfg.steps:
            (out / COMPLETED).unlink(missing_ok=True)
    unigram = unigram_baseline(data.train, data.val, data.vocab_size)
    n_params = backend.unwrap().num_params() if hasattr(backend.unwrap(), "num_params") else sum(p.numel() for p in backend.unwrap().parameters())
    tokens_per_step = t_cfg.global_batch * cfg.data.seq_len
    say(
        f"{cfg.optim.name} | {n_params / 1e6:.2f}M params | {data.source} data: {data.train.numel():,} train / "
        f"{data.val.numel():,} val tokens | unigram baseline {unigram:.4f} nats | {stop - start} steps of "
        f"{tokens_per_step} tokens on {backend.device} (backend {backend.name}, world {backend.world})"
    )

    val_loss = None
    if start == 0 and t_cfg.eval_every and t_cfg.eval_batches:
        val_loss = evaluate(backend, data, t_cfg.global_batch, t_cfg.eval_batches, dtype)
        metrics.write({"step": 0, "tokens": 0, "val_loss": val_loss})
        say(f"step 0 | val {val_loss:.4f}")

    backend.model.train()
    stopped = False
    bar = _progress(stop, start, backend.is_main and sys.stderr.isatty(), cfg.optim.name)
    t_start = time.perf_counter()
    try:
        for s in range(start, stop):
            t0 = time.perf_counter()
            x, y = data.get_batch(s, t_cfg.global_batch, backend.rank, backend.world)
            x, y = x.to(backend.device), y.to(backend.device)
            lrs = group_lrs(opt)
            loss_t, two = train_step(backend, x, y, t_cfg.micro_batch, dtype)
            sched.step()
            loss = float(loss_t)
            step = s + 1
            rec: dict[str, Any] = {
                "step": step, "loss": loss, "lr": lrs, "tokens": step * tokens_per_step,
                "step_time": time.perf_counter() - t0, "skipped_steps": int(getattr(opt, "skipped_steps", 0)),
                "two_halves": two,
            }
            if step % t_cfg.log_every == 0 or step == t_cfg.steps:
                diag = diagnostics_summary(opt)
                if diag is not None:
                    rec["lanton"] = diag
            if t_cfg.eval_every and t_cfg.eval_batches and (step % t_cfg.eval_every == 0 or step == t_cfg.steps):
                val_loss = evaluate(backend, data, t_cfg.global_batch, t_cfg.eval_batches, dtype)
                rec["val_loss"] = val_loss
                (bar.write if not bar.disable else say)(f"step {step} | train {loss:.4f} | val {val_loss:.4f}")
            metrics.write(rec)
            if not math.isfinite(loss):
                say(f"step {step}: non-finite loss {loss}")
            saved = (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or step == stop
            if saved:
                _save_checkpoint(backend, out, step, sched, cfg_dict)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if request is not None and step < stop and request.agreed(functools.partial(any_rank, device=backend.device)):
                say(f"step {step}: stop requested: checkpointing and exiting")
                if not saved:
                    _save_checkpoint(backend, out, step, sched, cfg_dict)
                stopped, stop = True, step
                break
    finally:
        bar.close()
        metrics.close()
    wall = time.perf_counter() - t_start
    backend.barrier()
    if backend.is_main and stop == t_cfg.steps and not stopped:
        (out / COMPLETED).write_text(f"{stop}\n")
    return _summarize(cfg, backend, out, metrics_path, unigram, n_params, stop, wall, resumed_from, val_loss, stopped,
                      say)


def _save_checkpoint(backend: Backend, out: Path, step: int, sched: Any, cfg_dict: dict[str, Any]) -> None:
    extra = {"step": step, "data_step": step, "scheduler": sched.state_dict(), "rng": rng_state(), "config": cfg_dict}
    backend.save(checkpoint_path(out, step), extra)
    backend.barrier()
    if backend.is_main:
        for _, old in list_checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def _summarize(cfg, backend, out, metrics_path, unigram, n_params, stop, wall, resumed_from, val_loss, stopped,
               say) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "optimizer": cfg.optim.name, "steps": stop, "tokens": stop * cfg.train.global_batch * cfg.data.seq_len,
        "num_params": n_params, "unigram_baseline": unigram, "final_val_loss": val_loss, "wall_s": wall,
        "skipped_steps": int(getattr(backend.optimizer, "skipped_steps", 0)), "resumed_from": resumed_from,
        "out_dir": str(out), "metrics": str(metrics_path), "checkpoint": str(checkpoint_path(out, stop)),
        "plot": str(out / "loss.png"), "device": str(backend.device), "world": backend.world, "stopped": stopped,
    }
    if backend.is_main:
        records = read_metrics(metrics_path)
        train_losses = [r["loss"] for r in records if "loss" in r]
        tail = train_losses[-cfg.train.log_every :]
        summary["final_train_loss"] = sum(tail) / len(tail)
        summary["last_train_loss"] = train_losses[-1]
        plot_losses(records, out / "loss.png", f"{cfg.optim.name}: {cfg.model.n_layers}L d{cfg.model.dim} on {cfg.data.source}", unigram)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        val = f"{val_loss:.4f}" if val_loss is not None else "n/a"
        say(f"done: {stop} steps in {wall:.1f}s | train {summary['final_train_loss']:.4f} | val {val} | unigram {unigram:.4f} | {out}")
    return summary

