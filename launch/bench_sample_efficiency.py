"""Sample efficiency: LANTON vs Scion vs D-Muon vs AdamW on the tiny LLaMA, same tokens and schedule.

Protocol (every number comes from runs made by this script):

1. Model, data, token budget and schedule are those of ``configs/llama-tiny-cpu.yaml`` (0.8M
   parameters, the Python standard library's source as bytes, ``--steps`` steps of 16 × 128
   tokens, linear warm-up then cosine decay); only ``optim`` differs between optimizers.
   Scion is LANTON's own update with ``noise_adaptive=False``: the fixed-rate geometry
   LANTON is built on.
2. Tuning: on seed ``--tune-seed`` each optimizer runs its base rates (:data:`BASE_LRS`, all
   three group rates together) times each multiplier of ``--grid``; while the best final
   validation loss sits at an edge of the grid, the grid is extended by one more factor of 2
   in that direction (at most ``--max-extend`` times), so no optimizer is judged at a rate
   the grid cut off.
3. Evaluation: the best multiplier of each optimizer runs on ``--seeds`` (held out from
   tuning; a seed sets the model initialisation and the batch order, and is shared by all
   optimizers, so comparisons are paired).
4. Report: validation-loss curves (mean and min–max band over seeds, PNG); final validation
   loss mean ± std; and, for each baseline, the step at which LANTON's seed-mean curve first
   reaches the baseline's final mean loss (linear interpolation between evaluations) divided
   into the step at which the baseline's own curve first reaches it — LANTON's speed-up — or,
   when LANTON never reaches it, the baseline's speed-up to LANTON's final loss. The same
   ratio per seed (paired) gives its range. Caveat: with a cosine schedule the last steps
   gain most, so "steps to reach a loss" inside one schedule is not the budget a shorter run
   would need; the final losses at equal budget are the primary result.

Runs go to ``--out/runs/<optimizer>_x<mult>_s<seed>`` (the trainer's metrics.jsonl and
summary.json); a run whose summary exists with the same config is reused, so an interrupted
benchmark resumes. Results: ``--out/sample_efficiency.json`` and ``--out/sample_efficiency.png``.

    python launch/bench_sample_efficiency.py --out runs/sample_efficiency [--steps 300] [--jobs 2]

Arguments not listed below are config overrides for every run (``--model.dim 64``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "llama-tiny-cpu.yaml"
OPTIMIZERS = ("lanton", "scion", "dmuon", "adamw")
# Base (hidden, embed_head, vector) rates, multiplied by the grid: LANTON's and D-Muon's are the
# centres of the sweeps recorded in the config's header; Scion starts from LANTON's (same
# update); AdamW from a common small-LLaMA rate. For dmuon embed_head/vector are AdamW rates.
BASE_LRS: dict[str, tuple[float, float, float]] = {
    "lanton": (0.05, 0.1, 0.01),
    "scion": (0.05, 0.1, 0.01),
    "dmuon": (0.01, 0.05, 0.05),
    "adamw": (0.004, 0.004, 0.004),
}


# ============================================================================ one run
def run_overrides(name: str, mult: float, seed: int, steps: int, eval_every: int, extra: list[str]) -> list[str]:
    """Config overrides of one run (on top of :data:`CONFIG`)."""
    h, e, v = (mult * x for x in BASE_LRS[name])
    return ["--optim.name", name, "--optim.lr.hidden", repr(h), "--optim.lr.embed_head", repr(e),
            "--optim.lr.vector", repr(v), "--train.steps", str(steps), "--train.eval_every", str(eval_every),
            "--train.seed", str(seed), "--data.seed", str(seed), "--train.log_every", str(eval_every), *extra]


def run_one(name: str, mult: float, seed: int, steps: int, eval_every: int, extra: list[str], out: str,
            threads: int) -> dict[str, Any]:
    """Train one run into ``out`` (or reuse a finished one with the same config); its val curve."""
    import torch

    from lanton_dist.config import load_run_config, to_dict
    from lanton_dist.trainer import read_metrics, train

    torch.set_num_threads(threads)
    cfg = load_run_config(CONFIG, [*run_overrides(name, mult, seed, steps, eval_every, extra), "--train.out_dir", out])
    summary_path, config_path = Path(out) / "summary.json", Path(out) / "config.json"
    reused = (summary_path.is_file() and config_path.is_file()
              and json.loads(config_path.read_text()) == json.loads(json.dumps(to_dict(cfg))))
    if not reused:
        train(cfg, log=lambda _msg: None)
    summary = json.loads(summary_path.read_text())
    val = [(r["step"], r["val_loss"]) for r in read_metrics(Path(out) / "metrics.jsonl") if "val_loss" in r]
    return dict(optimizer=name, mult=mult, seed=seed, steps=[s for s, _ in val], val=[v for _, v in val],
                final_val=summary["final_val_loss"], wall_s=summary["wall_s"], reused=reused,
                lr=dict(zip(("hidden", "embed_head", "vector"), (mult * x for x in BASE_LRS[name]))),
                unigram=summary["unigram_baseline"])


# ============================================================================ analysis
def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """First step at which the piecewise-linear curve ``(steps, losses)`` is ≤ ``target``;
    ``None`` if it never is."""
    for i, (s, v) in enumerate(zip(steps, losses)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def speedup(steps: list[int], lanton: list[float], base: list[float]) -> dict[str, Any]:
    """LANTON vs one baseline on curves sampled at ``steps`` (first step > 0): the higher of
    the two final losses is the target both curves reach; ``ratio`` = the baseline's steps to
    it / LANTON's (> 1: LANTON is faster); ``lanton_reaches_baseline_final`` tells which final
    loss the target is."""
    target = max(lanton[-1], base[-1])
    s_l, s_b = steps_to_reach(steps, lanton, target), steps_to_reach(steps, base, target)
    return dict(target=target, lanton_reaches_baseline_final=lanton[-1] <= base[-1],
                lanton_steps=s_l, baseline_steps=s_b, ratio=s_b / s_l)


def mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = runs[0]["steps"]
    if any(r["steps"] != steps for r in runs):
        raise ValueError("runs were evaluated at different steps")
    cols = list(zip(*(r["val"] for r in runs)))
    return steps, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def analyse(final_runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Summary statistics and LANTON's speed-up over each baseline (seed-mean curves and per seed)."""
    summary: dict[str, Any] = {}
    for name, runs in final_runs.items():
        finals = [r["final_val"] for r in runs]
        summary[name] = dict(final_mean=statistics.fmean(finals),
                             final_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                             final_min=min(finals), final_max=max(finals), seeds=[r["seed"] for r in runs])
    versus: dict[str, Any] = {}
    if "lanton" in final_runs:
        steps, lanton, _, _ = mean_curve(final_runs["lanton"])
        by_seed = {r["seed"]: r for r in final_runs["lanton"]}
        for name, runs in final_runs.items():
            if name == "lanton":
                continue
            _, base, _, _ = mean_curve(runs)
            per_seed = [speedup(steps, by_seed[r["seed"]]["val"], r["val"])["ratio"] for r in runs if r["seed"] in by_seed]
            versus[name] = dict(mean_curves=speedup(steps, lanton, base), per_seed_ratio=per_seed,
                                final_gap=summary["lanton"]["final_mean"] - summary[name]["final_mean"])
    return dict(summary=summary, lanton_vs=versus)


