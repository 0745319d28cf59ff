"""Width scaling: LANTON vs Scion vs D-Muon vs AdamW at several model sizes, same data and schedule.

Protocol (every number comes from runs made by this script; runs, seeds, grid and curve
arithmetic are :mod:`bench_common`'s, shared with ``bench_sample_efficiency.py``):

1. Models: ``--widths``, names of :data:`SHAPES` (or ``dim,layers,heads,kv_heads,ffn``), each
   the tiny LLaMA of ``configs/llama-tiny-cpu.yaml`` with that shape; the CPU default is the
   demo model (0.80M parameters), 2.17M and 4.56M (the issue's d256 × 6 layers). Depth grows
   with width in these presets (head dim 32, FFN 2.75·dim); the rate rules below are width
   rules and nothing compensates depth. Data (the stdlib source as bytes), batch (16 × 128
   tokens) and the schedule's shape (linear warm-up over ``--warmup-fraction`` of the steps,
   then cosine to 0.1×) are the same at every width.
2. Token budget, one rule for every width: ``--tokens-per-param R`` (default 0.25) trains a
   model of N parameters for R·N tokens, rounded up to a multiple of ``--evals`` steps
   (d128: 100 steps, d192: 280, d256: 560); ``--steps S`` instead gives every width S steps
   (equal tokens). Validation every steps/``--evals`` steps.
3. Rates: each optimizer's three group rates are tuned at the smallest width on
   ``--tune-seed`` with the grid of ``bench_common.tune`` (× ``--grid`` around
   :data:`~bench_common.BASE_LRS`, extended while the best is at an edge), then used
   *unchanged* at every width — each method's own scaling rule lives in its update, not in
   its rate (:data:`TRANSFER_RULES`): LANTON and Scion scale the hidden polar factor by
   √(d_out/d_in), so a hidden update's RMS→RMS operator norm is η at any width (their sign
   LMO for the head is scaled by 1/d_in: RMS→ℓ∞ norm η; embedding and vector updates have
   entries of size η); D-Muon's 0.2·√max(d_out, d_in) (Moonlight) makes a hidden update's
   entry RMS 0.2·η, AdamW's, at any width, and its embedding/head/vector groups are AdamW;
   AdamW's rates are used as they are (standard parametrisation: no width rule). The JSON
   records, per width and optimizer, both norms of the first hidden update divided by the rate
   (``transfer.hidden_update``): the quantity each rule keeps fixed stays fixed, the other one
   moves with width.
4. Probe: at the largest width every optimizer also runs its transferred rates ×0.5 and ×2
   (``--probe``) on the tuning seed; a probe that beats ×1 is reported (the transfer missed).
5. Seeds: ``--seeds`` (default 1 2 3, held out from tuning) at every width for every
   optimizer; a seed sets initialisation, batch order and validation windows, shared by all
   optimizers (paired).
6. LANTON variants at the largest width, on the same seeds and LANTON's transferred rates
   (``--variants``): ``ratio_anchor: min``, Option II, k = 1 and k = 10 (a variant whose
   config equals the main LANTON run's — k = 10 by default — is that run, not a re-run).
7. Report (``--out/scaling.json``, ``--out/scaling.png``, one line on stdout): final
   validation loss vs parameters per optimizer (mean, min–max band over seeds); per width and
   baseline the steps LANTON needs to reach the baseline's final loss and the reverse
   (``bench_common.speedup``, seed-mean curves and per seed) and LANTON's speed-up at the
   common loss; median wall time per step side by side; the probe and the variants.

Runs go to ``--out/runs/<width>_<optimizer>_x<mult>_s<seed>_<config hash>``: a killed study
continues (finished runs are reused, interrupted ones resume from their last checkpoint).
``--estimate-steps N`` only times N steps of every planned configuration (single thread,
one at a time) and prints the study's predicted wall time — wall clock, so on a machine busy
with other work it predicts that machine, not an idle one.

    python launch/bench_scaling.py --out runs/scaling [--jobs 2] [--estimate-steps 11]

GPU (not run in this project's sessions): ``--widths d384 d896 d1280 --train.device cuda
--train.global_batch 256`` (≈20M, 127M, 369M parameters). Arguments not listed below are
config overrides for every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, by name (spawned workers import it too)
from bench_common import (BASE_LRS, CONFIG, GROUPS, ROOT, Launcher, RunSpec, add_study_arguments,  # noqa: E402
                          analyse, at_edge, best_mult, check_study_arguments, config_hash, final_stats,
                          load_config, pyplot, save_figure, tune)

# name → (dim, n_layers, n_heads, n_kv_heads, ffn_dim); head dim 32 (64 from d896), FFN 2.75·dim.
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "d128": (128, 4, 4, 2, 352),        # 0.80M, the demo model
    "d192": (192, 5, 6, 3, 528),        # 2.17M
    "d256": (256, 6, 8, 4, 704),        # 4.56M, the model
    "d384": (384, 12, 12, 6, 1056),     # 20.1M
    "d896": (896, 14, 14, 7, 2464),     # 127M
    "d1280": (1280, 20, 20, 10, 3520),  # 369M
}
CPU_WIDTHS = ("d128", "d192", "d256")
TRANSFER_RULES: dict[str, str] = {
    "lanton": "same rates: hidden polar factor × √(d_out/d_in) keeps the RMS→RMS operator norm of a hidden update at η",
    "scion": "same rates: hidden polar factor × √(d_out/d_in) keeps the RMS→RMS operator norm of a hidden update at η",
    "dmuon": "same rates: hidden polar factor × 0.2·√max(d_out, d_in) (Moonlight) keeps a hidden update's entry RMS at 0.2·η",
    "adamw": "same rates (standard parametrisation, no width rule): an update's entries are ~η at any width",
}
VARIANTS: dict[str, tuple[str, ...]] = {
    "anchor_min": ("--optim.ratio_anchor", "min"),
    "option_II": ("--optim.option", "II"),
    "k1": ("--optim.estimate_every", "1"),
    "k10": ("--optim.estimate_every", "10"),
}


@dataclasses.dataclass(frozen=True)
class Width:
    """One model size of the study and its token budget."""

    name: str
    shape: tuple[int, int, int, int, int]
    params: int
    steps: int
    eval_every: int
    warmup: int

    def overrides(self) -> tuple[str, ...]:
        keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
        return (*(a for k, v in zip(keys, self.shape) for a in (f"--model.{k}", str(v))),
                "--schedule.warmup_steps", str(self.warmup))


def parse_shape(text: str) -> tuple[str, tuple[int, int, int, int, int]]:
    """A :data:`SHAPES` name, or ``dim,layers,heads,kv_heads,ffn`` (named ``d<dim>L<layers>``)."""
    if text in SHAPES:
        return text, SHAPES[text]
    parts = text.split(",")
    if len(parts) != 5 or not all(p.isdigit() for p in parts):
        raise ValueError(f"width {text!r}: expected one of {sorted(SHAPES)} or dim,layers,heads,kv_heads,ffn")
    dim, layers, heads, kv, ffn = map(int, parts)
    return f"d{dim}L{layers}", (dim, layers, heads, kv, ffn)


def count_params(overrides: list[str]) -> int:
    """Parameters of the model the overrides describe (built on the meta device: no memory)."""
    import torch

    from lanton_dist.config import check_model_config
    from lanton_dist.model import Transformer

    cfg = load_config(overrides)
    check_model_config(cfg.model)
    with torch.device("meta"):
        return Transformer(cfg.model, seed=0).num_params()


def make_widths(args: argparse.Namespace, extra: list[str]) -> list[Width]:
    """The study's widths, smallest first, with the token rule's step counts."""
    widths = []
    for text in args.widths:
        name, shape = parse_shape(text)
        base = Width(name, shape, 0, 0, 0, 0)
        cfg = load_config([*base.overrides(), *extra])
        params = count_params([*base.overrides(), *extra])
        if args.steps:
            steps = args.evals * math.ceil(args.steps / args.evals)
        else:
            tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
            steps = args.evals * math.ceil(args.tokens_per_param * params / tokens_per_step / args.evals)
        widths.append(Width(name, shape, params, steps, steps // args.evals, round(args.warmup_fraction * steps)))
    widths.sort(key=lambda w: w.params)
    if len({w.name for w in widths}) != len(widths):
        raise ValueError(f"--widths {args.widths} names a width twice")
    return widths


#: The study's protocol beyond the base config: the LM head in the embed_head group at its rate
#: (scaled with the others by the multiplier), as its results were measured — not the demo
#: config's LANTON-tuned ``lr.head``, which would also be an AdamW rate for D-Muon and AdamW.
PROTOCOL: tuple[str, ...] = ("--optim.lr.head", "null")


def make_spec(extra: list[str], name: str, mult: float, seed: int, w: Width, variant: str = "") -> RunSpec:
    """The run of ``name`` at ``mult`` × its base rates on ``seed`` at width ``w`` (a LANTON
    ``variant`` adds its overrides); ``extra``: the user's config overrides."""
    tag = f"{name}-{variant}" if variant else name
    return RunSpec(name, mult, seed, w.steps, w.eval_every, f"{w.name}_{tag}_x{mult:g}_s{seed}", BASE_LRS[name],
                   (*w.overrides(), *PROTOCOL, *extra, *VARIANTS.get(variant, ())))


