#!/usr/bin/env python
"""Optimizer-step time of LANTON, Scion, D-Muon and AdamW side by side, and LANTON's extra time
per estimation interval k and nuclear-norm estimator.

    python launch/bench_overhead.py [--dim 256 --n-layers 4 ...] [--steps 40] [--out runs/bench_overhead.json]
    python launch/bench_overhead.py --device cuda --backend nccl --dim 4096 --ffn-dim 11008 --n-layers 2

One process. A LLaMA-shaped model (:class:`lanton_dist.model.Transformer`; default d=256,
4 blocks, SwiGLU width 688 = 2.6875·d as LLaMA-7B's 11008/4096, 8000 tokens — LLaMA's shapes
scaled down to run on a CPU) is copied once per configuration; every configuration gets the
same seeded random gradients (drawn outside the timed region) and only ``optimizer.step()`` is
timed. Configurations are run **interleaved** (step s of every configuration before step s+1 of
any), so a change in machine load hits all of them alike.

Configurations: ``adamw``, ``dmuon``, ``scion``, and ``lanton`` for every k in ``--ks`` and
estimator in ``--estimators`` (``exact`` = fp32 svdvals, the CPU default; ``ns`` = ⟨D, polar(D)⟩
with the Gram-norm start, 6 Polar Express steps and 1 cubic step (``nuclear.NS_ESTIMATE``); ``rsvd`` = rank 16, 2 power iterations).
The single-process reference optimizers of :func:`lanton_dist.factory.build_optimizer` are used,
so this measures the algorithms, not communication (see ``lanton-dist plan`` / ``profile`` for that).
``--device cuda`` puts the model, gradients and optimizer state on ``cuda:<LOCAL_RANK>`` (0
by default) and times each step between ``torch.cuda.synchronize()`` calls. ``--backend``
names the process-group backend of the device (``nccl`` needs ``--device cuda``) and is
checked like ``bench_comm.py``'s so both benchmarks take the same command line; this
benchmark is one process with no collectives, so the backend is recorded, not used.

Printed per configuration: mean step time over the measured steps and its ratio to D-Muon; for
LANTON also the mean of estimation and of plain steps and the extra time per step over Scion
(the same update without noise adaptation). The JSON holds every step time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "launch"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from lanton_dist.config import ModelConfig, OptimConfig  # noqa: E402
from lanton_dist.factory import build_optimizer  # noqa: E402
from lanton_dist.model import Transformer  # noqa: E402
from lanton_dist.noise import is_estimation_step  # noqa: E402


@dataclass
class Config:
    """One benchmarked optimizer configuration."""

    name: str
    algorithm: str
    estimate_every: int = 10
    estimator: str = "exact"

    def optim(self) -> OptimConfig:
        return OptimConfig(name=self.algorithm, estimate_every=self.estimate_every, nuclear_estimator=self.estimator)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--ffn-dim", type=int, default=688)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--steps", type=int, default=40, help="measured steps per configuration (>= 2·max k is best)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them")
    p.add_argument("--ks", default="1,5,10,20")
    p.add_argument("--estimators", default="exact,ns,rsvd")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="checked and recorded (one process: no collectives)")
    p.add_argument("--out", default="runs/bench_overhead.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    from bench_comm import check_device

    check_device(p, args.device, args.backend, 1)
    return args


def device_of(args: argparse.Namespace) -> torch.device:
    """The benchmark's device: the CPU, or ``cuda:<LOCAL_RANK>`` made the current device."""
    if args.device == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def configurations(ks: list[int], estimators: list[str]) -> list[Config]:
    out = [Config("adamw", "adamw"), Config("dmuon", "dmuon"), Config("scion", "scion")]
    out += [Config(f"lanton k={k} {e}", "lanton", k, e) for e in estimators for k in ks]
    return out


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",") if k]
    estimators = [e for e in args.estimators.split(",") if e]
    bad = set(estimators) - {"exact", "ns", "rsvd"}
    if bad or any(k < 1 for k in ks):
        raise SystemExit(f"bad --ks/--estimators: {ks} {sorted(bad)}")
    cfg = ModelConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, ffn_dim=args.ffn_dim, max_seq_len=16)
    device = device_of(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = Transformer(cfg, seed=args.seed).to(device)
    configs = configurations(ks, estimators)
    runs = []
    for c in configs:
        model = copy.deepcopy(base)
        runs.append((c, model, [p for p in model.parameters()], build_optimizer(model, c.optim())))
    shapes = [p.shape for p in base.parameters()]
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    total = args.warmup + args.steps
    for step in range(total):
        gen = torch.Generator().manual_seed(args.seed * 100003 + step)
        grads = [(torch.randn(s, generator=gen) * 0.01).to(device) for s in shapes]
        for c, model, params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            elapsed = time.perf_counter() - start
            opt.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[c.name].append(elapsed)
        print(f"\rstep {step + 1}/{total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    first = args.warmup + 1  # 1-based optimizer step of the first measured step
    results = {}
    dm = statistics.fmean(times["dmuon"])
    scion = statistics.fmean(times["scion"])
    for c in configs:
        ts = times[c.name]
        row = {"algorithm": c.algorithm, "mean_s": statistics.fmean(ts), "median_s": statistics.median(ts),
               "ratio_to_dmuon": statistics.fmean(ts) / dm, "times_s": ts}
        if c.algorithm == "lanton":
            est = [t for i, t in enumerate(ts) if is_estimation_step(first + i, c.estimate_every)]
            plain = [t for i, t in enumerate(ts) if not is_estimation_step(first + i, c.estimate_every)]
            row.update(k=c.estimate_every, estimator=c.estimator, estimation_steps=len(est),
                       estimation_step_mean_s=statistics.fmean(est) if est else None,
                       plain_step_mean_s=statistics.fmean(plain) if plain else None,
                       extra_over_scion_s=statistics.fmean(ts) - scion,
                       extra_over_dmuon_ratio=statistics.fmean(ts) / dm - 1)
        results[c.name] = row
    n_params = sum(p.numel() for p in base.parameters())
    return {
        "model": cfg.__dict__,
        "params": n_params,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device),
        "backend": args.backend,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "results": results,
    }


def report(data: dict) -> str:
    lines = [f"{data['params'] / 1e6:.2f}M params (d={data['model']['dim']}, {data['model']['n_layers']} blocks), "
             f"{data['steps']} measured steps, {data['threads']} threads, torch {data['torch']}"]
    for name, r in data["results"].items():
        line = f"{name:<22} mean {r['mean_s'] * 1e3:8.2f} ms   x{r['ratio_to_dmuon']:5.2f} D-Muon"
        if r["algorithm"] == "lanton":
            est = r["estimation_step_mean_s"]
            plain = r["plain_step_mean_s"]
            line += (f"   estimation steps {'-' if est is None else f'{est * 1e3:.2f}'} ms (n={r['estimation_steps']}), plain "
                     f"{'-' if plain is None else f'{plain * 1e3:.2f}'} ms, extra over Scion {r['extra_over_scion_s'] * 1e3:+.2f} ms/step")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = run(args)
    print(report(data))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
