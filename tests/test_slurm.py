"""Slurm scripts and the command builder: syntax, dry runs, and the requeue logic with fake
``srun``/``scontrol`` executables (no Slurm needed)."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "slurm" / "pretrain_llama.sbatch", ROOT / "slurm" / "pretrain_llama_single_node.sbatch"]
sys.path.insert(0, str(ROOT / "slurm"))

from launch import expand_nodelist  # noqa: E402


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "DRY_RUN")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or _clean_env(), capture_output=True, text=True, timeout=120, check=check)


def _line(out: str, start: str) -> list[str]:
    lines = [ln.strip().rstrip("\\").strip() for ln in out.splitlines() if ln.strip().startswith(start)]
    assert len(lines) == 1, f"expected one line starting with {start!r} in:\n{out}"
    return shlex.split(lines[0])


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_syntax(script):
    assert script.exists()
    _run(["bash", "-n", str(script)])
    text = script.read_text()
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@" in text
    assert "#SBATCH --mem=" in text
    assert "source slurm/common.sh" in text and "lanton_run " in text  # output in the run dir, capped requeue


def test_expand_nodelist():
    assert expand_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]
    with pytest.raises(ValueError):
        expand_nodelist("gpu[3-1]")


def test_dry_run_four_nodes():
    out = _run([sys.executable, "slurm/launch.py", "--config", "configs/llama-7b.yaml", "--nodes", "4",
                "--gpus-per-node", "8", "--nodelist", "gpu[017-020]", "--job-id", "4242", "--dry-run",
                "--", "--data.path", "/data/c4_text_document"]).stdout
    srun = _line(out, "srun")
    assert srun[0] == "srun" and "--nodes=4" in srun and "--ntasks-per-node=1" in srun and "--ntasks=4" in srun
    torchrun = _line(out, "torchrun")
    assert _flag(torchrun, "--nnodes") == "4"
    assert _flag(torchrun, "--nproc-per-node") == "8"
    assert _flag(torchrun, "--rdzv-backend") == "c10d"
    assert _flag(torchrun, "--rdzv-endpoint") == "gpu017:29500"
    assert _flag(torchrun, "--rdzv-id") == "4242"
    script = torchrun.index("launch/train.py")  # Megatron runs through the one training entry
    assert torchrun[script + 1:] == ["--config", "configs/llama-7b.yaml", "--data.path", "/data/c4_text_document",
                                     "--train.resume", "true"]
    assert "export MASTER_ADDR=gpu017" in out
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    assert "data_parallel=2" in out  # 32 ranks / (tp 8 · pp 2)


def test_sbatch_dry_run_uses_slurm_environment():
    env = _clean_env(DRY_RUN="1", SLURM_NNODES="4", SLURM_JOB_NODELIST="node[07-10]", SLURM_JOB_ID="99",
                     SLURM_SUBMIT_DIR=str(ROOT))
    out = _run(["bash", str(SCRIPTS[0]), "configs/llama-7b.yaml", "--train.steps", "10"], env=env).stdout
    torchrun = _line(out, "torchrun")
    assert _flag(torchrun, "--nnodes") == "4"
    assert _flag(torchrun, "--nproc-per-node") == "8"
    assert _flag(torchrun, "--rdzv-endpoint") == "node07:29500"
    assert _flag(torchrun, "--rdzv-id") == "99"
    assert "--train.steps" in torchrun
    assert "--nodes=4" in _line(out, "srun")


def test_single_node_dry_run():
    env = _clean_env(DRY_RUN="1", SLURM_SUBMIT_DIR=str(ROOT))
    out = _run(["bash", str(SCRIPTS[1]), "configs/llama-1b.yaml"], env=env).stdout
    torchrun = _line(out, "torchrun")
    assert "--standalone" in torchrun and _flag(torchrun, "--nproc-per-node") == "8"
    assert not any(ln.startswith("srun") for ln in out.splitlines())


def test_bad_layouts_are_refused():
    res = _run([sys.executable, "slurm/launch.py", "--config", "configs/llama-7b.yaml", "--nodes", "3",
                "--nodelist", "gpu[1-3]", "--dry-run"], check=False)
    assert res.returncode == 2 and "not divisible by tp·pp" in res.stderr
    res = _run([sys.executable, "slurm/launch.py", "--config", "configs/llama-7b.yaml", "--nodes", "4",
                "--nodelist", "gpu[1-2]", "--dry-run"], check=False)
    assert res.returncode == 2 and "has 2 hosts" in res.stderr
    res = _run([sys.executable, "slurm/launch.py", "--config", "configs/llama-7b.yaml", "--nodes", "2",
                "--nodelist", "gpu[1-2]", "--dry-run", "--", "--train.no_such_key", "1"], check=False)
    assert res.returncode != 0 and "no_such_key" in res.stderr


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed", "zero"])
def test_framework_backends_launch_the_small_training_entry_with_a_divisible_batch(backend):
    """FSDP2 / DeepSpeed / engine runs go through launch/train.py, one torchrun per node."""
    common = [sys.executable, "slurm/launch.py", "--config", "configs/llama-tiny-cpu.yaml", "--nodes", "2",
              "--gpus-per-node", "4", "--nodelist", "gpu[1-2]", "--dry-run", "--", "--parallel.backend", backend]
    out = _run(common).stdout
    torchrun = _line(out, "torchrun")
    script = torchrun.index("launch/train.py")
    assert torchrun[script + 1:] == ["--config", "configs/llama-tiny-cpu.yaml", "--parallel.backend", backend,
                                     "--train.resume", "true"]
    assert "data_parallel=8" in out
    res = _run([*common, "--train.global_batch", "12"], check=False)  # 12 rows over 8 ranks
    assert res.returncode == 2 and "global_batch 12 is not divisible by the 8 ranks" in res.stderr


def test_single_process_backend_is_refused_by_the_launcher():
    res = _run([sys.executable, "slurm/launch.py", "--config", "configs/llama-tiny-cpu.yaml", "--nodes", "1",
                "--nodelist", "gpu1", "--dry-run"], check=False)
    assert res.returncode == 2 and "distributed backend" in res.stderr


FAKE_SRUN = """#!/bin/bash
# fake srun: record the command, then behave as the training job told by $FAKE_MODE
echo "$@" > "$FAKE_DIR/srun.args"
touch "$FAKE_DIR/started"
if [[ "$FAKE_MODE" == complete ]]; then echo 3 > "$OUT_DIR/COMPLETED"; exit 0; fi
for i in $(seq 1 200); do
    if [[ -f "$LANTON_STOP_FILE" ]]; then echo "stop file seen" ; exit "${FAKE_EXIT:-0}"; fi
    sleep 0.1
