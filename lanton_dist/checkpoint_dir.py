"""The checkpoint directories of a run of the training loop (:mod:`lanton_dist.trainer`, every
backend).

Layout under ``<train.out_dir>/checkpoints``::

    step_00000500/            a complete checkpoint (renamed into place when finished)
        COMMITTED             completion marker, written last: {"step": 500, "format": 1}
        loop.json             loop state: step, config, scheduler, backend, world size
        ...                   the backend's files (DCP shards + .metadata, state.pt, rng/, ...)
    .tmp-step_00000600/       a save in progress, or one cut short: never read

A save writes everything into ``.tmp-step_N``; when every rank has finished, rank 0 writes
``loop.json`` and the ``COMMITTED`` marker, then renames the directory to ``step_N``
(:func:`commit`, atomic on POSIX file systems). A job killed in the middle of a save (torchrun
SIGKILLs 30 s after SIGTERM) leaves only a ``.tmp-`` directory, and :func:`latest_complete`
resumes from the newest ``step_N`` that has its marker, logging which one and why the newer
entries were passed over. :func:`prune` keeps the newest ``keep_last`` complete checkpoints.

Nothing in a checkpoint directory is un-pickled by this package: loop state is JSON, tensors
are read with ``torch.load(weights_only=True)``. The backends' own formats
(``torch.distributed.checkpoint``'s ``.metadata``, DeepSpeed's files) are read by their
libraries, which use pickle: a checkpoint directory is trusted input, like any torch checkpoint.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lanton_dist.config import ConfigError, RunConfig, check_resume, to_dict

CHECKPOINTS = "checkpoints"
MARKER = "COMMITTED"
LOOP_STATE = "loop.json"
RNG_DIR = "rng"
FORMAT = 1
TMP_PREFIX = ".tmp-"
_STEP = re.compile(r"^step_(\d+)$")


def root_of(out_dir: str | Path) -> Path:
    """``<out_dir>/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step_dir(root, step).name}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / LOOP_STATE).is_file()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir() and is_complete(p)]
    return sorted(found)


def latest_complete(root: Path, log: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none). Logs the one it
    picked and why every newer-looking entry (an unfinished save, a ``step_N`` without marker,
    a file of another format) was skipped. Raises :class:`~lanton_dist.config.ConfigError`
    when ``root`` holds only checkpoints of the earlier format (``step_N.pt`` files, a
    ``latest`` pointer): starting from step 0 there would silently drop that run."""
    if not root.is_dir():
        return None
    complete = complete_checkpoints(root)
    legacy = sorted(p.name for p in root.iterdir() if p.name == "latest" or (p.suffix == ".pt" and _STEP.match(p.stem)))
    if not complete and legacy:
        raise ConfigError(f"train.resume: {root} holds checkpoints of an earlier format ({', '.join(legacy[-3:])}) and "
                          "no complete step_N directory; resume them with the version that wrote them, or move them away "
                          "to start from step 0")
    newest = complete[-1][0] if complete else -1
    for p in sorted(root.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            log(f"resume: skipping {p}: a save that did not finish (no rename into place)")
        elif (m := _STEP.match(p.name.removesuffix(".pt"))) and int(m.group(1)) >= newest and not (
                p.is_dir() and is_complete(p)):
            why = "not a directory (a checkpoint of an older format)" if not p.is_dir() else f"no {MARKER} marker or {LOOP_STATE}"
            log(f"resume: skipping {p}: {why}")
    if not complete:
        return None
    path = complete[-1][1]
    log(f"resume: {path} is the newest complete checkpoint (step {newest})")
    return path


def commit(root: Path, step: int, loop_state: dict[str, Any]) -> Path:
    """Finish the save of ``step`` (rank 0 only, after every rank has written into
    :func:`tmp_dir`): write ``loop.json`` and the marker, rename to :func:`step_dir`."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    (tmp / LOOP_STATE).write_text(json.dumps({"format": FORMAT, **loop_state}, indent=1))
    (tmp / MARKER).write_text(json.dumps({"step": step, "format": FORMAT}) + "\n")
    if final.exists():  # the same step saved again (a resumed run stopped at once): replace it
        old = root / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and any unfinished saves
    (rank 0 only, after a commit: no save is in progress)."""
    for _, old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p)


def save(root: Path, step: int, write: Callable[[Path], None], loop_state: dict[str, Any], *, is_main: bool,
         barrier: Callable[[], None], keep_last: int) -> Path:
    """Atomically save checkpoint ``step``: collective over every rank of the job.

    ``write(directory)`` is called on every rank and writes that rank's files into the
    temporary directory; ``loop_state`` (JSON-serialisable, rank 0's) becomes ``loop.json``.
    Returns the final path.
    """
    tmp = tmp_dir(root, step)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save cut short
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if is_main:
        commit(root, step, loop_state)
        prune(root, keep_last)
    barrier()
    return step_dir(root, step)


def read_loop_state(path: Path) -> dict[str, Any]:
    """The ``loop.json`` of complete checkpoint ``path``."""
    state = json.loads((path / LOOP_STATE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path / LOOP_STATE}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state


# ---------------------------------------------------------------------------- RNG state
def save_rng(directory: Path, rank: int) -> None:
    """This rank's Python and torch (CPU and CUDA) generator states, as ``rng/rank<r>.pt``."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    (directory / RNG_DIR).mkdir(exist_ok=True)
    torch.save(state, directory / RNG_DIR / f"rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    """Restore this rank's generators (rank 0's when the checkpoint had fewer ranks)."""
    path = directory / RNG_DIR / f"rank{rank}.pt"
    if not path.exists():
        path = directory / RNG_DIR / "rank0.pt"
    state = torch.load(path, weights_only=True)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------- schedule
def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Load ``state`` into ``scheduler`` and set every group's ``lr`` to the scheduler's rate at
    the restored step — the same value the saved run would use, or the new schedule's when
    ``train.steps``/``schedule`` changed on resume (LambdaLR keeps the lambdas of this run)."""
    scheduler.load_state_dict(state)
    step = scheduler.last_epoch
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)


def resume_point(cfg: RunConfig, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """With ``train.resume``: the newest complete checkpoint under ``train.out_dir`` and its loop
    state, after checking that its config matches this run's (:func:`~lanton_dist.config.check_resume`,
    warnings through ``say``); None to start from step 0."""
    if not cfg.train.resume:
        return None
    root = root_of(cfg.train.out_dir)
    path = latest_complete(root, say)
    if path is None:
        say(f"resume: no complete checkpoint in {root}, starting from step 0")
        return None
    loop = read_loop_state(path)
    for warning in check_resume(loop["config"], to_dict(cfg), str(path)):
        say(f"warning: {warning}")
    if loop["step"] > (cfg.train.stop_after or cfg.train.steps):
        raise ConfigError(f"cannot resume from {path}: its step {loop['step']} is past the stop step "
                          f"(train.stop_after {cfg.train.stop_after} / train.steps {cfg.train.steps})")
    return path, loop