def own_variants(variants: list[str], w: Width, extra: list[str]) -> dict[str, bool]:
    """Each variant → whether it is a run of its own (False: its config is the main LANTON run's)."""
    main = config_hash(make_spec(extra, "lanton", 1.0, 0, w))
    return {v: config_hash(make_spec(extra, "lanton", 1.0, 0, w, v)) != main for v in variants}


# ============================================================================ rate transfer
def hidden_update_norms(overrides: list[str]) -> dict[str, float]:
    """The optimizer's first update of the hidden matrices, divided by the hidden rate: median
    over matrices of its RMS→RMS operator norm (√(d_in/d_out)·σ_max) and of its entry RMS.

    One step of the run's optimizer from the run's initialisation (on CPU) on a Gaussian
    gradient, seeded by the run's seed: a full-rank gradient, which is what the scale rules
    assume (a first data gradient is nearly low-rank, and a rank-r polar factor's entry RMS is
    √(r/min(d_out, d_in)) of a full-rank one's)."""
    import torch

    from lanton_dist.factory import build_optimizer, param_groups
    from lanton_dist.model import Transformer

    cfg = load_config([*overrides, "--train.device", "cpu"])
    model = Transformer(cfg.model, seed=cfg.train.seed)
    groups = param_groups(model, cfg.optim)
    hidden = next(g for g in groups if g["geometry"] == "hidden")
    before = [p.detach().clone() for p in hidden["params"]]
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    build_optimizer(model, cfg.optim, groups).step()
    rms_to_rms, entry_rms = [], []
    for p, p0 in zip(hidden["params"], before):
        d = (p.detach() - p0).double() / cfg.optim.lr.hidden
        d_out, d_in = d.shape
        rms_to_rms.append(math.sqrt(d_in / d_out) * float(torch.linalg.matrix_norm(d, ord=2)))
        entry_rms.append(float(d.pow(2).mean().sqrt()))
    return dict(rms_to_rms=statistics.median(rms_to_rms), entry_rms=statistics.median(entry_rms))


