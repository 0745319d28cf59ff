"""Sample efficiency: D-Muon, Scion, LANTON and LANTON with α auto — tuned, paired seeds, three horizons.

Protocol (every number comes from runs made by this script; runs, grid search and curve
arithmetic are :mod:`bench_common`'s):

1. Model, data and batch are ``configs/llama-tiny-cpu.yaml``'s (0.8M parameters, the stdlib
   source as bytes, 16 × 128 tokens a step); every run has its own schedule: linear warm-up over
   ``--warmup-fraction`` of its steps, then cosine to 0.1× at its last step.
2. Arms (:data:`ARMS`): D-Muon; Scion (LANTON's update without the noise adaptation); LANTON
   (the default: fixed α, duals matching the LMO); LANTON with ``optim.alpha_mode auto``. Each
   arm is a list of config overrides.
3. Validation: one fixed set for every run — ``--val-windows`` windows (64: ``eval_batches`` =
   64 / global batch) drawn by ``data.val_seed`` = ``--val-seed``, whatever the run's seed; a
   seed sets the initialisation (``train.seed``) and the batch order (``data.seed``) only.
4. Tuning, on ``--tune-seed`` at ``--tune-steps`` (600) steps: the rate axis — the arm's group
   rates together × ``--rate-grid`` (a √2 grid), extended by ×√2 while the best sits at an edge
   (``--max-extend`` times) — at the arm's base head rate; then the head axis at the best rate
   multiplier — the head rate × ``--head-grid``, extended by ×2 the same way. The head rate is
   ``optim.lr.head`` for the LMO arms and the AdamW rate of the embedding and head
   (``optim.lr.embed_head``) for D-Muon. ``--head-grid`` with no value: no head axis.
5. Evaluation: every arm at its tuned rates on ``--seeds`` (held out from tuning; paired: a seed
   is the same initialisation and batch order for every arm) × ``--horizons`` (300 / 600 / 1,200
   steps).
6. Report: per arm and seed the loss-vs-tokens frontier (the lower envelope of all its
   evaluations over the horizons); per pair of arms, horizon and seed the final-loss gap and
   the paired tokens-to-loss ratio at the common loss (the higher of the two finals: the
   tokens the second arm's frontier needs ÷ the first's; > 1: the first arm needs fewer). A
   claim is printed only where it holds on every seed.

Runs go to ``--out/<arm>_x<rate mult>_h<head mult>_s<seed>_<steps>_<config hash>`` (outside
git by default): a finished run is reused, an interrupted one resumes from its last checkpoint
(``--checkpoint-every``), so a killed study continues where it stopped. The training command
writes ``--out/sample_efficiency.{json,png}``; ``--summary`` trains nothing, reads the finished
runs and writes the same files to ``--results`` (``launch/results/sample_efficiency``).
``--estimate-steps N`` times N steps of each arm's optimizer and predicts the wall time.

    python launch/bench_sample_efficiency.py --jobs 2                 # the study (resumable)
    python launch/bench_sample_efficiency.py --summary                # JSON + PNG into launch/results
    python launch/bench_sample_efficiency.py --estimate-steps 20      # predicted wall time

Arguments not listed below are config overrides for every run (``--model.dim 64``).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, by name (spawned workers import it too)
from bench_common import (BASE_LRS, CONFIG, GROUPS, ROOT, Launcher, MissingRuns, Reader, RunSpec,  # noqa: E402
                          add_run_arguments, at_edge, best_mult, config_hash, load_config, pyplot, save_figure,
                          steps_to_reach, tune)

RESULTS = ROOT / "launch" / "results" / "sample_efficiency"
SQRT2 = math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One method of the study: ``optimizer`` at ``lrs`` (hidden, embed_head, vector base rates,
    scaled together by the rate axis) with ``overrides``; the head axis sets config key
    ``head_key`` to ``head_lr`` × its multiplier."""

    name: str
    optimizer: str
    lrs: tuple[float, float, float]
    head_key: str
    head_lr: float
    overrides: tuple[str, ...] = ()


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("dmuon", "dmuon", BASE_LRS["dmuon"], "optim.lr.embed_head", BASE_LRS["dmuon"][1]),
    Arm("scion", "scion", BASE_LRS["scion"], "optim.lr.head", 1.0),
    Arm("lanton", "lanton", BASE_LRS["lanton"], "optim.lr.head", 1.0, ("--optim.alpha_mode", "fixed")),
    Arm("lanton_auto", "lanton", BASE_LRS["lanton"], "optim.lr.head", 1.0, ("--optim.alpha_mode", "auto")),
)}
# pairs are (first, second) in this order: the LANTON arms against each other arm
ORDER = ("lanton_auto", "lanton", "scion", "dmuon")


