"""One run per ``train.out_dir``: the run-directory lock.

The global-rank-0 process of a run holds ``<train.out_dir>/RUN_LOCK``, a JSON file with its
``host``, ``pid``, Slurm job id (``$SLURM_JOB_ID``, or null) and start time, created with
``O_CREAT | O_EXCL`` (atomic on POSIX and NFSv3+ file systems) before the run writes anything
into the directory, and removed when :func:`hold` exits (normally or by an exception; a
SIGKILLed process leaves it behind). A second run on the same directory finds the lock and is
refused with :class:`RunLocked`, a :class:`~lanton_dist.config.ConfigError` (one
``config error:`` line, exit status 2) — before it writes a metric, a checkpoint or
``COMPLETED``. A lock is *stale*, and taken over with a message, when

* it was written on this host and its pid is no longer alive (a crashed or killed run), or
* it carries this process's ``$SLURM_JOB_ID`` (the same job, requeued: its earlier
  incarnation is gone even if it ran on another node).

A lock from another host with another (or no) Slurm job id cannot be checked from here: it is
honoured, and the message says how to remove it if that run is really gone. Only rank 0
decides; the other ranks of a refused run never get past the process-group start-up (their
launcher stops them when rank 0 exits), and they write nothing before it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lanton_dist.config import ConfigError

LOCK = "RUN_LOCK"


class RunLocked(ConfigError):
    """Another live run holds the directory's lock."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = holder.get("slurm_job_id")
    return (f"host {holder.get('host')}, pid {holder.get('pid')}" + (f", Slurm job {job}" if job else "")
            + f", since {holder.get('started')}")


def stale_reason(holder: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why the lock ``holder`` may be taken over by ``me`` (both as :func:`_owner` writes them),
    or None when it may belong to a live run."""
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it belongs to this Slurm job ({me['slurm_job_id']}), requeued"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    return None


def acquire(out_dir: str | Path, say: Callable[[str], None]) -> Path:
    """Create the lock of ``out_dir`` for this process (creating ``out_dir`` if needed), taking
    over a stale one (with a message through ``say``); raise :class:`RunLocked` when another live
    run holds it. Returns the lock's path."""
    path = Path(out_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _owner()
    for _ in range(3):  # a concurrent take-over can remove the file between our two calls
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except FileNotFoundError:
                continue
            except (OSError, ValueError):  # written by a process killed mid-write: nothing to honour
                holder = {}
            reason = stale_reason(holder, me) if holder else "it is empty or unreadable"
            if reason is None:
                raise RunLocked(f"train.out_dir {out_dir} is in use by another run ({_describe(holder)}): wait for it to "
                                f"finish or choose another train.out_dir (if that run is gone, delete {path})") from None
            say(f"run lock: taking over {path} ({_describe(holder) if holder else 'no owner'}): {reason}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunLocked(f"train.out_dir {out_dir}: could not take {path}: another run keeps creating it")


def release(path: Path) -> None:
    """Remove the lock at ``path`` if this process still holds it (a run that took it over is not disturbed)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(out_dir: str | Path, *, is_main: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the body (global rank 0: ``is_main``; a no-op on other ranks)."""
    if not is_main:
        yield
        return
    path = acquire(out_dir, say)
    try:
        yield
    finally:
        release(path)
