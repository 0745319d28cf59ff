"""The checkpoint directories of a run of the training loop (:mod:`lanton_dist.trainer`, every
backend).

Layout under ``<train.out_dir>/checkpoints``::

    step_00000500/            a complete checkpoint (renamed into place when finished)
        COMMITTED             completion marker, written last: {"step": 500, "format": 1,
                              "manifest": {file: {"size", "crc32"}}} (:mod:`~lanton_dist.checkpoint_manifest`)
        loop.json             loop state: step, config, scheduler, backend, world size
        ...                   the backend's files (DCP shards + .metadata, state.pt, rng/, ...)
    .tmp-step_00000600/       a save in progress, or one cut short: never read

A save writes everything into ``.tmp-step_N``; when every rank has finished, rank 0 writes
``loop.json`` and the ``COMMITTED`` marker, then renames the directory to ``step_N``
(:func:`commit`, atomic on POSIX file systems). A job killed in the middle of a save (torchrun
SIGKILLs 30 s after SIGTERM) leaves only a ``.tmp-`` directory, and :func:`latest_complete`
resumes from the newest ``step_N`` that has its marker, logging which one and why the newer
entries were passed over. :func:`prune` keeps the newest ``keep_last`` complete checkpoints.
On resume, :func:`intact_resume_point` verifies the chosen checkpoint against its manifest
(split over the ranks) and falls back to the previous complete one, naming the damaged file
and the reason; a checkpoint written before manifests existed loads unverified, with a note.
A save that runs out of disk space raises :class:`OutOfSpace` (the path, the free bytes); the
partial save is removed and the previous checkpoints are untouched (nothing is pruned before a
commit).

Nothing in a checkpoint directory is un-pickled by this package: loop state is JSON, tensors
are read with ``torch.load(weights_only=True)``. The backends' own formats
(``torch.distributed.checkpoint``'s ``.metadata``, DeepSpeed's files) are read by their
libraries, which use pickle: a checkpoint directory is trusted input, like any torch checkpoint.
"""
from __future__ import annotations

import errno
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lanton_dist import checkpoint_manifest as manifest_
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


def commit(root: Path, step: int, loop_state: dict[str, Any], manifest: manifest_.Manifest) -> Path:
    """Finish the save of ``step`` (rank 0 only, after every rank has written into
    :func:`tmp_dir`): write ``loop.json`` and the marker with ``manifest`` (the other files'
    entries) plus ``loop.json``'s, rename to :func:`step_dir`."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    loop = json.dumps({"format": FORMAT, **loop_state}, indent=1).encode()
    (tmp / LOOP_STATE).write_bytes(loop)
    manifest = {**manifest, LOOP_STATE: manifest_.entry_of(loop)}
    (tmp / MARKER).write_text(json.dumps({"step": step, "format": FORMAT, "manifest": manifest}) + "\n")
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
    (rank 0 only, when no save is in progress: after a commit, or when the loop has confirmed
    its newest checkpoint, see :class:`~lanton_dist.divergence.GoodCheckpoints`)."""
    for _, old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p)