# ============================================================================ the plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """The study's settings; :meth:`spec` builds its runs. ``extra``: config overrides for every run."""

    arms: tuple[str, ...]
    rate_grid: tuple[float, ...]
    head_grid: tuple[float, ...]
    max_extend: int
    tune_seed: int
    tune_steps: int
    seeds: tuple[int, ...]
    horizons: tuple[int, ...]
    evals: int
    warmup_fraction: float
    val_windows: int
    val_seed: int
    extra: tuple[str, ...] = ()

    def spec(self, arm: str, mult: float, head: float | None, seed: int, steps: int) -> RunSpec:
        """``arm`` at ``mult`` × its rates and ``head`` × its head rate (None: the config's) on
        ``seed`` for ``steps`` steps, its own schedule, on the fixed validation set."""
        a = ARMS[arm]
        head_tag = "" if head is None else f"_h{head:.4g}"
        over = (*a.overrides, *([f"--{a.head_key}", repr(head * a.head_lr)] if head is not None else []), *self.common(steps))
        return RunSpec(a.optimizer, mult, seed, steps, steps // self.evals, f"{arm}_x{mult:.4g}{head_tag}_s{seed}_{steps}",
                       a.lrs, over)

    def common(self, steps: int) -> tuple[str, ...]:
        """Every run's overrides: its schedule, the fixed validation set, the user's ``extra``."""
        return ("--schedule.warmup_steps", str(round(self.warmup_fraction * steps)), "--data.val_seed", str(self.val_seed),
                "--train.eval_batches", str(self.eval_batches()), *self.extra)

    def rates(self, arm: str, mult: float, head: float | None) -> dict[str, float]:
        """The rates a run of ``arm`` at ``mult`` and ``head`` sets, by config key."""
        a = ARMS[arm]
        out = {f"optim.lr.{g}": mult * x for g, x in zip(GROUPS, a.lrs)}
        return out if head is None else {**out, a.head_key: head * a.head_lr}

    def eval_batches(self) -> int:
        """Validation batches of the global batch that make ``val_windows`` windows."""
        batch = load_config(list(self.extra)).train.global_batch
        if self.val_windows % batch:
            raise ValueError(f"--val-windows {self.val_windows} is not a multiple of the global batch {batch}")
        return self.val_windows // batch

    def tokens_per_step(self) -> int:
        """Tokens one training step consumes (global batch × sequence length)."""
        cfg = load_config(list(self.extra))
        return cfg.train.global_batch * cfg.data.seq_len

    def head_axis(self) -> float | None:
        """The head multiplier of the rate axis' runs (None: no head axis, the config's head rate)."""
        return 1.0 if self.head_grid else None


