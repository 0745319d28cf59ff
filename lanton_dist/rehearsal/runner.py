"""Run the rehearsal: one process per sampled rank, then the comparison and the report.

:func:`rehearse` is ``lanton-dist rehearse``: it loads the run config (path + overrides) as
training does, checks the stack, builds the planner's prediction, samples ranks
(:func:`~.compare.sample_ranks`), runs each in its own process (:func:`run_ranks`: the
:mod:`.worker`; at most ``jobs`` at once) and returns a :class:`Report` whose ``ok`` is False
where a rehearsed figure differs from the planner's or the ranks' collective sequences differ.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lanton_dist.config import load_run_config
from lanton_dist.rehearsal.compare import (RankComparison, compare_rank, consistency, format_rank, planner_for, sample_ranks,
                                           sequence_digest)
from lanton_dist.rehearsal.driver import RankSpec, rehearsal_config
from lanton_dist.rehearsal.fakeworld import FAKE_BACKEND_NOTES, SEAM_NOTE
from lanton_dist.rehearsal.stacks import stack_for

_ROOT = str(Path(__file__).resolve().parents[2])


def run_ranks(specs: list[RankSpec], jobs: int = 1, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """Each spec in its own worker process (at most ``jobs`` at a time); their results (JSON
    dicts of :class:`~.driver.RankResult`), in ``specs`` order. A failing worker raises
    ``RuntimeError`` with the tail of its stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
    results: list[dict[str, Any] | None] = [None] * len(specs)
    with tempfile.TemporaryDirectory(prefix="lanton-rehearse-") as tmp:
        pending = list(enumerate(specs))
        running: list[tuple[int, subprocess.Popen, Path]] = []
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i, spec = pending.pop(0)
                spec_path, out_path = Path(tmp, f"spec{i}.json"), Path(tmp, f"out{i}.json")
                spec_path.write_text(json.dumps(asdict(spec)))
                proc = subprocess.Popen([sys.executable, "-m", "lanton_dist.rehearsal.worker", str(spec_path), str(out_path)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                running.append((i, proc, out_path))
            i, proc, out_path = running.pop(0)
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"rehearsal of rank {specs[i].rank} ran past {timeout_s:.0f} s") from None
            if proc.returncode != 0:
                tail = "\n".join(err.strip().splitlines()[-15:]) or \
                    f"exit status {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode == -9 else "")
                raise RuntimeError(f"rehearsal of rank {specs[i].rank} of {specs[i].world} failed:\n{tail}")
            results[i] = json.loads(out_path.read_text())
    return [r for r in results if r is not None]


@dataclass
class Report:
    """The rehearsal's outcome: per-rank comparisons, cross-rank problems, and ``ok``."""

    world: int
    model: str
    stack: str
    ranks: list[RankComparison]
    inconsistencies: list[str]
    digests: dict[int, str]
    wall_s: float
    planner_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def differences(self) -> list[str]:
        return [d for r in self.ranks for d in r.differences]

    @property
    def ok(self) -> bool:
        return not self.differences and not self.inconsistencies

    def text(self) -> str:
        head = (f"rehearsal: parallel.backend {self.stack}, {self.model}, world {self.world} (fake process group, meta parameters), "
                f"{len(self.ranks)} ranks rehearsed in {self.wall_s:.1f} s (planner {self.planner_s:.1f} s)")
        blocks = [head] + [format_rank(r) for r in self.ranks]
        digests = ", ".join(f"{r}: {d}" for r, d in self.digests.items())
        blocks.append("cross-rank consistency (collective sequence digests): " + digests + "\n  "
                      + ("identical on every rehearsed rank" if not self.inconsistencies else "\n  ".join(self.inconsistencies)))
        blocks.append("not covered / fake backend:\n  - " + "\n  - ".join(self.notes))
        verdict = "OK: rehearsal equals the planner and the ranks agree" if self.ok else \
            "DIFFERS:\n  " + "\n  ".join(self.differences + self.inconsistencies)
        return "\n".join(blocks + [verdict])

    def to_json(self) -> dict[str, Any]:
        return {"world": self.world, "model": self.model, "stack": self.stack, "ok": self.ok, "wall_s": self.wall_s,
                "planner_s": self.planner_s, "digests": self.digests, "inconsistencies": self.inconsistencies,
                "differences": self.differences, "notes": self.notes, "ranks": [asdict(r) for r in self.ranks]}


def rehearse(config: str | None, overrides: list[str], nodes: int, gpus_per_node: int, ranks: str = "sample",
             steps: int = 3, jobs: int = 1, model: str | None = None) -> Report:
    """Rehearse ``config`` (+ ``overrides``; ``model``: a planner preset replacing its model) on
    ``nodes × gpus_per_node`` fake ranks (module doc)."""
    started = time.perf_counter()
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if steps < 3:
        raise ValueError(f"--steps must be >= 3 (a plain step, an estimation step and the step after), got {steps}")
    world = nodes * gpus_per_node
    cfg = rehearsal_config(RankSpec(config, tuple(overrides), world, 0, steps, model))
    stack = stack_for(cfg)
    stack.check(cfg, world)
    if cfg.optim.ns_split_tolerance is not None:
        raise ValueError("optim.ns_split_tolerance is not rehearsed yet (the planner's split collectives are not compared)")
    planner = planner_for(cfg, nodes, gpus_per_node, stack.strategy)
    chosen = sample_ranks(planner, ranks)
    planner_s = time.perf_counter() - started
    specs = [RankSpec(config, tuple(overrides), world, r, steps, model) for r in chosen]
    results = run_ranks(specs, jobs)
    comparisons = [compare_rank(planner, res, chosen[res["rank"]]) for res in results]
    name = model or (Path(config).stem if config else "default model")
    notes = [SEAM_NOTE, *FAKE_BACKEND_NOTES,
             f"optim.estimate_every {load_run_config(config, list(overrides)).optim.estimate_every} is rehearsed as "
             f"{cfg.optim.estimate_every} (capped at 2, so step 2 estimates); "
             "nuclear_estimator auto is rehearsed as on a GPU (ns)",
             "the engine runs its non-CUDA path on meta: no side stream, the variance all-reduce at the estimation step",
             stack.note,
             "host ms are the optimizer step's host work on meta tensors (no kernel runs, but PyTorch's meta-kernel "
             "overhead, e.g. Python decompositions of isfinite, is included): compare across W, not with a GPU; "
             "construction s include ownership planning and the same-model check"]
    return Report(world, name, cfg.parallel.backend, comparisons, consistency(results),
                  {res["rank"]: sequence_digest(res) for res in results}, time.perf_counter() - started, planner_s, notes)