# ============================================================================ the study
def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_arguments(ap, "runs/scaling")
    ap.add_argument("--widths", nargs="+", default=list(CPU_WIDTHS), help=f"{sorted(SHAPES)} or dim,layers,heads,kv,ffn")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--tokens-per-param", type=float, default=0.25, help="train N-parameter models for R·N tokens")
    budget.add_argument("--steps", type=int, default=0, help="instead: the same steps at every width")
    ap.add_argument("--evals", type=int, default=20, help="validations per run (steps are a multiple of it)")
    ap.add_argument("--warmup-fraction", type=float, default=20 / 300, help="of each run's steps")
    ap.add_argument("--probe", type=float, nargs="*", default=[0.5, 2.0], help="rate factors tried at the largest width")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--estimate-steps", type=int, default=0, help="only time this many steps per configuration")
    args, extra = ap.parse_known_args(argv)
    check_study_arguments(ap, args)
    if args.steps < 0 or args.evals < 1 or not args.tokens_per_param > 0:
        ap.error("--steps must be >= 0, --evals >= 1 and --tokens-per-param > 0")
    if not 0 <= args.warmup_fraction < 1:
        ap.error("--warmup-fraction must be in [0, 1)")
    if any(not p > 0 or p == 1 for p in args.probe) or len(set(args.probe)) != len(args.probe):
        ap.error("--probe factors must be > 0, distinct and differ from 1 (×1 is the transferred rate itself)")
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, extra = _parse(argv)
    out = Path(args.out)
    widths = make_widths(args, extra)
    small, large = widths[0], widths[-1]
    print("widths: " + ", ".join(f"{w.name} {w.params / 1e6:.2f}M params, {w.steps} steps" for w in widths), flush=True)
    if args.estimate_steps:
        return estimate(args, extra, widths)
    t0 = time.perf_counter()
    spec = functools.partial(make_spec, extra)

    with Launcher(out / "runs", args.jobs, args.threads, args.checkpoint_every) as launcher:
        print(f"tuning at {small.name} on seed {args.tune_seed}", flush=True)
        grid = tune(launcher, args.optimizers, args.grid, args.max_extend,
                    lambda n, m: spec(n, m, args.tune_seed, small))
        best = {n: best_mult(g) for n, g in grid.items()}
        variants = own_variants(args.variants, large, extra)
        jobs = [spec(n, best[n], s, w) for w in widths for n in args.optimizers for s in args.seeds]
        jobs += [spec(n, best[n] * p, args.tune_seed, large) for n in args.optimizers for p in (1.0, *args.probe)]
        jobs += [spec("lanton", best["lanton"], s, large, v) for v, own in variants.items() if own for s in args.seeds]
        print(f"{len(jobs)} runs: {len(args.seeds)} seeds × {len(args.optimizers)} optimizers × {len(widths)} widths, "
              f"the probe and the variants at {large.name}", flush=True)
        results = launcher.run(jobs)
    study = Results(args, extra, widths, best, {r["label"]: r for r in results})
    report = dict(
        protocol=dict(config=str(CONFIG.relative_to(ROOT)), overrides=extra, base_lrs=BASE_LRS, grid=args.grid,
                      tune_seed=args.tune_seed, seeds=args.seeds, tune_width=small.name,
                      token_rule=(f"{args.steps} steps at every width" if args.steps
                                  else f"{args.tokens_per_param:g} tokens per parameter"),
                      widths=[dict(name=w.name, shape=w.shape, params=w.params, steps=w.steps, eval_every=w.eval_every,
                                   warmup=w.warmup) for w in widths]),
        tuning=dict(grid={n: {f"{m:g}": v for m, v in sorted(g.items())} for n, g in grid.items()},
                    grid_edge={n: at_edge(g) for n, g in grid.items()},
                    best={n: dict(mult=best[n], lr=dict(zip(GROUPS, (best[n] * x for x in BASE_LRS[n]))))
                          for n in args.optimizers}),
        transfer=dict(rules={n: TRANSFER_RULES[n] for n in args.optimizers},
                      lr={w.name: {n: study.runs(n, w)[0]["lr"] for n in args.optimizers} for w in widths},
                      hidden_update={w.name: {n: hidden_update_norms(list(spec(n, best[n], args.tune_seed, w).config_overrides()))
                                              for n in args.optimizers} for w in widths}),
        probe=dict(width=large.name, seed=args.tune_seed, results=study.probe()),
        widths={w.name: study.width(w) for w in widths},
        variants=dict(width=large.name, results=study.variants(variants)),
        unigram=results[0]["unigram"], wall_s=time.perf_counter() - t0)
    report["plot"] = str(plot(report, out / "scaling.png"))
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    print(one_line(report), flush=True)
    return report