def run_study(plan: Plan, runner: Launcher | Reader) -> dict[str, Any]:
    """Tune (rate axis, then head axis) and evaluate every arm; ``runner`` trains (a
    :class:`Launcher`) or only reads finished runs (a :class:`Reader`). The decisions depend
    only on finished runs' losses, so a resumed study takes the same path."""
    h0 = plan.head_axis()
    rate = tune(runner, plan.arms, list(plan.rate_grid), plan.max_extend,
                lambda a, m: plan.spec(a, m, h0, plan.tune_seed, plan.tune_steps), step=SQRT2)
    mult = {a: best_mult(g) for a, g in rate.items()}
    head: dict[str, dict[float, float]] = {}
    if plan.head_grid:
        head = tune(runner, plan.arms, list(plan.head_grid), plan.max_extend,
                    lambda a, h: plan.spec(a, mult[a], h, plan.tune_seed, plan.tune_steps), step=2.0)
    best = {a: (mult[a], best_mult(head[a]) if head else None) for a in plan.arms}
    keys = [(a, s, n) for a in plan.arms for s in plan.seeds for n in plan.horizons]
    results = runner.run([plan.spec(a, *best[a], s, n) for a, s, n in keys])
    runs = {k: r for k, r in zip(keys, results)}
    return dict(rate=rate, head=head, best=best, runs=runs)


# ============================================================================ frontier arithmetic
def frontier(curves: list[tuple[list[float], list[float]]]) -> list[tuple[float, float]]:
    """Lower envelope of ``(tokens, losses)`` curves: the points where the best loss reached at
    ≤ that many tokens falls, tokens increasing, losses strictly decreasing (step 0 and
    non-finite losses excluded)."""
    points = sorted((t, v) for tokens, losses in curves for t, v in zip(tokens, losses) if t > 0 and math.isfinite(v))
    out: list[tuple[float, float]] = []
    for t, v in points:
        if not out or v < out[-1][1]:
            out.append((t, v))
    return out


def tokens_to_loss(front: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which ``front`` first reaches ``target`` (linear between its points); None: never."""
    return steps_to_reach([t for t, _ in front], [v for _, v in front], target)


def paired(fronts: dict[str, dict[int, list[tuple[float, float]]]], finals: dict[str, dict[int, dict[int, float]]],
           first: str, second: str, horizon: int) -> dict[str, Any]:
    """``first`` against ``second`` at ``horizon``, per seed: the final-loss gap (first − second)
    and the tokens-to-loss ratio at the common loss (the higher final): ``second``'s tokens ÷
    ``first``'s (> 1: ``first`` needs fewer). ``claims``: what holds on every seed."""
    seeds = sorted(set(finals[first]) & set(finals[second]))
    gaps: list[float] = []
    ratios: list[float | None] = []
    for s in seeds:
        a, b = finals[first][s][horizon], finals[second][s][horizon]
        gaps.append(a - b)
        t_first, t_second = tokens_to_loss(fronts[first][s], max(a, b)), tokens_to_loss(fronts[second][s], max(a, b))
        ratios.append(None if t_first is None or t_second is None else t_second / t_first)  # None: a diverged run
    claims = []
    if seeds and (all(g < 0 for g in gaps) or all(g > 0 for g in gaps)):
        lo, hi = (first, second) if gaps[0] < 0 else (second, first)
        claims.append(f"{horizon} steps: {lo} ends below {hi} on every seed (gap {min(map(abs, gaps)):.4f}–"
                      f"{max(map(abs, gaps)):.4f})")
    known = [r for r in ratios if r is not None]
    if seeds and len(known) == len(seeds) and (all(r > 1 for r in known) or all(r < 1 for r in known)):
        fast, slow, rs = (first, second, known) if known[0] > 1 else (second, first, [1 / r for r in known])
        claims.append(f"{horizon} steps: {fast} reaches the common loss with {min(rs):.2f}–{max(rs):.2f}× fewer tokens "
                      f"than {slow} on every seed")
    return dict(seeds=seeds, gap=gaps, ratio=ratios, claims=claims)


def spread(values: list[float]) -> dict[str, Any]:
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values), per_seed=values)


