"""``make demo``: train the tiny LLaMA on the Python standard library's source with LANTON and
with D-Muon — same model, data, seed, steps and schedule; each with its own tuned rates —
then print both final validation losses next to the unigram baseline and write one
comparison plot and a JSON summary under ``--out`` (default ``runs/demo``). The LANTON run
also leaves its rate-factor heat map (layer × estimation step, ``lanton/rate_factors.png``).

    python launch/demo.py [--steps 300] [--out runs/demo] [--nproc 2] [--threads 1]

By default each run uses 2 CPU processes on the sharded engine (``parallel.backend zero``).

Each optimizer's run is one call of :func:`run_optimizer`, so a multi-process variant only
has to change how that call is launched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lanton_dist.config import load_run_config  # noqa: E402
from lanton_dist.trainer import read_metrics, train  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "llama-tiny-cpu.yaml"
# Per-optimizer overrides of the demo config, tuned by short sweeps on this config (300 steps,
# 2 CPU cores; see the config's comment). LANTON's rates (its LM head's own rate included) are
# the config's own; D-Muon's head is an AdamW layer at its embed_head rate.
DEMO_OVERRIDES: dict[str, list[str]] = {
    "lanton": ["--optim.name", "lanton"],
    "dmuon": ["--optim.name", "dmuon", "--optim.lr.hidden", "0.01", "--optim.lr.embed_head", "0.05", "--optim.lr.vector", "0.05",
              "--optim.lr.head", "0.05"],
}


def run_optimizer(name: str, *, steps: int, out: Path, config: Path = DEMO_CONFIG, extra: list[str] | None = None,
                  nproc: int = 1) -> dict[str, Any]:
    """Train the demo config with optimizer ``name`` into ``out/name``; the trainer's summary.

    ``nproc > 1`` runs it as ``torchrun --nproc-per-node nproc launch/train.py`` on the sharded
    engine (``parallel.backend zero``, gloo on CPU): the same global batches, split over ranks.
    """
    if name not in DEMO_OVERRIDES:
        raise ValueError(f"no tuned demo settings for optimizer {name!r}; choose from {sorted(DEMO_OVERRIDES)}")
    overrides = [*DEMO_OVERRIDES[name], "--train.steps", str(steps), "--train.out_dir", str(out / name), *(extra or [])]
    if nproc > 1:
        overrides += ["--parallel.backend", "zero"]
    cfg = load_run_config(config, overrides)
    if nproc > 1:
        summary = _torchrun(name, config, overrides, nproc, out / name)
    else:
        summary = train(cfg, log=lambda msg: print(f"[{name}] {msg}", flush=True))
    summary["lr"] = {"hidden": cfg.optim.lr.hidden, "embed_head": cfg.optim.lr.embed_head, "head": cfg.optim.lr.head,
                     "vector": cfg.optim.lr.vector}
    summary["overrides"] = overrides
    return summary


def _torchrun(name: str, config: Path, overrides: list[str], nproc: int, out: Path) -> dict[str, Any]:
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           str(ROOT / "launch" / "train.py"), "--config", str(config), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the trainer's own progress lines, prefixed
        if not line.startswith(("W1", "*****", "Setting OMP")) and line.strip():
            print(f"[{name}] {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{name}: torchrun exited with {proc.returncode}")
    return json.loads((out / "summary.json").read_text())


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the torchrun workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (for readable train curves)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_comparison(results: dict[str, dict[str, Any]], path: Path, unigram: float) -> Path:
    """Train (smoothed) and validation loss of every run against step, side by side, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, s in results.items():
        recs = read_metrics(s["metrics"])
        tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        line = ax_t.plot([t[0] for t in tr], smooth([t[1] for t in tr]), lw=1.5, label=name)[0]
        ax_v.plot(*zip(*va), "o-", lw=1.5, ms=3, color=line.get_color(), label=f"{name} (final {va[-1][1]:.3f})")
    for ax, title in ((ax_t, "train loss (EMA 0.9)"), (ax_v, "validation loss (held-out files)")):
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram baseline {unigram:.3f}")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_ylabel("loss (nats/byte)")
    upper = max(unigram + 1.0, 3.0)
    ax_t.set_ylim(top=upper)
    fig.suptitle("tiny LLaMA on the Python stdlib source: LANTON vs D-Muon (same seed, steps, schedule)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="output directory (default runs/demo)")
    ap.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config (default configs/llama-tiny-cpu.yaml)")
    ap.add_argument("--optimizers", nargs="+", default=["lanton", "dmuon"], choices=sorted(DEMO_OVERRIDES))
    ap.add_argument("--nproc", type=int, default=2,
                    help="CPU processes per run (default 2: the sharded engine under torchrun; 1: single process)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: this model's matmuls are too small to gain from more, "
                         "and on a busy machine extra threads slow it down many times; 0 keeps torch's default)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    results = {name: run_optimizer(name, steps=args.steps, out=args.out, config=args.config, nproc=args.nproc)
               for name in args.optimizers}
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    unigram = next(iter(results.values()))["unigram_baseline"]
    plot = plot_comparison(results, args.out / "comparison.png", unigram)
    summary = {
        "steps": args.steps, "tokens_per_run": next(iter(results.values()))["tokens"], "unigram_baseline": unigram,
        "total_wall_s": wall, "total_cpu_s": cpu, "threads": torch.get_num_threads(), "nproc": args.nproc, "plot": str(plot),
        "runs": {n: {k: s[k] for k in ("final_val_loss", "final_train_loss", "wall_s", "lr", "overrides", "num_params", "out_dir",
                                     "metrics", "plot", "rate_factor_plot")}
                 for n, s in results.items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'optimizer':<10} {'final val loss':>15} {'final train loss':>17} {'wall s':>8}")
    for n, s in results.items():
        print(f"{n:<10} {s['final_val_loss']:>15.4f} {s['final_train_loss']:>17.4f} {s['wall_s']:>8.1f}")
    print(f"unigram baseline (byte frequencies of the training files): {unigram:.4f} nats/byte")
    print(f"total {wall:.0f} s wall, {cpu:.0f} s CPU, {torch.get_num_threads()} thread(s)")
    print(f"comparison plot: {plot}")
    for n, s in results.items():
        if s.get("rate_factor_plot"):
            print(f"{n} rate factors per layer and step (heat map): {s['rate_factor_plot']}")
    print(f"summary: {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
