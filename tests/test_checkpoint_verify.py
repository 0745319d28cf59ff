"""Verified checkpoints: the ``COMMITTED`` marker carries a manifest (every file's size and
CRC-32) for the single-process (``state.pt``) and the DCP (``.distcp``) formats; resume verifies
the checkpoint before loading it and, when a file is damaged, names it and the reason and falls
back to the previous complete checkpoint, after which the run continues exactly as an
uninterrupted one; ``lanton-dist verify-checkpoint`` reports the same; a save that runs out of
disk space says so with the path and the free bytes and leaves the previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lanton_dist import checkpoint_dir as cd
from lanton_dist import cli
from lanton_dist.config import ConfigError, load_run_config
from lanton_dist.trainer import read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "llama-tiny-cpu.yaml"
SMALL = [
    "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
    "--model.ffn_dim", "64", "--data.seq_len", "32", "--train.global_batch", "4", "--train.eval_every", "0",
    "--train.log_every", "2", "--train.steps", "8", "--train.checkpoint_every", "2",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["none", "zero"])
def backend(request, monkeypatch) -> str:
    """``none``: one ``state.pt``; ``zero``: the engine's DCP directory (``.metadata`` + ``.distcp``),
    here a one-process gloo group started in this process."""
    if request.param == "zero":
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            monkeypatch.setenv(key, value)
    return request.param


def _cfg(out: Path, backend: str, *extra: str):
    return load_run_config(DEMO, [*SMALL, "--parallel.backend", backend, "--train.out_dir", str(out), *extra])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: a loadable file with one wrong weight
    path.write_bytes(bytes(data))


def _damage(ckpt: Path, backend: str, how: str) -> str:
    """Damage the tensor file of ``ckpt`` (the first ``.distcp`` shard or ``state.pt``); its name."""
    target = sorted(ckpt.glob("*.distcp"))[0] if backend == "zero" else ckpt / "state.pt"
    (_truncate if how == "truncated" else _flip)(target)
    return target.name


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint_naming_the_file_and_continues_exactly(tmp_path, backend, how):
    full = train(_cfg(tmp_path / "full", backend), log=lambda m: None)
    run = tmp_path / "cut"
    train(_cfg(run, backend, "--train.stop_after", "6"), log=lambda m: None)
    root = run / "checkpoints"
    assert [p.name for _, p in cd.complete_checkpoints(root)] == ["step_00000004", "step_00000006"]
    name = _damage(cd.step_dir(root, 6), backend, how)
    said: list[str] = []
    resumed = train(_cfg(run, backend, "--train.resume", "true"), log=said.append)
    assert resumed["resumed_from"] == str(cd.step_dir(root, 4))
    reason = "bytes, the manifest says" if how == "truncated" else "CRC-32"
    assert any(f"{cd.step_dir(root, 6)} is damaged: {name}:" in m and reason in m for m in said), said
    assert any(f"skipping {cd.step_dir(root, 6)}: it failed verification" in m for m in said), said
    assert [r["loss"] for r in read_metrics(resumed["metrics"])] == [r["loss"] for r in read_metrics(full["metrics"])]


def test_the_manifest_lists_every_file_with_its_size_and_checksum(tmp_path, backend):
    s = train(_cfg(tmp_path, backend, "--train.steps", "2"), log=lambda m: None)
    ckpt = Path(s["checkpoint"])
    manifest = cd.read_manifest(ckpt)
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != cd.MARKER)
    assert sorted(manifest) == files and cd.verify(ckpt) == []
    assert all(manifest[f]["size"] == (ckpt / f).stat().st_size for f in files)
    expected = {"state.pt"} if backend == "none" else {".metadata", "__0_0.distcp"}
    assert expected | {"loop.json", "rng/rank0.pt"} == set(files)


def test_a_checkpoint_without_a_manifest_still_loads_with_a_note(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "none", "--train.stop_after", "4"), log=lambda m: None)
    ckpt = cd.step_dir(run / "checkpoints", 4)
    marker = json.loads((ckpt / cd.MARKER).read_text())
    (ckpt / cd.MARKER).write_text(json.dumps({"step": marker["step"], "format": marker["format"]}))  # an older version's
    said: list[str] = []
    s = train(_cfg(run, "none", "--train.resume", "true"), log=said.append)
    assert s["resumed_from"] == str(ckpt)
    assert any("has no manifest" in m and "loading it unverified" in m for m in said), said


def test_when_every_checkpoint_is_damaged_resume_is_refused_rather_than_restarted(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "none", "--train.stop_after", "4"), log=lambda m: None)
    for _, ckpt in cd.complete_checkpoints(run / "checkpoints"):
        _truncate(ckpt / "state.pt")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        train(_cfg(run, "none", "--train.resume", "true"), log=lambda m: None)


def test_a_damaged_loop_json_is_skipped_before_the_model_is_built(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "none", "--train.stop_after", "4"), log=lambda m: None)
    _truncate(cd.step_dir(run / "checkpoints", 4) / cd.LOOP_STATE)
    said: list[str] = []
    s = train(_cfg(run, "none", "--train.resume", "true"), log=said.append)
    assert s["resumed_from"] == str(cd.step_dir(run / "checkpoints", 2))
    assert any("skipping" in m and "loop.json:" in m and "truncated" in m for m in said), said


def test_verify_checkpoint_command_exit_status_and_reasons(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "none", "--train.stop_after", "4"), log=lambda m: None)
    ckpt = cd.step_dir(run / "checkpoints", 4)
    assert cli.main(["verify-checkpoint", str(run)]) == 0
    assert cli.main(["verify-checkpoint", str(ckpt)]) == 0
    assert f"{ckpt}: ok" in capsys.readouterr().out
    _flip(ckpt / "rng" / "rank0.pt")
    assert cli.main(["verify-checkpoint", str(run / "checkpoints")]) == 1
    out = capsys.readouterr().out
    assert f"{ckpt}: DAMAGED\n  rng/rank0.pt: CRC-32" in out and f"{cd.step_dir(run / 'checkpoints', 2)}: ok" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify-checkpoint", str(tmp_path / "nothing")])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- a full disk
def _full_disk_at(step: int, error: BaseException):
    """A ``torch.save`` that fails like a full disk when writing checkpoint ``step`` (after writing half a file)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f".tmp-step_{step:08d}" in str(f):
            Path(f).write_bytes(b"partial")
            raise error
        return real(obj, f, *args, **kwargs)
    return save


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"),  # what torch.save says
], ids=["oserror", "torch-zip-writer"])
def test_a_full_disk_during_a_save_is_named_with_the_path_and_free_bytes_and_the_previous_checkpoint_is_intact(
        tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _full_disk_at(6, error))
    with pytest.raises(cd.OutOfSpace) as exc:
        train(_cfg(run, "none"), log=lambda m: None)
    root = run / "checkpoints"
    message = str(exc.value)
    assert message.startswith("no space left on device while saving checkpoint step 6: writing ")
    assert ".tmp-step_00000006" in message and " bytes free on " in message and str(cd.step_dir(root, 4)) in message
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]  # the partial save removed
    assert cd.verify(cd.step_dir(root, 4)) == [] and not (run / "COMPLETED").exists()