@dataclasses.dataclass
class Results:
    """The finished runs of a study (``by_label``: :func:`bench_common.run_one` results) and
    their analysis; ``best``: each optimizer's tuned multiplier of its base rates."""

    args: argparse.Namespace
    extra: list[str]
    widths: list[Width]
    best: dict[str, float]
    by_label: dict[str, dict[str, Any]]

    def runs(self, name: str, w: Width, variant: str = "") -> list[dict[str, Any]]:
        """``name`` at its transferred rates on every evaluation seed at ``w``."""
        return [self.by_label[make_spec(self.extra, name, self.best[name], s, w, variant).label] for s in self.args.seeds]

    def width(self, w: Width) -> dict[str, Any]:
        """Final losses, LANTON against each baseline (both directions), median step time, curves."""
        finals = {n: self.runs(n, w) for n in self.args.optimizers}
        return dict(params=w.params, steps=w.steps, **analyse(finals),
                    step_s={n: statistics.fmean(r["step_s"] for r in rs) for n, rs in finals.items()},
                    runs={n: [{k: r[k] for k in ("seed", "steps", "val", "final_val", "step_s")} for r in rs]
                          for n, rs in finals.items()})

    def probe(self) -> dict[str, Any]:
        """Per optimizer at the largest width: final loss at each probe factor, the best one, and
        whether the transferred rates (×1) won; a probe that wins is printed."""
        large, out = self.widths[-1], {}
        for n in self.args.optimizers:
            losses = {p: self.by_label[make_spec(self.extra, n, self.best[n] * p, self.args.tune_seed, large).label]["final_val"]
                      for p in (1.0, *self.args.probe)}
            winner = min(losses, key=losses.get)
            out[n] = dict(final_val={f"x{p:g}": v for p, v in losses.items()}, best=winner, transfer_holds=winner == 1.0)
            if winner != 1.0:
                print(f"probe: {n} at {winner:g}× its transferred rates beats 1× at {large.name} "
                      f"({losses[winner]:.4f} vs {losses[1.0]:.4f})", flush=True)
        return out

    def variants(self, own: dict[str, bool]) -> dict[str, Any]:
        """Per LANTON variant at the largest width: final loss over seeds, paired gap to the main
        LANTON runs, speed-up and final gap against each baseline."""
        large, out = self.widths[-1], {}
        main = self.runs("lanton", large)
        baselines = {n: self.runs(n, large) for n in self.args.optimizers if n != "lanton"}
        for v, is_own in own.items():
            runs = self.runs("lanton", large, v) if is_own else main
            versus = analyse({"lanton": runs, **baselines})["lanton_vs"]
            out[v] = dict(overrides=list(VARIANTS[v]), same_as_main=not is_own, **final_stats(runs),
                          paired_gap_to_lanton=[a["final_val"] - b["final_val"] for a, b in zip(runs, main)],
                          speedup={n: x["mean_curves"]["ratio"] for n, x in versus.items()},
                          final_gap={n: x["final_gap"] for n, x in versus.items()})
        return out