done
exit 7
"""

FAKE_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then for i in $(seq -w 1 5000); do echo "fakehost$i"; done; exit 0; fi
echo "$@" >> "$FAKE_DIR/scontrol.log"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out_dir = tmp_path / "run"
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), OUT_DIR=str(out_dir),
                     SLURM_NNODES="2", SLURM_JOB_NODELIST="fakehost[01-02]", SLURM_JOB_ID="555",
                     SLURM_SUBMIT_DIR=str(ROOT))
    return tmp_path, out_dir, env


def _job_log(out_dir: Path, job_id: str = "555") -> str:
    """What the job printed after the first line: it goes to ``<out_dir>/slurm-<job id>.out``."""
    return (out_dir / f"slurm-{job_id}.out").read_text()


def _usr1_once_started(tmp: Path, out_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Run the 7B sbatch script under the fake Slurm, send USR1 once the fake srun started, and
    return the finished process with the job's output (Slurm's output file and the run dir's log)."""
    proc = subprocess.Popen(["bash", str(SCRIPTS[0]), "configs/llama-7b.yaml", "--train.out_dir", str(out_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp / "started").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "fake srun never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    return proc, out + _job_log(out_dir)


def test_sbatch_requeues_after_usr1(fake_slurm):
    tmp, out_dir, env = fake_slurm
    env["FAKE_MODE"] = "wait"
    proc, out = _usr1_once_started(tmp, out_dir, env)
    assert proc.returncode == 0, out
    assert "stop file seen" in out
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "555"]
    args = (tmp / "srun.args").read_text().split()
    assert "--rdzv-endpoint" in args and args[args.index("--rdzv-endpoint") + 1] == "fakehost0001:29500"
    assert not list(out_dir.glob(".stop-*")), "the stop file must be removed before the requeue"


def test_sbatch_completed_run_is_not_requeued(fake_slurm):
    tmp, out_dir, env = fake_slurm
    env["FAKE_MODE"] = "complete"
    res = subprocess.run(["bash", str(SCRIPTS[0]), "configs/llama-7b.yaml", "--train.out_dir", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "training completed" in _job_log(out_dir)
    assert not (tmp / "scontrol.log").exists()


def test_sbatch_does_not_requeue_a_run_that_failed_after_a_stop_request(fake_slurm):
    """Diverged (exit 3) or refused (exit 2) while a stop was pending: requeueing would repeat it."""
    tmp, out_dir, env = fake_slurm
    env.update(FAKE_MODE="wait", FAKE_EXIT="3")
    proc, out = _usr1_once_started(tmp, out_dir, env)
    assert proc.returncode == 3, out
    assert "exited with status 3 before completing (not requeued)" in out
    assert not (tmp / "scontrol.log").exists() and not list(out_dir.glob(".stop-*"))


def test_sbatch_output_goes_to_the_run_directory_after_one_line(fake_slurm):
    tmp, out_dir, env = fake_slurm
    env["FAKE_MODE"] = "complete"
    res = subprocess.run(["bash", str(SCRIPTS[0]), "configs/llama-7b.yaml", "--train.out_dir", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"output continues in {out_dir}/slurm-555.out"), lines
    log = _job_log(out_dir)
    assert "restart 0 of at most 20: 2 nodes x 8 GPUs" in log and "training completed" in log


def test_a_job_restarted_past_the_requeue_cap_does_not_start(fake_slurm):
    tmp, out_dir, env = fake_slurm
    env.update(FAKE_MODE="complete", SLURM_RESTART_COUNT="4", LANTON_MAX_REQUEUES="3")
    res = subprocess.run(["bash", str(SCRIPTS[0]), "configs/llama-7b.yaml", "--train.out_dir", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 4
    assert not (tmp / "started").exists() and not (out_dir / "COMPLETED").exists()
    refused = [ln for ln in _job_log(out_dir).splitlines() if "past the cap" in ln]
    assert len(refused) == 1 and "restart 4 is past the cap LANTON_MAX_REQUEUES=3: not starting" in refused[0]


def test_a_clean_stop_at_the_requeue_cap_is_not_requeued(fake_slurm):
    tmp, out_dir, env = fake_slurm
    env.update(FAKE_MODE="wait", SLURM_RESTART_COUNT="3", LANTON_MAX_REQUEUES="3")
    proc, out = _usr1_once_started(tmp, out_dir, env)
    assert proc.returncode == 4, out
    assert "requeue cap reached (3 restarts, LANTON_MAX_REQUEUES=3): not requeued" in out
    assert not (tmp / "scontrol.log").exists() and not list(out_dir.glob(".stop-*"))


def test_a_clean_stop_below_the_requeue_cap_is_requeued(fake_slurm):
    tmp, out_dir, env = fake_slurm
    env.update(FAKE_MODE="wait", SLURM_RESTART_COUNT="2", LANTON_MAX_REQUEUES="3")
    proc, out = _usr1_once_started(tmp, out_dir, env)
    assert proc.returncode == 0, out
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "555"]
