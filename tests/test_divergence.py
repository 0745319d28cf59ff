"""A diverged run does not "complete": after ``train.max_consecutive_skips`` skipped (or
non-finite) steps in a row the loop stops with exit status 3, a clear message and no
``COMPLETED``; a NaN learning rate is refused before training (exit status 2)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lanton_dist import trainer
from lanton_dist.config import ConfigError, check_run_config, load_run_config
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


def test_a_finite_loss_above_factor_times_the_median_of_recent_good_losses_is_a_bad_step():
    guard = DivergenceGuard(2, spike_factor=3.0, spike_window=3)
    for step, loss in enumerate([9.0, 4.0, 3.0, 2.0], start=1):  # a falling loss is good; the window keeps 4, 3, 2
        guard.observe(step, 0, loss)
        assert guard.run == 0
    guard.observe(5, 0, 9.5)  # > 3 × median(4, 3, 2) = 9
    assert guard.run == 1 and list(guard.recent) == [4.0, 3.0, 2.0]  # a bad loss never enters the window
    guard.observe(6, 0, 8.9)  # below the limit: the bad run closes
    assert guard.run == 0
    guard.observe(7, 0, 1e5)
    spike = r"a loss above 9 \(train\.loss_spike_factor 3 × the median of the last 3 good losses\)"
    with pytest.raises(Diverged, match=r"steps 7-8 \(2 in a row\).*" + spike) as err:
        guard.observe(8, 0, 2e5)
    assert (err.value.first, err.value.last) == (7, 8)


def test_max_consecutive_skips_zero_never_stops():
    guard = DivergenceGuard(0)
    for step in range(1, 100):
        guard.observe(step, step, math.nan)


def _launch(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LANTON_STOP_FILE")}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *SMALL, "--train.out_dir", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_launch_train_stops_a_diverging_run_with_exit_3_and_no_completed(tmp_path):
    """lr 1e30: step 1 blows the weights up, every later step has NaN gradients and is skipped;
    step 1's checkpoint holds those weights, so it is set aside and none predates the trouble."""
    res = _launch(tmp_path / "run", "--optim.lr.hidden", "1e30", "--train.max_consecutive_skips", "3",
                  "--train.checkpoint_every", "1")
    assert res.returncode == EXIT_DIVERGED, res.stdout[-2000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: steps 2-4 (3 in a row)") and "Traceback" not in res.stderr
    assert last.endswith("No checkpoint predates the trouble (the weights after 1 step(s) gave the first bad loss): "
                         "restart from step 0 with a lower learning rate.")
    assert not (tmp_path / "run" / "COMPLETED").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["diverged-step_00000001"]


def test_a_finite_loss_explosion_stops_the_run_and_the_newest_kept_checkpoint_predates_it(tmp_path):
    """lr 1000 everywhere explodes the loss to ~1e5 (finite: no step is skipped). A run that
    learned 4 steps at a tiny rate (the same peak, a 10⁵-step warm-up) resumes without warm-up:
    step 5 is still good (it measures step 4's weights), step 6 is the first spike."""
    run = tmp_path / "run"
    lr = ["--optim.lr.hidden", "1000", "--optim.lr.embed_head", "1000", "--optim.lr.vector", "1000",
          "--train.max_consecutive_skips", "3", "--train.checkpoint_every", "2"]
    first = _launch(run, *lr, "--schedule.warmup_steps", "100000", "--train.stop_after", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    res = _launch(run, *lr, "--train.resume", "true", "--train.checkpoint_every", "1")
    assert res.returncode == EXIT_DIVERGED, res.stdout[-2000:] + res.stderr[-3000:]
    ckpts = run / "checkpoints"
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: steps 6-8 (3 in a row)")
    assert "(train.loss_spike_factor 5 × the median of the last 1 good losses)" in last
    assert last.endswith(f"The newest kept checkpoint, {ckpts / 'step_00000004'}, predates it: resume from it with the "
                         "same command plus --train.resume true and a gentler schedule (schedule.* may change on resume, "
                         "optim.* may not).")
    assert (f"step 6: no checkpoint while 1 bad step(s) in a row are open (the last good state: {ckpts / 'step_00000004'})"
            in res.stdout)
    assert sorted(p.name for p in ckpts.iterdir()) == ["diverged-step_00000005", "step_00000002", "step_00000004"]
    assert not (run / "COMPLETED").exists()


def test_with_the_spike_rule_off_a_finite_explosion_runs_on(tmp_path):
    res = _launch(tmp_path / "run", "--optim.lr.hidden", "1000", "--optim.lr.embed_head", "1000", "--optim.lr.vector",
                  "1000", "--train.loss_spike_factor", "0", "--train.steps", "4")
    assert res.returncode == 0 and (tmp_path / "run" / "COMPLETED").exists(), res.stderr[-3000:]


def test_launch_train_refuses_a_nan_learning_rate_before_training(tmp_path):
    res = _launch(tmp_path / "run", "--optim.lr.hidden", "nan")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "config error: optim.lr.hidden must be a finite number >= 0.0, got nan"], res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, message", [
    ("0.5", "train.loss_spike_factor must be 0 (off) or > 1, got 0.5"),
    ("-1", "train.loss_spike_factor must be a finite number >= 0.0, got -1.0"),
], ids=["below-one", "negative"])
def test_bad_spike_factors_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run_config(load_run_config(None, ["--train.loss_spike_factor", value]), 1)
    with pytest.raises(ConfigError, match="train.loss_spike_window must be >= 1, got 0"):
        check_run_config(load_run_config(None, ["--train.loss_spike_window", "0"]), 1)


