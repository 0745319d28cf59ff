"""Profiling any Python training command (:func:`profile_command`): a ``sitecustomize.py``
(:mod:`lanton_dist.profiling.bootstrap`, copied onto the children's ``PYTHONPATH``) hooks
``torch.optim.Optimizer``'s global step hooks in every Python process the command starts; each
process appends its step records to ``<out>/ranks/*.jsonl`` (:func:`auto_pre`/:func:`auto_post`),
the wrapper samples NVML meanwhile and merges. Interpreters started with ``-S``/``-I`` skip
``sitecustomize``."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lanton_dist.profiling.report import build_report
from lanton_dist.profiling.sampler import NVMLSampler
from lanton_dist.profiling.timers import Profiler

ENV_DIR = "LANTON_PROFILE_DIR"
#: The bootstrap module, copied as ``sitecustomize.py`` next to the command's other imports.
BOOTSTRAP = Path(__file__).resolve().with_name("bootstrap.py")

_AUTO: dict[int, Profiler] = {}
_AUTO_LOCK = threading.Lock()


def _auto_file(prof: Profiler) -> Path:
    return Path(os.environ[ENV_DIR], f"rank{prof.rank}-pid{os.getpid()}-{prof.label}.jsonl")


def _auto_flush(prof: Profiler, records: list[dict[str, Any]]) -> None:
    if records:
        with open(_auto_file(prof), "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def auto_pre(opt: Any) -> None:
    """Global pre-step hook of a wrapped command (:mod:`~lanton_dist.profiling.bootstrap`): with
    :data:`ENV_DIR` set, attach a :class:`Profiler` on first sight, then begin the step."""
    if not os.environ.get(ENV_DIR):
        return
    with _AUTO_LOCK:
        prof = _AUTO.get(id(opt))
        if prof is None:
            device = None
            for g in getattr(opt, "param_groups", []):
                for p in g.get("params", []):
                    device = p.device
                    break
                if device is not None:
                    break
            prof = Profiler(device=device, label=f"{type(opt).__name__}{len(_AUTO)}")
            prof.attach(opt, hooks=False)
            _AUTO[id(opt)] = prof
            if len(_AUTO) == 1:
                atexit.register(_auto_exit)
    prof.begin_step()


def auto_post(opt: Any) -> None:
    """Global post-step hook of a wrapped command: end the step, append its records to the rank file."""
    prof = _AUTO.get(id(opt))
    if prof is None:
        return
    before = len(prof.records)
    prof.end_step()
    _auto_flush(prof, prof.records[before:])


def _auto_exit() -> None:
    for prof in list(_AUTO.values()):
        before = len(prof.records)
        with contextlib.suppress(Exception):
            prof.finalize()
        _auto_flush(prof, prof.records[before:])


def profile_command(command: Sequence[str], out: str | Path, nvml_interval_s: float = 0.1, nvml: Any = None,
                    env: dict[str, str] | None = None) -> tuple[dict[str, Any], int]:
    """Run ``command`` with every Python process's optimizer steps profiled (module doc) and NVML
    sampled; return ``(report, exit status)``. Per-process records land in ``out/ranks``."""
    if not command:
        raise ValueError("no command to profile: give it after '--'")
    out = Path(out)
    ranks_dir, boot = out / "ranks", out / "_boot"
    if ranks_dir.exists():
        shutil.rmtree(ranks_dir)
    ranks_dir.mkdir(parents=True)
    boot.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BOOTSTRAP, boot / "sitecustomize.py")
    child_env = dict(os.environ if env is None else env)
    child_env[ENV_DIR] = str(ranks_dir.resolve())
    pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding lanton_dist/
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(boot.resolve()), pkg_root] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    sampler = NVMLSampler(nvml_interval_s, nvml=nvml).start()
    started = time.time()
    try:
        rc = subprocess.call(list(command), env=child_env)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot run {command[0]!r}: {exc}") from None
    finally:
        sampler.stop()
    records = []
    for path in sorted(ranks_dir.glob("*.jsonl")):
        records += [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    meta = {"kind": "command", "command": list(command), "exit_status": rc, "created": started, "host": socket.gethostname(),
            "torch": torch.__version__, "wall_s": time.time() - started, "rank_files": len(list(ranks_dir.glob("*.jsonl")))}
    if not records:
        raise RuntimeError(f"the command (exit status {rc}) ran no torch optimizer step that could be profiled "
                           "(is it a Python program started without -S/-I?)")
    return build_report(records, sampler.to_json(), meta), rc