def test_launch_train_reports_a_full_disk_in_one_line_with_exit_2(tmp_path):
    code = ("import errno, os, runpy, sys, torch\n"
            "real = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    if '.tmp-step_00000004' in str(f): raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
            "    return real(obj, f, *a, **k)\n"
            "torch.save = save\n"
            "sys.argv = ['launch/train.py'] + sys.argv[1:]\n"
            "runpy.run_path('launch/train.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LANTON_STOP_FILE")}
    res = subprocess.run([sys.executable, "-c", code, "--config", str(DEMO), *SMALL, "--train.out_dir", str(tmp_path / "run")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device while saving checkpoint step 4: writing "), lines
    assert "state.pt" in lines[0] and "bytes free" in lines[0]
    assert cd.verify(cd.step_dir(tmp_path / "run" / "checkpoints", 2)) == []


@pytest.mark.parametrize("backend", ["zero"], indirect=True)
def test_a_full_disk_during_a_dcp_save_is_named_too(tmp_path, monkeypatch, backend):
    """The engine's DCP writer fails inside torch.distributed.checkpoint's worker: the error
    arrives wrapped (a ``CheckpointException`` with per-rank failures) and is still recognised."""
    import torch.distributed.checkpoint.filesystem as fs

    run = tmp_path / "run"
    train(_cfg(run, backend, "--train.steps", "2"), log=lambda m: None)
    monkeypatch.setattr(fs, "_write_item", _raise_enospc)  # the resumed run's first save (step 4) fails
    with pytest.raises(cd.OutOfSpace, match=r"step 4: writing .*\(\[Errno 28\] No space left on device\); [\d,]+ bytes free on ") as exc:
        train(_cfg(run, backend, "--train.resume", "true"), log=lambda m: None)
    assert "\n" not in str(exc.value)  # one line, not DCP's per-rank tracebacks
    assert [p.name for _, p in cd.complete_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert cd.verify(cd.step_dir(run / "checkpoints", 2)) == []


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------- two ranks (torchrun, gloo)
def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "launch" / "train.py"), "--config", str(DEMO), *SMALL, "--parallel.backend", "zero",
           "--train.out_dir", str(out), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.mark.slow
def test_two_ranks_write_one_manifest_and_fall_back_together_from_a_damaged_shard(tmp_path):
    """Each rank checksums half the files; rank 0 merges the parts into COMMITTED. On resume each
    rank verifies its half: rank 1 finds rank 0's truncated shard, both ranks fall back to step 4,
    and the run continues exactly as the uninterrupted one."""
    _torchrun(tmp_path / "full")
    run = tmp_path / "cut"
    _torchrun(run, "--train.stop_after", "6")
    ckpt = cd.step_dir(run / "checkpoints", 6)
    assert sorted(cd.read_manifest(ckpt)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "loop.json", "rng/rank0.pt",
                                              "rng/rank1.pt"]
    assert not (ckpt / ".manifest").exists() and cd.verify(ckpt) == []
    _truncate(ckpt / "__0_0.distcp")  # entry 1 of the sorted manifest: rank 1's share
    res = _torchrun(run, "--train.resume", "true")
    assert f"{ckpt} is damaged: __0_0.distcp:" in res.stdout and "(found by rank 1)" in res.stdout, res.stdout[-3000:]
    assert f"skipping {ckpt}: it failed verification" in res.stdout
    assert f"resumed from {cd.step_dir(run / 'checkpoints', 4)} at step 4" in res.stdout
    want = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl")] == want
