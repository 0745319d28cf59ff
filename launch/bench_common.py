"""What the training benchmarks share (``bench_sample_efficiency.py``, ``bench_scaling.py``).

* Runs: a :class:`RunSpec` names one training run of ``configs/llama-tiny-cpu.yaml`` with
  config overrides (optimizer, the three group rates = multiplier × base rates, seed, steps);
  :func:`run_one` trains it into ``<root>/<label>_<hash>`` — the hash covers the whole resolved
  config, so two different configs never share a directory — checkpointing every
  ``checkpoint_every`` steps. A finished run (``COMPLETED``) is reused, an interrupted one resumes
  from its last checkpoint (bit-exact on one process), so a killed benchmark continues where
  it stopped; a finished run's checkpoints are deleted (only its curves are needed).
  :class:`Reader` reads finished runs only (a summary that trains nothing).
* Seeds: a :class:`RunSpec`'s seed sets the model initialisation and the batch order
  (``train.seed`` = ``data.seed``) and is shared by all optimizers, so comparisons are paired;
  the validation windows are the seed's too unless the overrides fix ``data.val_seed``.
* :class:`Launcher`: runs specs in a process pool (spawned; ``threads`` torch threads each) and
  prints one progress line per finished run.
* :func:`tune`: a rate grid — each name's multipliers, extended by a factor ``step`` while the
  best final validation loss sits at an edge (at most ``max_extend`` times per name).
* Curves: :func:`steps_to_reach`, :func:`speedup` (steps each curve needs to reach the other's
  final loss, and the ratio at the common target), :func:`mean_curve`, :func:`analyse`
  (mean ± std of final losses, LANTON against each baseline: seed-mean curves and paired per
  seed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lanton_dist.names import ALGORITHMS as OPTIMIZERS  # noqa: E402

CONFIG = ROOT / "configs" / "llama-tiny-cpu.yaml"
GROUPS = ("hidden", "embed_head", "vector")
# Base (hidden, embed_head, vector) rates, multiplied by the grid: LANTON's and D-Muon's are the
# centres of the sweeps recorded in the config's header; Scion starts from LANTON's (same
# update); AdamW from a common small-LLaMA rate. For dmuon embed_head/vector are AdamW rates.
BASE_LRS: dict[str, tuple[float, float, float]] = {
    "lanton": (0.05, 0.1, 0.01),
    "scion": (0.05, 0.1, 0.01),
    "dmuon": (0.01, 0.05, 0.05),
    "adamw": (0.004, 0.004, 0.004),
}
# Config entries that do not change a run's result: left out of its directory's hash.
NOT_HASHED = ("out_dir", "stop_after", "checkpoint_every", "resume")


# ============================================================================ one run
@dataclass(frozen=True)
class RunSpec:
    """One training run: ``optimizer`` at ``mult`` × its base rates ``lrs`` on ``seed``, for
    ``steps`` steps evaluated every ``eval_every``; ``overrides`` (config overrides) go last,
    so they win. ``label`` names the run (the directory is ``<label>_<config hash>``)."""

    optimizer: str
    mult: float
    seed: int
    steps: int
    eval_every: int
    label: str
    lrs: tuple[float, float, float]
    overrides: tuple[str, ...] = ()

    @property
    def rates(self) -> dict[str, float]:
        """The three group rates this run uses."""
        return dict(zip(GROUPS, (self.mult * x for x in self.lrs)))

    def config_overrides(self) -> list[str]:
        rates = [a for g, v in self.rates.items() for a in (f"--optim.lr.{g}", repr(v))]
        return ["--optim.name", self.optimizer, *rates, "--train.steps", str(self.steps),
                "--train.eval_every", str(self.eval_every), "--train.log_every", str(self.eval_every),
                "--train.seed", str(self.seed), "--data.seed", str(self.seed), *self.overrides]


def load_config(overrides: Iterable[str]) -> Any:
    """The :class:`~lanton_dist.config.RunConfig` of :data:`CONFIG` with ``overrides``."""
    from lanton_dist.config import load_run_config

    return load_run_config(CONFIG, list(overrides))


def _differences(cfg: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``cfg`` (nested dicts) whose value differs from ``default``'s."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        d = default.get(k)
        if isinstance(v, dict) and isinstance(d, dict):
            if sub := _differences(v, d):
                out[k] = sub
        elif v != d or k not in default:
            out[k] = v
    return out


def config_hash(spec: RunSpec) -> str:
    """First 10 hex digits of the sha1 of the run's resolved config (without :data:`NOT_HASHED`),
    entries at :class:`~lanton_dist.config.RunConfig`'s defaults left out: equal for two specs
    exactly when they train the same run, and unchanged when the library gains a config key
    whose default keeps the old behaviour (finished runs stay reusable across versions)."""
    from lanton_dist.config import RunConfig, to_dict

    cfg = _differences(to_dict(load_config(spec.config_overrides())), to_dict(RunConfig()))
    cfg["train"] = {k: v for k, v in cfg.get("train", {}).items() if k not in NOT_HASHED}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def run_dir(root: Path, spec: RunSpec) -> Path:
    """``root/<label>_<config hash>``."""
    return root / f"{spec.label}_{config_hash(spec)}"


def finished(out: Path) -> bool:
    """Whether the run in ``out`` completed (its curves are final)."""
    from lanton_dist.preemption import COMPLETED

    return (out / COMPLETED).is_file() and (out / "summary.json").is_file()


def run_one(spec: RunSpec, root: str, threads: int, checkpoint_every: int) -> dict[str, Any]:
    """Train ``spec`` under ``root`` (or reuse it when finished, resume it when interrupted)
    and return :func:`read_run`'s record of it."""
    import torch

    from lanton_dist import checkpoint_dir
    from lanton_dist.trainer import train

    torch.set_num_threads(threads)
    out = run_dir(Path(root), spec)
    reused = finished(out)
    if not reused:
        cfg = load_config([*spec.config_overrides(), "--train.out_dir", str(out), "--train.resume", "true",
                           "--train.checkpoint_every", str(checkpoint_every)])
        train(cfg, log=lambda _msg: None)
        if finished(out):
            shutil.rmtree(checkpoint_dir.root_of(out), ignore_errors=True)
    return read_run(spec, out, reused)