def analyse(plan: Plan, runs: dict[tuple[str, int, int], dict[str, Any]]) -> dict[str, Any]:
    """Frontiers, final losses per horizon (mean, min, max over seeds) and the paired comparisons."""
    tps = plan.tokens_per_step()
    fronts = {a: {s: frontier([([tps * x for x in runs[a, s, n]["steps"]], runs[a, s, n]["val"]) for n in plan.horizons])
                  for s in plan.seeds} for a in plan.arms}
    finals = {a: {s: {n: runs[a, s, n]["final_val"] for n in plan.horizons} for s in plan.seeds} for a in plan.arms}
    by_horizon = {a: {str(n): dict(tokens=n * tps, **spread([finals[a][s][n] for s in plan.seeds]))
                      for n in plan.horizons} for a in plan.arms}
    order = [a for a in ORDER if a in plan.arms]
    pairs = {f"{x}_vs_{y}": {str(n): paired(fronts, finals, x, y, n) for n in plan.horizons}
             for x, y in itertools.combinations(order, 2)}
    return dict(tokens_per_step=tps, final=by_horizon, pairs=pairs,
                frontier={a: {str(s): f for s, f in fr.items()} for a, fr in fronts.items()},
                claims=[c for p in pairs.values() for h in p.values() for c in h["claims"]])