# ----------------------------------------------------------------------------- injected NaN losses
def _cfg(out: Path, *extra: str):
    args = [a for a in SMALL if a != "--config"][1:]  # SMALL without "--config PATH"
    return load_run_config(ROOT / "configs" / "llama-tiny-cpu.yaml", [*args, "--train.out_dir", str(out), *extra])


def _nan_losses_at(monkeypatch, steps: set[int]) -> None:
    """Training steps ``steps`` (1-based) report a NaN loss; the weights still update normally."""
    real, calls = trainer.train_step, []

    def step(*args, **kwargs):
        calls.append(None)
        res = real(*args, **kwargs)
        return res._replace(loss=torch.full_like(res.loss, math.nan)) if len(calls) in steps else res
    monkeypatch.setattr(trainer, "train_step", step)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_nan_losses_stop_the_run_and_keep_the_checkpoints_before_the_trouble_then_resume_from_the_newest(
        tmp_path, monkeypatch):
    """NaN from step 7 on: step 6's checkpoint holds the weights that gave it, so it is set aside;
    nothing is written or pruned from step 7 on; the stop names step 5, and resuming starts there."""
    run = tmp_path / "run"
    _nan_losses_at(monkeypatch, set(range(7, 13)))
    said: list[str] = []
    with pytest.raises(Diverged) as err:
        trainer.train(_cfg(run, "--train.checkpoint_every", "1", "--train.max_consecutive_skips", "3"), log=said.append)
    assert (err.value.first, err.value.last) == (7, 9)
    assert str(err.value).endswith(f"The newest kept checkpoint, {run / 'checkpoints' / 'step_00000005'}, predates it: "
                                   "resume from it with the same command plus --train.resume true and a gentler schedule "
                                   "(schedule.* may change on resume, optim.* may not).")
    assert _names(run / "checkpoints") == ["diverged-step_00000006", "step_00000004", "step_00000005"]
    assert sum("no checkpoint while" in m for m in said) == 2  # steps 7, 8 (the stop comes at 9 before its save)
    monkeypatch.undo()
    s = trainer.train(_cfg(run, "--train.resume", "true"), log=lambda m: None)
    assert s["resumed_from"] == str(run / "checkpoints" / "step_00000005") and s["steps"] == 12


def test_a_save_due_during_a_bad_run_waits_for_its_end_and_nothing_is_pruned_meanwhile(tmp_path, monkeypatch):
    """Bad steps 5 and 6 (fewer than max_consecutive_skips): the save due at step 6 is written at
    step 7; step 4's checkpoint (unconfirmed: step 5 was bad) and step 2's stay until then."""
    run = tmp_path / "run"
    _nan_losses_at(monkeypatch, {5, 6})
    seen: dict[int, list[str]] = {}
    real_prune = trainer.checkpoint_dir.prune

    def prune(root, keep):
        seen[len(seen)] = _names(root)
        real_prune(root, keep)
    monkeypatch.setattr(trainer.checkpoint_dir, "prune", prune)
    said: list[str] = []
    s = trainer.train(_cfg(run, "--train.checkpoint_every", "2", "--train.keep_checkpoints", "1"), log=said.append)
    assert s["steps"] == 12 and (run / "COMPLETED").exists()
    assert any(m.startswith("step 6: no checkpoint while 2 bad step(s) in a row are open") for m in said), said
    # what each prune found: at step 3 (step 2 confirmed), at step 7 (the bad run over: step 4 kept
    # through it), at step 8 (the postponed save of step 7 written)
    assert [seen[i] for i in range(3)] == [["step_00000002"], ["step_00000002", "step_00000004"],
                                           ["step_00000004", "step_00000007"]]
    assert _names(run / "checkpoints") == ["step_00000012"]