def read_run(spec: RunSpec, out: Path, reused: bool) -> dict[str, Any]:
    """The record of the run of ``spec`` in ``out``: its validation curve, final loss, wall
    time (``wall_s``, without the step-0 validation), median step time ``step_s`` and the
    steps' total ``train_s``."""
    from lanton_dist.trainer import read_metrics

    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    step_times = [r["step_time"] for r in records if "step_time" in r]
    completed = finished(out)
    if completed and val[-1][0] != spec.steps:
        raise RuntimeError(f"{out}: finished, but its validation curve ends at step {val[-1][0]}, not {spec.steps}")
    # the curve's last point, not the summary's final_val_loss: a run resumed from a checkpoint
    # of its last step (killed before it wrote COMPLETED) trains no step and evaluates nothing
    return dict(optimizer=spec.optimizer, mult=spec.mult, seed=spec.seed, label=spec.label, dir=str(out),
                steps=[s for s, _ in val], val=[v for _, v in val], final_val=val[-1][1],
                wall_s=summary["wall_s"], step_s=statistics.median(step_times), train_s=sum(step_times), num_params=summary["num_params"],
                reused=reused, completed=completed, lr=spec.rates,
                unigram=summary["unigram_baseline"])


class MissingRuns(RuntimeError):
    """Runs a :class:`Reader` was asked for that have not finished."""


class Reader:
    """:class:`Launcher`'s interface over finished runs only: trains nothing."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """Records of ``specs`` in their order; :class:`MissingRuns` if any has not finished."""
        dirs = [run_dir(self.root, s) for s in specs]
        missing = [d.name for d in dirs if not finished(d)]
        if missing:
            raise MissingRuns(f"{len(missing)} of {len(specs)} runs not finished under {self.root}, "
                              f"e.g. {missing[0]}")
        return [read_run(s, d, True) for s, d in zip(specs, dirs)]


class Launcher:
    """A process pool for :func:`run_one` with one stdout line per finished run."""

    def __init__(self, root: Path, jobs: int, threads: int, checkpoint_every: int) -> None:
        self.root, self.threads, self.checkpoint_every = root, threads, checkpoint_every
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
        self.t0 = time.perf_counter()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def run(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """Results of ``specs`` in their order (trained in parallel)."""
        futures: dict[Future, int] = {self.pool.submit(run_one, s, str(self.root), self.threads, self.checkpoint_every): i
                                      for i, s in enumerate(specs)}
        results: list[dict[str, Any]] = [{}] * len(specs)
        for done, f in enumerate(as_completed(futures), 1):
            r = results[futures[f]] = f.result()
            took = "reused" if r["reused"] else f"{r['wall_s']:.0f} s, {1e3 * r['step_s']:.0f} ms/step"
            print(f"  [{done}/{len(specs)}, {time.perf_counter() - self.t0:.0f} s] {r['label']}: "
                  f"final val {r['final_val']:.4f} ({took})", flush=True)
        return results


# ============================================================================ arguments
def add_run_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """Where runs go and how they are launched (:class:`Launcher`)."""
    ap.add_argument("--out", default=out)
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between a run's checkpoints (for resuming)")


def add_study_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """:func:`add_run_arguments` and an optimizer study's grid and seeds (check with :func:`check_study_arguments`)."""
    add_run_arguments(ap, out)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--grid", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="multipliers of the base rates")
    ap.add_argument("--max-extend", type=int, default=2, help="grid extensions past an edge winner, per optimizer")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])