# ============================================================================ driver
def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(ap, "runs/sample_efficiency")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--rate-grid", type=float, nargs="+", default=[SQRT2 ** k for k in range(-2, 3)],
                    help="multipliers of an arm's group rates (extended by ×√2 past an edge winner)")
    ap.add_argument("--head-grid", type=float, nargs="*", default=[0.5, 1.0, 2.0],
                    help="multipliers of an arm's head rate (extended by ×2); none: no head axis")
    ap.add_argument("--max-extend", type=int, default=2, help="extensions past an edge winner, per arm and axis")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--tune-steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--horizons", type=int, nargs="+", default=[300, 600, 1200])
    ap.add_argument("--evals", type=int, default=12, help="validations per run (every run's steps are a multiple)")
    ap.add_argument("--warmup-fraction", type=float, default=20 / 300, help="of each run's steps")
    ap.add_argument("--val-windows", type=int, default=64, help="validation windows, the same for every run")
    ap.add_argument("--val-seed", type=int, default=0, help="data.val_seed: draws the validation windows")
    ap.add_argument("--summary", action="store_true", help="train nothing: summarise the finished runs into --results")
    ap.add_argument("--results", default=str(RESULTS), help="where --summary writes the JSON and PNG")
    ap.add_argument("--estimate-steps", type=int, default=0, help="only time this many steps per arm's optimizer")
    args, extra = ap.parse_known_args(argv)
    if args.tune_seed in args.seeds:
        ap.error(f"--tune-seed {args.tune_seed} is also an evaluation seed: keep tuning and evaluation seeds apart")
    for name in ("seeds", "horizons", "arms"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            ap.error(f"--{name} repeats a value")
    if args.evals < 1 or any(n % args.evals for n in (*args.horizons, args.tune_steps)):
        ap.error("--evals must be >= 1 and divide every horizon and --tune-steps")
    if any(not m > 0 for m in (*args.rate_grid, *args.head_grid)) or args.head_grid and 1.0 not in args.head_grid:
        ap.error("grid multipliers must be > 0, and --head-grid must contain 1 (the rate axis' head rate)")
    if not 0 <= args.warmup_fraction < 1 or args.max_extend < 0 or args.checkpoint_every < 1:
        ap.error("--warmup-fraction must be in [0, 1), --max-extend >= 0, --checkpoint-every >= 1")
    return args, extra


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    return Plan(tuple(args.arms), tuple(args.rate_grid), tuple(args.head_grid), args.max_extend, args.tune_seed,
                args.tune_steps, tuple(args.seeds), tuple(sorted(args.horizons)), args.evals, args.warmup_fraction,
                args.val_windows, args.val_seed, tuple(extra))


def check_arms(plan: Plan) -> None:
    """Every arm's config loads (a config key an arm needs and this checkout lacks: one clear error)."""
    from lanton_dist.config import ConfigError

    for a in plan.arms:
        try:
            config_hash(plan.spec(a, 1.0, plan.head_axis(), plan.tune_seed, plan.tune_steps))
        except (ConfigError, ValueError) as e:
            print(f"config error: arm {a} ({' '.join(ARMS[a].overrides) or 'no overrides'}): {e}", file=sys.stderr)
            raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, extra = _parse(argv)
    plan = make_plan(args, extra)
    if args.estimate_steps:
        return estimate(args, plan)
    check_arms(plan)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.summary:
        try:
            study = run_study(plan, Reader(out))
        except MissingRuns as e:
            raise SystemExit(f"--summary: {e}; run the study (without --summary) first") from None
        dest = Path(args.results)
    else:
        with Launcher(out, args.jobs, args.threads, args.checkpoint_every) as launcher:
            study = run_study(plan, launcher)
        dest = out
    report = make_report(plan, study, time.perf_counter() - t0)
    dest.mkdir(parents=True, exist_ok=True)
    report["plot"] = plot(report, dest / "sample_efficiency.png").name  # beside the JSON
    (dest / "sample_efficiency.json").write_text(json.dumps(report, indent=2))
    print(one_line(report), flush=True)
    for c in report["claims"] or ["no comparison holds on every seed"]:
        print(f"  claim: {c}", flush=True)
    return report


def make_report(plan: Plan, study: dict[str, Any], wall_s: float) -> dict[str, Any]:
    runs = study["runs"]
    first = next(iter(runs.values()))
    best = {a: dict(mult=m, head=h, lr=plan.rates(a, m, h)) for a, (m, h) in study["best"].items()}
    return dict(
        protocol=dict(config=str(CONFIG.relative_to(ROOT)), arms={a: dataclasses.asdict(ARMS[a]) for a in plan.arms},
                      **{k: v for k, v in dataclasses.asdict(plan).items() if k != "arms"}),
        tuning=dict(rate={a: {f"{m:.4g}": v for m, v in sorted(g.items())} for a, g in study["rate"].items()},
                    head={a: {f"{h:.4g}": v for h, v in sorted(g.items())} for a, g in study["head"].items()},
                    at_edge={a: at_edge(study["rate"][a]) or bool(study["head"]) and at_edge(study["head"][a])
                             for a in plan.arms},
                    best=best),
        **analyse(plan, runs),
        runs={f"{a}_s{s}_{n}": {k: r[k] for k in ("steps", "val", "final_val", "wall_s", "step_s")}
              for (a, s, n), r in runs.items()},
        unigram=first["unigram"], num_params=first["num_params"], wall_s=wall_s)


def one_line(report: dict[str, Any]) -> str:
    """Seed-mean final loss per arm at each horizon and the number of claims that hold on every seed."""
    horizons = next(iter(report["final"].values()))
    parts = [f"{n} steps: " + " ".join(f"{a} {f[n]['mean']:.4f}" for a, f in report["final"].items()) for n in horizons]
    n_cmp = sum(len(p) for p in report["pairs"].values())
    return (f"sample_efficiency | {' | '.join(parts)} | {len(report['claims'])} claims hold on every seed "
            f"({n_cmp} pair-horizons)")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Loss vs tokens (frontier per seed, finals with min–max bars), paired ratios per pair and
    horizon (one point per seed), and the two tuning axes."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for a, fr in report["frontier"].items():
        h = report["final"][a]
        tokens, mean = [v["tokens"] for v in h.values()], [v["mean"] for v in h.values()]
        line = ax.errorbar(tokens, mean, yerr=[[m - v["min"] for m, v in zip(mean, h.values())],
                                               [v["max"] - m for m, v in zip(mean, h.values())]],
                           fmt="o-", capsize=3, label=a)[0]
        for f in fr.values():
            ax.plot([t for t, _ in f], [v for _, v in f], color=line.get_color(), lw=0.6, alpha=0.4)
    ax.set(xscale="log", xlabel="tokens", ylabel="validation loss (nats/byte)",
           title="loss vs tokens: finals (seed mean, min–max) and each seed's frontier")
    ax = axes[0][1]
    for i, (pair, per_h) in enumerate(report["pairs"].items()):
        for j, (n, p) in enumerate(per_h.items()):
            ax.plot([j + 0.08 * (i - 2.5)] * len(p["ratio"]), p["ratio"], "o", ms=3, color=f"C{i}",
                    label=pair if j == 0 else None)
        ax.set_xticks(range(len(per_h)), [f"{n} steps" for n in per_h])
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set(yscale="log", ylabel="second's tokens ÷ first's (> 1: first faster)", title="paired tokens-to-loss ratio per seed")
    plain(ax.yaxis, minor=True)
    for ax, axis, label in ((axes[1][0], "rate", "rate multiplier"), (axes[1][1], "head", "head-rate multiplier")):
        tried = sorted({float(k) for g in report["tuning"][axis].values() for k in g})
        for a, g in report["tuning"][axis].items():
            ax.plot([float(k) for k in g], list(g.values()), "o-", label=a)
        ax.set(xscale="log", xlabel=label, ylabel="final validation loss", title=f"tuning: {axis} axis (tuning seed)")
        ax.set_xticks(tried, [f"{m:.3g}" for m in tried])
        plain(ax.xaxis)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plain(axis: Any, minor: bool = False) -> None:
    """Plain numbers on a log axis (no powers of ten; minor ticks labelled only when ``minor``)."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g") if minor else NullFormatter())


# ============================================================================ the time estimate
def estimate(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Time ``--estimate-steps`` steps and one validation of each arm's optimizer (its rates and
    head rate do not change a step's cost), one at a time on ``--threads`` threads, and predict
    the study's wall time on ``--jobs`` parallel runs (tuning without and with every extension)."""
    n = args.estimate_steps
    arms = {ARMS[a].optimizer: ARMS[a] for a in plan.arms}  # one per optimizer
    specs = [RunSpec(o, 1.0, plan.tune_seed, n, n, f"estimate_{o}", a.lrs, plan.common(n)) for o, a in arms.items()]
    with Launcher(Path(args.out) / "estimate", 1, args.threads, n) as launcher:
        timed = launcher.run(specs)
    per = {o: dict(step_s=r["train_s"] / n, eval_s=max(0.0, r["wall_s"] - r["train_s"])) for o, r in zip(arms, timed)}

    def run_s(arm: str, steps: int) -> float:
        p = per[ARMS[arm].optimizer]
        return steps * p["step_s"] + (plan.evals + 1) * p["eval_s"]

    head_runs = max(0, len(plan.head_grid) - 1)
    tune_lo = sum((len(plan.rate_grid) + head_runs) * run_s(a, plan.tune_steps) for a in plan.arms)
    axes = 1 + bool(plan.head_grid)
    tune_hi = tune_lo + sum(axes * plan.max_extend * run_s(a, plan.tune_steps) for a in plan.arms)
    evaluation = sum(len(plan.seeds) * run_s(a, h) for a in plan.arms for h in plan.horizons)
    lo, hi = (tune_lo + evaluation) / args.jobs / 3600, (tune_hi + evaluation) / args.jobs / 3600
    print(f"estimated study wall time on {args.jobs} parallel runs of {args.threads} thread(s): {lo:.2f}–{hi:.2f} h "
          f"(tuning {tune_lo / args.jobs / 3600:.2f}–{tune_hi / args.jobs / 3600:.2f} h, evaluation "
          f"{evaluation / args.jobs / 3600:.2f} h)", flush=True)
    for o, p in per.items():
        print(f"  {o}: {1e3 * p['step_s']:.0f} ms/step, {p['eval_s']:.2f} s/validation")
    report = dict(per_optimizer=per, estimate_h=[lo, hi], jobs=args.jobs, threads=args.threads, steps_timed=n,
                  tuning_job_s=[tune_lo, tune_hi], evaluation_job_s=evaluation)
    (Path(args.out) / "estimate.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
