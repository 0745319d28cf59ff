"""One run per ``train.out_dir``: a second run on a directory in use is refused with one line
(exit 2) before it writes anything; a stale lock (its process is gone, or it is this requeued
Slurm job's) is taken over with a message; the lock is released when the run ends."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanton_dist import run_lock
from lanton_dist.config import load_run_config
from lanton_dist.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"
SMALL = [
    "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
    "--model.ffn_dim", "64", "--data.seq_len", "32", "--train.global_batch", "4", "--train.eval_every", "0",
    "--train.log_every", "2", "--train.steps", "4",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out: Path, *extra: str):
    return load_run_config(DEMO, [*SMALL, "--train.out_dir", str(out), *extra])


def _plant_lock(out: Path, **holder) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / run_lock.LOCK
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None,
                                "started": "2026-01-01T00:00:00Z", **holder}))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LANTON_STOP_FILE", "SLURM_JOB_ID")}
    return {**env, **extra}


def _launch(out: Path, *args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(DEMO), *SMALL,
                             "--train.out_dir", str(out), *args], cwd=ROOT, env=env or _env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_a_second_run_on_a_directory_in_use_is_refused_in_one_line_before_it_writes_anything(tmp_path):
    out = tmp_path / "run"
    lock = _plant_lock(out)  # held by this (live) test process on this host
    before = lock.read_text()
    res = _launch(out)
    _, stderr = res.communicate(timeout=300)
    assert res.returncode == 2, stderr[-3000:]
    assert stderr.strip().splitlines() == [stderr.strip()] and "Traceback" not in stderr
    assert stderr.startswith(f"config error: train.out_dir {out} is in use by another run (host {socket.gethostname()}, "
                             f"pid {os.getpid()}"), stderr
    assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK] and lock.read_text() == before


def test_two_concurrent_runs_on_one_directory_the_second_is_refused_and_the_first_finishes(tmp_path):
    out, stop_file = tmp_path / "run", tmp_path / "stop"
    first = _launch(out, "--train.steps", "100000", "--train.checkpoint_every", "0",
                    env=_env(LANTON_STOP_FILE=str(stop_file)))
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        with pytest.raises(run_lock.RunLocked, match=rf"in use by another run \(host .*, pid {first.pid}"):
            train(_cfg(out), log=lambda m: None)
        stop_file.touch()
        _, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert not (out / run_lock.LOCK).exists() and not (out / "COMPLETED").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # one writer: whole lines
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_message_and_released_at_the_end(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    _plant_lock(out, pid=gone.pid)
    said: list[str] = []
    s = train(_cfg(out), log=said.append)
    assert s["steps"] == 4 and (out / "COMPLETED").exists() and not (out / run_lock.LOCK).exists()
    assert any(m.startswith(f"run lock: taking over {out / run_lock.LOCK}") and f"its process {gone.pid} on this host is gone" in m
               for m in said), said


def test_a_requeued_slurm_jobs_own_lock_is_taken_over_even_from_another_node(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _plant_lock(out, host="node-017", pid=4321, slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    said: list[str] = []
    train(_cfg(out), log=said.append)
    assert any("taking over" in m and "this Slurm job (777), requeued" in m for m in said), said
    assert not (out / run_lock.LOCK).exists()


def test_another_nodes_lock_of_another_job_is_honoured_and_says_how_to_remove_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    lock = _plant_lock(out, host="node-017", pid=4321, slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(run_lock.RunLocked, match=rf"host node-017, pid 4321, Slurm job 777, .*if that run is gone, delete {lock}"):
        train(_cfg(out), log=lambda m: None)
    assert lock.exists() and sorted(p.name for p in out.iterdir()) == [run_lock.LOCK]


def test_only_rank_zero_takes_the_lock_and_a_run_taken_over_by_another_is_not_released_by_it(tmp_path):
    with run_lock.hold(tmp_path / "a", is_main=False, say=print):
        assert not (tmp_path / "a" / run_lock.LOCK).exists()
    with run_lock.hold(tmp_path / "b", is_main=True, say=print):
        lock = tmp_path / "b" / run_lock.LOCK
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        other = _plant_lock(tmp_path / "b", pid=os.getpid() + 1)  # e.g. taken over after we were presumed dead
    assert other.exists()