def estimate(args: argparse.Namespace, extra: list[str], widths: list[Width]) -> dict[str, Any]:
    """Time ``--estimate-steps`` steps (and one validation) of every configuration the study
    runs, one at a time on ``--threads`` threads, and predict the study's wall time on
    ``--jobs`` parallel runs (tuning: without and with every grid extension)."""
    n_steps = args.estimate_steps
    small, large = widths[0], widths[-1]
    own = own_variants(args.variants, large, extra)
    configs = [(w, n, "") for w in widths for n in args.optimizers] + [(large, "lanton", v) for v in own if own[v]]
    counts = {(w.name, n, v): len(args.seeds) + (len(args.probe) + 1) * (w is large and not v) for w, n, v in configs}
    specs = [dataclasses.replace(make_spec(extra, n, 1.0, args.tune_seed, w, v), steps=n_steps, eval_every=n_steps,
                                 label=f"estimate_{w.name}_{n}{'-' + v if v else ''}") for w, n, v in configs]
    with Launcher(Path(args.out) / "estimate", 1, args.threads, n_steps) as launcher:
        timed = launcher.run(specs)
    step = {}
    total = tune_min = tune_max = 0.0
    for (w, n, v), r in zip(configs, timed):
        step_s, eval_s = r["train_s"] / n_steps, max(0.0, r["wall_s"] - r["train_s"])
        per_run = w.steps * step_s + (args.evals + 1) * eval_s
        step[f"{w.name}_{n}{'-' + v if v else ''}"] = dict(step_s=step_s, eval_s=eval_s, run_s=per_run)
        total += counts[(w.name, n, v)] * per_run
        if w is small and not v:
            tune_min += len(args.grid) * per_run
            tune_max += (len(args.grid) + args.max_extend) * per_run
    lo, hi = (total + tune_min) / args.jobs, (total + tune_max) / args.jobs
    print(f"estimated study wall time on {args.jobs} parallel runs of {args.threads} thread(s): "
          f"{lo / 3600:.1f}-{hi / 3600:.1f} h", flush=True)
    for k, v in step.items():
        print(f"  {k}: {1e3 * v['step_s']:.0f} ms/step, {v['eval_s']:.1f} s/validation, {v['run_s'] / 60:.1f} min/run")
    report = dict(widths=[dict(name=w.name, params=w.params, steps=w.steps) for w in widths], per_config=step,
                  estimate_h=[lo / 3600, hi / 3600], jobs=args.jobs, threads=args.threads, steps_timed=n_steps)
    (Path(args.out) / "estimate.json").write_text(json.dumps(report, indent=2))
    return report