class OutOfSpace(RuntimeError):
    """A checkpoint save ran out of disk space (or quota); the message names the path and the free bytes."""


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what torch.save's zip writer says when a write fails (it drops the OS error)
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def _no_space(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain (causes, contexts, DCP's per-rank ``failures``) that says the
    disk is full — the OS error itself when there is one — or None."""
    chain, stack = [], [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is c for c in chain):
            continue
        chain.append(e)
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
        wrapped = [f[0] for f in failures.values() if isinstance(f, tuple) and f] if isinstance(failures, dict) else []
        stack += [e.__cause__, e.__context__, *wrapped]
    by_errno = [e for e in chain if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS]
    by_text = [e for e in chain if any(t in str(e) for t in _NO_SPACE_TEXTS)]
    return (by_errno or by_text or [None])[0]


def save(root: Path, step: int, write: Callable[[Path], None], loop_state: dict[str, Any], *, rank: int, world: int,
         barrier: Callable[[], None], keep_last: int | None) -> Path:
    """Atomically save checkpoint ``step``: collective over every rank of the job.

    ``write(directory)`` is called on every rank and writes that rank's files into the
    temporary directory; then every rank checksums its share of the files
    (:func:`~lanton_dist.checkpoint_manifest.manifest_part`) and rank 0 commits with the merged
    manifest; ``loop_state`` (JSON-serialisable, rank 0's) becomes ``loop.json``. With
    ``keep_last`` the older checkpoints are then pruned to that many (None: not now, see
    :class:`~lanton_dist.divergence.GoodCheckpoints`). Returns the final path. Raises
    :class:`OutOfSpace` when a write fails for lack of space (the partial save is removed).
    """
    tmp, is_main = tmp_dir(root, step), rank == 0
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save cut short
        tmp.mkdir(parents=True)
    barrier()
    try:
        write(tmp)
        barrier()
        part = manifest_.manifest_part(tmp, rank, world, skip=(MARKER, LOOP_STATE))
        if world > 1:
            manifest_.write_part(tmp, rank, part)
            barrier()
        if is_main:
            commit(root, step, loop_state, manifest_.merge_parts(tmp, world) if world > 1 else part)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        full = _no_space(exc)
        if full is None:
            raise
        where = getattr(full, "filename", None) or tmp
        free = shutil.disk_usage(root).free
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = complete_checkpoints(root)
        raise OutOfSpace(
            f"no space left on device while saving checkpoint step {step}: writing {where} failed "
            f"({(str(full).strip().splitlines() or [type(full).__name__])[-1]}); "
            f"{free:,} bytes free on {root}'s file system; the partial save was removed, the newest complete "
            f"checkpoint is {newest[-1][1] if newest else 'none'} (untouched): free space, then resume with "
            "--train.resume true") from exc
    if is_main and keep_last is not None:
        prune(root, keep_last)
    barrier()
    return step_dir(root, step)


def read_manifest(path: Path) -> manifest_.Manifest | None:
    """The manifest in complete checkpoint ``path``'s marker; None for a checkpoint written
    before manifests existed. Raises ``ValueError`` for an unreadable marker."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{MARKER}: unreadable ({exc})") from None
    return marker.get("manifest") if isinstance(marker, dict) else None


def verify(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of this rank's share of complete checkpoint ``path`` (all of it with the
    defaults); ``["no manifest ..."]`` is *not* a problem: see :func:`read_manifest`."""
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return [str(exc)]
    return [] if manifest is None else manifest_.check(path, manifest, rank, world)


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


def _loop_of(path: Path, cfg: RunConfig, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The loop state of complete checkpoint ``path`` checked against its manifest entry and
    against this run's config (warnings through ``say``); None, said why, when it is damaged."""
    try:
        manifest = read_manifest(path)
        problems = manifest_.check(path, {LOOP_STATE: manifest[LOOP_STATE]}) if manifest and LOOP_STATE in manifest else []
        if problems:
            raise ValueError(problems[0])
        loop = read_loop_state(path)
    except ValueError as exc:  # also json.JSONDecodeError
        say(f"resume: skipping {path}: {exc}")
        return None
    for warning in check_resume(loop["config"], to_dict(cfg), str(path)):
        say(f"warning: {warning}")
    if loop["step"] > (cfg.train.stop_after or cfg.train.steps):
        raise ConfigError(f"cannot resume from {path}: its step {loop['step']} is past the stop step "
                          f"(train.stop_after {cfg.train.stop_after} / train.steps {cfg.train.steps})")
    return loop


def _no_intact(root: Path) -> ConfigError:
    return ConfigError(f"train.resume: no intact checkpoint in {root}: every complete checkpoint is damaged (see the "
                       "messages above; `lanton-dist verify-checkpoint DIR` shows them); move them away to start from step 0")


def resume_point(cfg: RunConfig, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """With ``train.resume``: the newest complete checkpoint under ``train.out_dir`` whose
    ``loop.json`` is intact, and its loop state, after checking that its config matches this
    run's (:func:`~lanton_dist.config.check_resume`, warnings through ``say``); None to start
    from step 0. Per rank, before a model is built; the tensor files are verified later, by
    every rank together (:func:`intact_resume_point`)."""
    if not cfg.train.resume:
        return None
    root = root_of(cfg.train.out_dir)
    if latest_complete(root, say) is None:
        say(f"resume: no complete checkpoint in {root}, starting from step 0")
        return None
    for _, path in reversed(complete_checkpoints(root)):
        loop = _loop_of(path, cfg, say)
        if loop is not None:
            return path, loop
    raise _no_intact(root)


def intact_resume_point(cfg: RunConfig, first: tuple[Path, dict[str, Any]], *, rank: int, world: int,
                        agree: Callable[[bool], bool], log: Callable[[str], None],
                        say: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """Verify :func:`resume_point`'s checkpoint ``first`` against its manifest — collective:
    every rank checks its share of the files, ``agree(local_bad)`` is the job-wide OR
    (:func:`~lanton_dist.preemption.any_rank`) — and fall back to the previous complete
    checkpoint until one is intact. The rank that finds a damaged file logs it (``log``: every
    rank's logger; ``say``: rank 0's). A checkpoint without a manifest (written by an earlier
    version) is loaded unverified, with a note. Raises ``ConfigError`` when none is intact."""
    root = root_of(cfg.train.out_dir)
    first_path, first_loop = first
    for step, path in reversed(complete_checkpoints(root)):
        if step > first_loop["step"]:
            continue
        loop = first_loop if path == first_path else _loop_of(path, cfg, say)
        if loop is None:
            continue
        problems = verify(path, rank, world)
        for problem in problems:
            log(f"resume: {path} is damaged: {problem}" + (f" (found by rank {rank})" if rank else ""))
        if not agree(bool(problems)):
            if read_manifest(path) is None:
                say(f"resume: {path} has no manifest (written before checkpoints carried one): loading it unverified")
            return path, loop
        say(f"resume: skipping {path}: it failed verification; falling back to the previous complete checkpoint")
    raise _no_intact(root)
