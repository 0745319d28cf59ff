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
   tuning; a seed sets the model initialisation, the batch order and the validation windows,
   and is shared by all optimizers, so comparisons are paired).
4. Report: validation-loss curves (mean and min–max band over seeds, PNG); final validation
   loss mean ± std; and, for each baseline, the step at which LANTON's seed-mean curve first
   reaches the baseline's final mean loss (linear interpolation between evaluations) divided
   into the step at which the baseline's own curve first reaches it — LANTON's speed-up — or,
   when LANTON never reaches it, the baseline's speed-up to LANTON's final loss. The same
   ratio per seed (paired) gives its range. Caveat: with a cosine schedule the last steps
   gain most, so "steps to reach a loss" inside one schedule is not the budget a shorter run
   would need; the final losses at equal budget are the primary result.

Runs go to ``--out/runs/<optimizer>_x<mult>_s<seed>_<config hash>`` (the trainer's
metrics.jsonl and summary.json; :mod:`bench_common`): a finished run is reused and an
interrupted one resumes from its checkpoint (every ``--checkpoint-every`` steps), so a killed
benchmark continues. Results: ``--out/sample_efficiency.json`` and ``--out/sample_efficiency.png``.

    python launch/bench_sample_efficiency.py --out runs/sample_efficiency [--steps 300] [--jobs 2]

Arguments not listed below are config overrides for every run (``--model.dim 64``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, by name (spawned workers import it too)
from bench_common import (BASE_LRS, CONFIG, ROOT, Launcher, RunSpec, add_study_arguments, analyse,  # noqa: E402
                          at_edge, best_mult, check_study_arguments, plot_curves, tune)


# ============================================================================ driver
def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_arguments(ap, "runs/sample_efficiency")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    args, extra = ap.parse_known_args(argv)
    check_study_arguments(ap, args)
    if args.steps % args.eval_every:
        ap.error("--steps must be a multiple of --eval-every (curves are compared at the same steps)")
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, extra = _parse(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    def spec(name: str, mult: float, seed: int = args.tune_seed) -> RunSpec:
        return RunSpec(name, mult, seed, args.steps, args.eval_every, f"{name}_x{mult:g}_s{seed}", BASE_LRS[name],
                       tuple(extra))

    with Launcher(out / "runs", args.jobs, args.threads, args.checkpoint_every) as launcher:
        print(f"tuning on seed {args.tune_seed}: {len(args.optimizers) * len(args.grid)} runs of {args.steps} steps",
              flush=True)
        grid = tune(launcher, args.optimizers, args.grid, args.max_extend, spec)
        best = {n: best_mult(g) for n, g in grid.items()}
        print(f"evaluating the tuned rates on seeds {args.seeds}", flush=True)
        final = launcher.run([spec(n, best[n], s) for n in args.optimizers for s in args.seeds])
    final_runs = {n: sorted((r for r in final if r["optimizer"] == n), key=lambda r: r["seed"]) for n in args.optimizers}
    result = analyse(final_runs)
    unigram = final[0]["unigram"]
    png = plot_curves(final_runs, out / "sample_efficiency.png", unigram,
                      f"tiny LLaMA, {args.steps} steps, tuned rates, seeds {args.seeds}")
    report = dict(
        protocol=dict(config=str(CONFIG.relative_to(ROOT)), overrides=extra, steps=args.steps, eval_every=args.eval_every,
                      base_lrs=BASE_LRS, grid=args.grid, tune_seed=args.tune_seed, seeds=args.seeds),
        grid={n: {f"{m:g}": v for m, v in sorted(g.items())} for n, g in grid.items()},
        grid_edge={n: at_edge(g) for n, g in grid.items()},
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