def check_study_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if "lanton" not in args.optimizers:
        ap.error("--optimizers must include lanton (the comparison is LANTON vs each baseline)")
    if args.tune_seed in args.seeds:
        ap.error(f"--tune-seed {args.tune_seed} is also an evaluation seed: keep tuning and evaluation seeds apart")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {args.seeds} repeats a seed")
    if args.checkpoint_every < 1:
        ap.error("--checkpoint-every must be >= 1")


# ============================================================================ tuning
def tune(launcher: Launcher | Reader, names: Iterable[str], grid: list[float], max_extend: int,
         spec: Callable[[str, float], RunSpec], step: float = 2.0) -> dict[str, dict[float, float]]:
    """Final validation loss of ``spec(name, mult)`` for every multiplier tried: ``grid``,
    extended by ×``step`` (÷``step``) while the best sits at the top (bottom) edge,
    ``max_extend`` times at most per name."""
    losses: dict[str, dict[float, float]] = {n: {} for n in names}
    todo = [(n, m) for n in names for m in grid]
    extensions = {n: 0 for n in names}
    while todo:
        for (n, m), r in zip(todo, launcher.run([spec(n, m) for n, m in todo])):
            losses[n][m] = r["final_val"]
        todo = []
        for n, g in losses.items():
            best = min(g, key=g.get)
            edge = step if best == max(g) else 1 / step if best == min(g) else None
            if edge is not None and extensions[n] < max_extend and len(g) > 1:
                extensions[n] += 1
                todo.append((n, best * edge))
    return losses


def best_mult(losses: dict[float, float]) -> float:
    return min(losses, key=losses.get)


def at_edge(losses: dict[float, float]) -> bool:
    """Whether the best multiplier is the smallest or largest tried (the grid may have cut it off)."""
    return len(losses) > 1 and best_mult(losses) in (min(losses), max(losses))


# ============================================================================ curves
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
    """LANTON vs one baseline on curves sampled at ``steps`` (first step > 0).

    ``lanton_to_baseline_final``: LANTON's steps to the baseline's final loss (``None`` if it
    never gets there); ``baseline_to_lanton_final``: the reverse. ``ratio``: at the higher of
    the two final losses (the target both curves reach), the baseline's steps ÷ LANTON's
    (> 1: LANTON is faster); ``lanton_reaches_baseline_final`` tells which final loss that is.
    """
    target = max(lanton[-1], base[-1])
    s_l, s_b = steps_to_reach(steps, lanton, target), steps_to_reach(steps, base, target)
    return dict(target=target, lanton_reaches_baseline_final=lanton[-1] <= base[-1],
                lanton_steps=s_l, baseline_steps=s_b, ratio=s_b / s_l,
                lanton_to_baseline_final=steps_to_reach(steps, lanton, base[-1]),
                baseline_to_lanton_final=steps_to_reach(steps, base, lanton[-1]))


def mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, and the mean, min and max over ``runs`` of their validation curves."""
    steps = runs[0]["steps"]
    if any(r["steps"] != steps for r in runs):
        raise ValueError("runs were evaluated at different steps")
    cols = list(zip(*(r["val"] for r in runs)))
    return steps, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def final_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [r["final_val"] for r in runs]
    return dict(final_mean=statistics.fmean(finals), final_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                final_min=min(finals), final_max=max(finals), seeds=[r["seed"] for r in runs])


def analyse(final_runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Summary statistics and LANTON's speed-up over each baseline (seed-mean curves and per seed)."""
    summary = {name: final_stats(runs) for name, runs in final_runs.items()}
    versus: dict[str, Any] = {}
    if "lanton" in final_runs:
        steps, lanton, _, _ = mean_curve(final_runs["lanton"])
        by_seed = {r["seed"]: r for r in final_runs["lanton"]}
        for name, runs in final_runs.items():
            if name == "lanton":
                continue
            _, base, _, _ = mean_curve(runs)
            per_seed = [speedup(steps, by_seed[r["seed"]]["val"], r["val"]) for r in runs if r["seed"] in by_seed]
            versus[name] = dict(mean_curves=speedup(steps, lanton, base), per_seed_ratio=[p["ratio"] for p in per_seed],
                                per_seed=per_seed, final_gap=summary["lanton"]["final_mean"] - summary[name]["final_mean"])
    return dict(summary=summary, lanton_vs=versus)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
