"""Signals at the launcher: Ctrl-C (SIGINT) and SIGTERM stop a 2-process CPU run the way SIGTERM to
the trainers does — a checkpoint, exit status 0, no ``COMPLETED`` — through
``python -m lanton_dist.launcher``; plain ``torchrun`` forwards SIGINT and the trainers checkpoint
too; trainers whose launcher is SIGKILLed exit within seconds (after checkpointing) instead of
running on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanton_dist.launcher import STOP_FILE_ENV, Launcher
from lanton_dist.preemption import TORCHRUN_ENV, StopRequest, exit_with_launcher

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"
RUN = ["--config", str(DEMO), "--parallel.backend", "ddp", "--model.dim", "32", "--model.n_layers", "1",
       "--model.ffn_dim", "64", "--model.n_heads", "2", "--model.n_kv_heads", "2", "--data.seq_len", "32",
       "--train.global_batch", "4", "--train.steps", "100000", "--train.log_every", "1", "--train.eval_every", "0"]
TORCHRUN = ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
LAUNCHER = ["-m", "lanton_dist.launcher", "--nproc-per-node", "2"]


def start(tmp_path: Path, launcher: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start ``launcher launch/train.py RUN`` (output to a file) and wait until it has run 3 steps."""
    log = tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LANTON_STOP_FILE", TORCHRUN_ENV)}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *launcher, str(ROOT / "launch" / "train.py"), *RUN,
                                 "--train.out_dir", str(tmp_path / "run")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while "step 3/" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach step 3:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, log


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc``)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def assert_stopped_with_a_checkpoint(tmp_path: Path, log: Path) -> None:
    run = tmp_path / "run"
    text = log.read_text()
    assert "stop requested: checkpointing and exiting" in text, text[-3000:]
    assert "KeyboardInterrupt" not in text, text[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] is True and summary["steps"] >= 3
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{summary['steps']:08d}"]
    assert not (run / "COMPLETED").exists()


# ----------------------------------------------------------------------------- multi-process
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_at_the_launcher_checkpoints_and_exits_0_without_completed(tmp_path, sig):
    proc, log = start(tmp_path, LAUNCHER)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert_stopped_with_a_checkpoint(tmp_path, log)
    assert f"lanton_dist.launcher: {sig.name}" in log.read_text() and "Traceback" not in log.read_text()


@pytest.mark.slow
def test_plain_torchrun_forwards_sigint_and_the_trainers_checkpoint_and_exit(tmp_path):
    proc, log = start(tmp_path, TORCHRUN)
    trainers = children(proc.pid)
    assert len(trainers) == 2
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)  # torchrun itself re-raises the signal (exit 1): its design, see lanton_dist.launcher
    assert not any(alive(t) for t in trainers)
    assert_stopped_with_a_checkpoint(tmp_path, log)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [TORCHRUN, LAUNCHER], ids=["torchrun", "lanton_dist.launcher"])
def test_trainers_exit_within_seconds_when_their_launcher_is_killed(tmp_path, launcher):
    proc, log = start(tmp_path, launcher)
    tree = children(proc.pid)
    trainers = [t for p in tree for t in children(p)] if launcher == LAUNCHER else tree
    assert len(trainers) == 2
    trainers += [p for p in tree if p not in trainers]  # the launcher's torchrun goes too
    proc.kill()  # SIGKILL: no handler runs in the launcher
    proc.wait()
    t0 = time.monotonic()
    while any(alive(t) for t in trainers) and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    waited = time.monotonic() - t0
    assert not any(alive(t) for t in trainers), log.read_text()[-3000:]
    assert waited < 30, waited  # a few seconds on an idle machine: the end of a step, a checkpoint, the summary
    assert_stopped_with_a_checkpoint(tmp_path, log)


# ----------------------------------------------------------------------------- in process
def test_sigint_is_a_stop_request_and_a_second_one_interrupts_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(None, (signal.SIGINT, signal.SIGTERM)) as req:
        assert not req.local()
        os.kill(os.getpid(), signal.SIGINT)
        assert req.local() and req.agreed(lambda local: local)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGINT) is before  # the handlers it replaced are back


def test_a_stop_request_from_the_environment_answers_sigint_sigterm_and_sigusr1(monkeypatch):
    monkeypatch.delenv("LANTON_STOP_FILE", raising=False)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        with StopRequest.from_environment() as req:
            os.kill(os.getpid(), sig)
            assert req.local(), sig


def test_the_parent_death_signal_is_armed_only_under_torchrun(monkeypatch):
    monkeypatch.delenv(TORCHRUN_ENV, raising=False)
    assert exit_with_launcher() is False  # a shell's child keeps running when the shell goes (nohup)
    code = ("import os, signal; from lanton_dist.preemption import exit_with_launcher; assert exit_with_launcher(); "
            "import ctypes; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); "
            "assert v.value == signal.SIGTERM, v.value; print('armed')")  # 2: PR_GET_PDEATHSIG
    env = {**os.environ, TORCHRUN_ENV: "test", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "armed" in res.stdout, res.stderr


def test_the_launcher_asks_through_the_stop_file_first_and_terminates_its_child_on_a_second_signal(tmp_path):
    stop, seen = tmp_path / "stop", tmp_path / "seen"
    child = f"import os, time; open({str(seen)!r}, 'w').write(os.environ[{STOP_FILE_ENV!r}]); time.sleep(120)"
    launcher = Launcher([sys.executable, "-c", child], stop)
    deadline = time.monotonic() + 60
    while not (seen.exists() and seen.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen.read_text() == str(stop)  # the trainers watch the launcher's stop file
    assert os.getsid(launcher.proc.pid) == launcher.proc.pid  # its own session: a terminal's Ctrl-C skips it
    launcher.handle(signal.SIGINT, None)
    assert stop.exists() and launcher.proc.poll() is None  # a request, not a kill: the trainers stop on their own
    launcher.handle(signal.SIGTERM, None)
    assert launcher.wait() == 128 + signal.SIGTERM