def plot(final_runs: dict[str, list[dict[str, Any]]], path: Path, unigram: float | None, title: str) -> Path:
    """Seed-mean validation curves with min–max bands; right panel: the second half, zoomed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in final_runs.items():
        steps, mean, lo, hi = mean_curve(runs)
        label = f"{name} (x{runs[0]['mult']:g}, {len(runs)} seeds)"
        for ax, first in ((axes[0], 0), (axes[1], len(steps) // 2)):
            line, = ax.plot(steps[first:], mean[first:], "o-", ms=2.5, lw=1.4, label=label)
            ax.fill_between(steps[first:], lo[first:], hi[first:], color=line.get_color(), alpha=0.2)
    if unigram is not None:
        axes[0].axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram {unigram:.2f}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[1].set_title("second half (band: min–max over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================ driver
def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/sample_efficiency")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--grid", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="multipliers of the base rates")
    ap.add_argument("--max-extend", type=int, default=2, help="grid extensions past an edge winner, per optimizer")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args, extra = ap.parse_known_args(argv)
    if "lanton" not in args.optimizers:
        ap.error("--optimizers must include lanton (the comparison is LANTON vs each baseline)")
    if args.tune_seed in args.seeds:
        ap.error(f"--tune-seed {args.tune_seed} is also an evaluation seed: keep tuning and evaluation seeds apart")
    if args.steps % args.eval_every:
        ap.error("--steps must be a multiple of --eval-every (curves are compared at the same steps)")
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, extra = _parse(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"))

    def launch(jobs: list[tuple[str, float, int]]) -> list[dict[str, Any]]:
        futures = [pool.submit(run_one, n, m, s, args.steps, args.eval_every, extra,
                               str(out / "runs" / f"{n}_x{m:g}_s{s}"), args.threads) for n, m, s in jobs]
        results = [f.result() for f in futures]
        for r in results:
            took = "reused" if r["reused"] else f"{r['wall_s']:.0f} s"
            print(f"  {r['optimizer']:6s} x{r['mult']:<5g} seed {r['seed']}: final val {r['final_val']:.4f} ({took})",
                  flush=True)
        return results

    try:
        grid: dict[str, dict[float, float]] = {n: {} for n in args.optimizers}
        todo = [(n, m, args.tune_seed) for n in args.optimizers for m in args.grid]
        extensions = {n: 0 for n in args.optimizers}
        print(f"tuning on seed {args.tune_seed}: {len(todo)} runs of {args.steps} steps", flush=True)
        while todo:
            for r in launch(todo):
                grid[r["optimizer"]][r["mult"]] = r["final_val"]
            todo = []
            for n, g in grid.items():
                best = min(g, key=g.get)
                edge = 2.0 if best == max(g) else 0.5 if best == min(g) else None
                if edge is not None and extensions[n] < args.max_extend and len(g) > 1:
                    extensions[n] += 1
                    todo.append((n, best * edge, args.tune_seed))
        best = {n: min(g, key=g.get) for n, g in grid.items()}
        print(f"evaluating the tuned rates on seeds {args.seeds}", flush=True)
        final = launch([(n, best[n], s) for n in args.optimizers for s in args.seeds])
    finally:
        pool.shutdown()
    final_runs = {n: sorted((r for r in final if r["optimizer"] == n), key=lambda r: r["seed"]) for n in args.optimizers}
    result = analyse(final_runs)
    unigram = final[0]["unigram"]
    png = plot(final_runs, out / "sample_efficiency.png", unigram,
               f"tiny LLaMA, {args.steps} steps, tuned rates, seeds {args.seeds}")
    report = dict(
        protocol=dict(config=str(CONFIG.relative_to(ROOT)), overrides=extra, steps=args.steps, eval_every=args.eval_every,
                      base_lrs=BASE_LRS, grid=args.grid, tune_seed=args.tune_seed, seeds=args.seeds),
        grid={n: {f"{m:g}": v for m, v in sorted(g.items())} for n, g in grid.items()},
        grid_edge={n: best[n] in (min(g), max(g)) for n, g in grid.items()},
        best={n: dict(mult=best[n], lr=final_runs[n][0]["lr"]) for n in args.optimizers},
        runs={n: [{k: r[k] for k in ("seed", "steps", "val", "final_val", "wall_s")} for r in rs] for n, rs in final_runs.items()},
        unigram=unigram, wall_s=time.perf_counter() - t0, plot=str(png), **result)
    (out / "sample_efficiency.json").write_text(json.dumps(report, indent=2))
    print(one_line(report), flush=True)
    return report


def one_line(report: dict[str, Any]) -> str:
    """The benchmark's result in one line: final validation losses (mean ± std over seeds) and
    LANTON's speed-up over each baseline (> 1: LANTON needs fewer steps)."""
    s = report["summary"]
    parts = [f"{n} {v['final_mean']:.4f}±{v['final_std']:.4f}" for n, v in s.items()]
    for n, v in report["lanton_vs"].items():
        m, per_seed = v["mean_curves"], v["per_seed_ratio"]
        parts.append(f"LANTON speed-up vs {n} {m['ratio']:.2f}x (per seed {min(per_seed):.2f}-{max(per_seed):.2f})")
    return "sample_efficiency | final val " + " | ".join(parts)


if __name__ == "__main__":
    main()
