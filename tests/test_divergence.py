"""A diverged run does not "complete": after ``train.max_consecutive_skips`` skipped (or
non-finite) steps in a row the loop stops with exit status 3, a clear message and no
``COMPLETED``; a NaN learning rate is refused before training (exit status 2)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lanton_dist.divergence import EXIT_DIVERGED, DivergenceGuard, Diverged

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--config", str(ROOT / "configs" / "llama-tiny-cpu.yaml"),
    "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
    "--model.ffn_dim", "64", "--data.seq_len", "32", "--train.global_batch", "4", "--train.eval_every", "0",
    "--train.log_every", "2", "--train.steps", "12", "--schedule.warmup_steps", "0",
]


def test_the_guard_stops_after_n_consecutive_skipped_or_non_finite_steps_only():
    guard = DivergenceGuard(3, skipped_steps=4)  # a resumed optimizer's count is the baseline
    guard.observe(1, 5, 2.0)  # skipped
    guard.observe(2, 5, 2.0)  # good: the run restarts
    guard.observe(3, 6, 2.0)
    guard.observe(4, 6, math.nan)  # not skipped (AdamW has no skip) but the loss is NaN
    with pytest.raises(Diverged, match=r"steps 3-5 \(3 in a row\).*train\.max_consecutive_skips=3"):
        guard.observe(5, 7, math.inf)


def test_max_consecutive_skips_zero_never_stops():
    guard = DivergenceGuard(0)
    for step in range(1, 100):
        guard.observe(step, step, math.nan)


def _launch(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LANTON_STOP_FILE")}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *SMALL, "--train.out_dir", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_launch_train_stops_a_diverging_run_with_exit_3_and_no_completed(tmp_path):
    """lr 1e30: step 1 blows the weights up, every later step has NaN gradients and is skipped."""
    res = _launch(tmp_path / "run", "--optim.lr.hidden", "1e30", "--train.max_consecutive_skips", "3",
                  "--train.checkpoint_every", "1")
    assert res.returncode == EXIT_DIVERGED, res.stdout[-2000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: steps 2-4 (3 in a row)") and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "COMPLETED").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def test_launch_train_refuses_a_nan_learning_rate_before_training(tmp_path):
    res = _launch(tmp_path / "run", "--optim.lr.hidden", "nan")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "config error: optim.lr.hidden must be a finite number >= 0.0, got nan"], res.stderr
    assert not (tmp_path / "run").exists()