# ============================================================================ output
def plot(report: dict[str, Any], path: Path) -> Path:
    """Final validation loss vs parameters (seed band; variants at the largest width), LANTON's
    speed-up vs each baseline per width (per-seed range), and wall time per step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ws = report["widths"]
    params = [w["params"] for w in ws.values()]
    for n in report["tuning"]["best"]:
        mean = [w["summary"][n]["final_mean"] for w in ws.values()]
        line, = axes[0].plot(params, mean, "o-", label=n)
        axes[0].fill_between(params, [w["summary"][n]["final_min"] for w in ws.values()],
                             [w["summary"][n]["final_max"] for w in ws.values()], color=line.get_color(), alpha=0.2)
        axes[2].plot(params, [1e3 * w["step_s"][n] for w in ws.values()], "o-", label=n)
    for v, r in report["variants"]["results"].items():
        if not r["same_as_main"]:
            axes[0].errorbar([params[-1]], [r["final_mean"]], yerr=[[r["final_mean"] - r["final_min"]],
                             [r["final_max"] - r["final_mean"]]], fmt="x", capsize=3, label=f"lanton {v}")
    for n in next(iter(ws.values()))["lanton_vs"]:
        ratio = [w["lanton_vs"][n]["mean_curves"]["ratio"] for w in ws.values()]
        lo = [min(w["lanton_vs"][n]["per_seed_ratio"]) for w in ws.values()]
        hi = [max(w["lanton_vs"][n]["per_seed_ratio"]) for w in ws.values()]
        axes[1].errorbar(params, ratio, yerr=[[r - a for r, a in zip(ratio, lo)], [b - r for r, b in zip(ratio, hi)]],
                         fmt="o-", capsize=3, label=f"vs {n}")
    axes[1].axhline(1.0, color="gray", ls="--", lw=1)
    titles = (f"final validation loss ({report['protocol']['token_rule']})", "LANTON speed-up to the common loss (>1: faster)",
              "median wall time per step")
    ylabels = ("validation loss (nats/byte)", "baseline steps / LANTON steps", "ms / step")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_xscale("log")
        ax.set_xticks(params, [f"{p / 1e6:.3g}M" for p in params])
        ax.xaxis.set_minor_formatter("")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def one_line(report: dict[str, Any]) -> str:
    """Final losses (mean over seeds) and LANTON's speed-up per width, probe verdicts."""
    parts = []
    for name, w in report["widths"].items():
        finals = " ".join(f"{n} {s['final_mean']:.4f}" for n, s in w["summary"].items())
        ups = " ".join(f"{n} {v['mean_curves']['ratio']:.2f}x" for n, v in w["lanton_vs"].items())
        parts.append(f"{name} ({w['params'] / 1e6:.2f}M): {finals}; LANTON speed-up {ups}")
    missed = [f"{n} x{p['best']:g}" for n, p in report["probe"]["results"].items() if not p["transfer_holds"]]
    parts.append("probe: " + (", ".join(missed) + " beat the transferred rates" if missed else "transfer holds"))
    return "scaling | " + " | ".join(parts)


if __name__ == "__main__":
    main()
