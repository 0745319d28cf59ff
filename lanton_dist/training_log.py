"""What a training run reports: the progress line, ``metrics.jsonl``, TensorBoard and LANTON's
rate-factor heat map, written by the one training loop (:mod:`lanton_dist.trainer`) for every
backend, so each stack prints the same line and writes the same fields.

Every ``train.log_every`` steps the main rank prints one line (plain ``print``-style text, so it
lands in a Slurm log as well as on a terminal; wrapped here)::

    step 40/300 | loss 2.3141 | lr 4.95e-02 | 21,733 tok/s | grad 0.812 | skipped 0 | mem 0.31 GiB (max RSS) | MFU n/a
        | elapsed 0:01:02 | ETA 0:06:43

(``lr``: the first parameter group's, ``hidden`` for LANTON; every group's is in the record) and
the record of that step in ``metrics.jsonl`` carries the same numbers under :data:`LOG_FIELDS`:

* ``tokens_per_s``: global tokens of the steps since the previous log line over their wall time.
* ``grad_norm``: the global L2 norm of the gradient the optimizer step used
  (:meth:`lanton_dist.backends.Backend.grad_norm`; None where it is not measured).
* ``peak_mem_gib``: :func:`torch.cuda.max_memory_allocated` of this rank's GPU, or on CPU the
  process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); ``mem_kind``
  says which (``cuda_allocated`` / ``max_rss``).
* ``mfu``: model FLOP utilisation, ``flops_per_token · tokens_per_s / (world · peak)``, with
  :func:`flops_per_token` (``6·N + 12·L·d·T``) and ``peak`` the dense bf16 FLOP/s of one device
  (``logging.peak_tflops``, else :data:`PEAK_TFLOPS` by CUDA device name); None (printed ``n/a``)
  on CPU or an unknown GPU without ``logging.peak_tflops``.
* ``elapsed_s``: wall seconds since this process's training loop started (a resumed run counts
  from its resume), evaluations and checkpoints included; ``eta_s``: the seconds the steps left
  to ``train.steps`` take at the mean pace of the steps so far (:meth:`Throughput.progress`;
  evaluations and checkpoints included, since they recur). Printed as ``H:MM:SS`` (``Nd H:MM:SS``
  past a day).

LANTON's per-layer diagnostics (H, α, rate factor of every layer) are recorded under
``layers`` at every estimation step (:func:`layer_record`: the values in force after that
step; with ``parallel.overlap`` an estimate is applied one step late, so it shows in the next
column); :func:`plot_rate_factors` draws them as a layer × step heat map at the end of a run.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lanton_dist.config import ModelConfig

__all__ = ["LOG_FIELDS", "PEAK_TFLOPS", "MetricsLog", "RunShape", "Throughput", "TensorBoardLog", "duration", "flops_per_token",
           "format_line",
           "layer_record", "model_flops_per_token", "peak_memory", "peak_tflops", "plot_rate_factors", "read_metrics"]

#: Dense bf16 tensor-core peak of one device in TFLOP/s, by a substring of
#: ``torch.cuda.get_device_name()`` (first match wins; vendor datasheets, SXM parts).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("V100", 125.0),
)
#: The metrics.jsonl fields of a log line (besides step, loss, lr, skipped_steps).
LOG_FIELDS: tuple[str, ...] = ("tokens_per_s", "grad_norm", "peak_mem_gib", "mem_kind", "mfu", "elapsed_s", "eta_s")


# ============================================================================ metrics.jsonl
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


# ============================================================================ the numbers
def flops_per_token(n_matmul_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6·N + 12·L·d·T``.

    ``N``: parameters that take part in matrix products (all but the token-embedding table,
    which is a lookup); ``6·N``: 2 FLOPs per multiply-add, forward plus twice that backward.
    ``12·L·d·T``: the attention scores ``QKᵀ`` and the weighted sum ``AV`` (``2·2·T·d`` per
    layer and token forward, ×3 with backward) for ``L`` layers of width ``d`` at sequence
    length ``T`` (causal masking not discounted, as in the PaLM appendix B count).
    """
    return 6.0 * n_matmul_params + 12.0 * n_layers * dim * seq_len


def model_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """:func:`flops_per_token` of the LLaMA of ``model`` (the library's and Megatron's are the same
    architecture), counted on a meta-device copy: ``N`` = its matrices but the token-embedding table."""
    from lanton_dist.model import Transformer

    with torch.device("meta"):
        net = Transformer(model)
    n = sum(p.numel() for p in net.parameters() if p.ndim >= 2) - net.tok_embeddings.weight.numel()
    return flops_per_token(n, model.n_layers, model.dim, seq_len)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """Peak dense TFLOP/s of one ``device``: ``override`` when > 0, else :data:`PEAK_TFLOPS` by
    CUDA device name; None on CPU or for a GPU not in the table."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """This process's peak memory in GiB and its kind: ``cuda_allocated``
    (:func:`torch.cuda.max_memory_allocated` of ``device``) or ``max_rss`` (peak resident set
    size of the process, ``getrusage`` — KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "max_rss"


class Throughput:
    """Tokens per second over the window since the previous :meth:`lap` (wall clock, less the
    time passed to :meth:`exclude`: evaluation and checkpoints), and the run's elapsed time and
    ETA since it was made at ``step`` (:meth:`progress`)."""

    def __init__(self, step: int) -> None:
        self._step, self._t, self._excluded = step, time.perf_counter(), 0.0
        self._start_step, self._t0 = step, self._t

    def progress(self, step: int, steps: int) -> dict[str, float | None]:
        """``elapsed_s``: wall seconds since construction (everything included); ``eta_s``: the
        ``steps - step`` steps left at the mean seconds per step since construction (None
        before the first step)."""
        elapsed = time.perf_counter() - self._t0
        done = step - self._start_step
        return {"elapsed_s": elapsed, "eta_s": elapsed / done * max(steps - step, 0) if done > 0 else None}

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of the current window out of the rate."""
        self._excluded += seconds

    def lap(self, step: int, tokens_per_step: int) -> float:
        """Global tokens/s of the steps ``(previous lap, step]``; starts the next window."""
        now = time.perf_counter()
        rate = (step - self._step) * tokens_per_step / max(now - self._t - self._excluded, 1e-9)
        self._step, self._t, self._excluded = step, now, 0.0
        return rate


@dataclass(frozen=True)
class RunShape:
    """What the log line needs to know about a run: its length, tokens per step, FLOPs per
    token and the job's peak FLOP/s (None where unknown: MFU is then not reported)."""

    steps: int
    tokens_per_step: int
    flops_per_token: float
    job_peak_flops: float | None

    @classmethod
    def of(cls, steps: int, tokens_per_step: int, flops: float, device: torch.device, world: int,
           override_tflops: float = 0.0) -> "RunShape":
        tf = peak_tflops(device, override_tflops)
        return cls(steps, tokens_per_step, flops, None if tf is None else tf * 1e12 * world)

    def log_fields(self, tokens_per_s: float, grad_norm: float | None, device: torch.device) -> dict[str, Any]:
        """The :data:`LOG_FIELDS` of a log step."""
        mem, kind = peak_memory(device)
        mfu = None if self.job_peak_flops is None else self.flops_per_token * tokens_per_s / self.job_peak_flops
        return {"tokens_per_s": tokens_per_s, "grad_norm": grad_norm, "peak_mem_gib": mem, "mem_kind": kind, "mfu": mfu}


def duration(seconds: float) -> str:
    """``H:MM:SS`` of ``seconds`` (rounded down), ``Nd H:MM:SS`` from a day on."""
    s = int(max(seconds, 0.0))
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def format_line(rec: dict[str, Any], steps: int) -> str:
    """The progress line of a step record (see the module doc): step, loss and lr; the
    :data:`LOG_FIELDS` when it has them (a log step); its validation loss when evaluated."""
    lr = rec["lr"]
    lr0 = next(iter(lr.values())) if isinstance(lr, dict) else (lr[0] if isinstance(lr, (list, tuple)) else lr)
    grad = "n/a" if rec.get("grad_norm") is None else f"{rec['grad_norm']:.4g}"
    mfu = "n/a" if rec.get("mfu") is None else f"{100 * rec['mfu']:.1f}%"
    mem = f"{rec.get('peak_mem_gib', 0.0):.2f} GiB ({'max RSS' if rec.get('mem_kind') == 'max_rss' else 'CUDA peak'})"
    line = f"step {rec['step']}/{steps} | loss {rec['loss']:.4f} | lr {lr0:.3e}"
    if "tokens_per_s" in rec:
        line += (f" | {rec['tokens_per_s']:,.0f} tok/s | grad {grad} | skipped {rec['skipped_steps']} | mem {mem} | "
                 f"MFU {mfu}")
    if "elapsed_s" in rec:
        eta = "n/a" if rec.get("eta_s") is None else duration(rec["eta_s"])
        line += f" | elapsed {duration(rec['elapsed_s'])} | ETA {eta}"
    if rec.get("val_loss") is not None:
        line += f" | val {rec['val_loss']:.4f}"
    return line


# ============================================================================ LANTON diagnostics
def layer_record(opt: torch.optim.Optimizer) -> dict[str, list] | None:
    """LANTON's per-layer diagnostics as parallel lists ``names, geometry, H, alpha, lr_factor``
    (None for an optimizer without ``layer_diagnostics`` or before its first estimate)."""
    if not hasattr(opt, "layer_diagnostics"):
        return None
    rows = opt.layer_diagnostics()
    if not rows:
        return None
    return {"names": [r["name"] for r in rows], "geometry": [r["geometry"] for r in rows],
            "H": [r["H"] for r in rows], "alpha": [r["alpha"] for r in rows], "lr_factor": [r["lr_factor"] for r in rows]}


def plot_rate_factors(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Heat map of LANTON's rate factors, one row per layer and one column per estimation step
    (the ``layers`` entries of ``records``), one PNG at ``path``; None when no record has them."""
    rows = [r for r in records if "layers" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = rows[-1]["layers"]["names"]
    index = {n: i for i, n in enumerate(names)}
    grid = np.full((len(names), len(rows)), np.nan)
    for j, r in enumerate(rows):
        for n, f in zip(r["layers"]["names"], r["layers"]["lr_factor"]):
            if n in index:
                grid[index[n], j] = f
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, min(6 + 0.1 * len(rows), 14)), min(2.5 + 0.22 * len(names), 16)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.nanmax(grid))))
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    labels = [n.removesuffix(".weight") for n in names]
    ax.set_yticks(range(len(names)), labels, fontsize=max(4, min(8, int(400 / max(len(names), 1)))))
    ax.set_xlabel("step (estimation steps)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="rate factor (layer lr / group lr)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================ TensorBoard
class TensorBoardLog:
    """Scalars of every record into ``<out>/tensorboard`` (``logging.tensorboard: true``; main
    rank). Needs the ``tensorboard`` package (``pip install lanton-dist[tensorboard]``)."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self._w = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("logging.tensorboard is true but the tensorboard package is not installed: "
                               "pip install 'lanton-dist[tensorboard]' (or set logging.tensorboard false)") from exc
        self._w = SummaryWriter(str(directory))

    def write(self, record: dict[str, Any]) -> None:
        if self._w is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key == "lr" and isinstance(value, dict):
                for g, v in value.items():
                    self._w.add_scalar(f"lr/{g}", v, step)
            elif key == "layers":
                for n, f in zip(value["names"], value["lr_factor"]):
                    self._w.add_scalar(f"rate_factor/{n}", f, step)
            elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._w.add_scalar(key, value, step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
