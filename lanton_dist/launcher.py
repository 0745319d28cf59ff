"""``torchrun`` whose Ctrl-C and SIGTERM stop the run cleanly: ``python -m lanton_dist.launcher``.

    python -m lanton_dist.launcher --nproc-per-node 2 launch/train.py --config configs/llama-tiny-cpu.yaml ...

takes ``torchrun``'s arguments unchanged and runs ``torchrun`` (``torch.distributed.run``) as its
child. Plain ``torchrun`` answers SIGINT/SIGTERM by forwarding the signal to the trainers (who
checkpoint and exit 0: :class:`lanton_dist.preemption.StopRequest`) and then re-raising it itself:
a traceback and exit status 1, so a script cannot tell a clean stop from a failure. This launcher
instead turns the first SIGINT or SIGTERM into a stop request through the stop file
(``$LANTON_STOP_FILE``, set for the trainers; a fresh one unless the job already set it): every
rank checkpoints at the end of its current step and exits 0, ``torchrun`` exits 0, and so does
the launcher — without ``COMPLETED``, so a job script requeues the run. A second signal is passed
to ``torchrun`` as SIGTERM (its own shutdown: SIGTERM to the trainers, SIGKILL 30 s later).

``torchrun`` runs in its own session (a terminal's Ctrl-C reaches this launcher only) and gets
SIGTERM when the launcher dies (``prctl(PR_SET_PDEATHSIG)``, Linux); the trainers in turn get
SIGTERM when ``torchrun`` dies (:func:`lanton_dist.preemption.exit_with_launcher`). The exit status
is ``torchrun``'s (``128 + n`` when it was killed by signal ``n``). Torch-free.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

#: ``prctl`` option: the signal a process gets when its parent dies (``<linux/prctl.h>``).
PR_SET_PDEATHSIG = 1
STOP_FILE_ENV = "LANTON_STOP_FILE"


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies, however it dies
    (``prctl(PR_SET_PDEATHSIG)``); False off Linux, where there is no such request."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_PDEATHSIG, {sig.name}) failed")
    return True


class Launcher:
    """One child (``torchrun``: ``command``) in its own session, and the stop file its trainers watch."""

    def __init__(self, command: list[str], stop_file: Path) -> None:
        self.stop_file = stop_file
        self.signals_seen = 0
        env = {**os.environ, STOP_FILE_ENV: str(stop_file)}
        self.proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)

    def handle(self, signum: int, frame: object) -> None:
        """Signal handler. First SIGINT/SIGTERM: touch the stop file; later ones: SIGTERM to the child."""
        self.signals_seen += 1
        name = signal.Signals(signum).name
        if self.signals_seen == 1:
            self.stop_file.touch()
            print(f"lanton_dist.launcher: {name}: every rank checkpoints at the end of its current step and exits "
                  "(again: stop without waiting)", file=sys.stderr, flush=True)
        elif self.proc.poll() is None:
            print(f"lanton_dist.launcher: {name} again: SIGTERM to torchrun", file=sys.stderr, flush=True)
            self.proc.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """The child's exit status (``128 + n`` for death by signal ``n``)."""
        code = self.proc.wait()
        return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    given = os.environ.get(STOP_FILE_ENV)
    with tempfile.TemporaryDirectory(prefix="lanton-launcher-") as tmp:
        stop_file = Path(given) if given else Path(tmp) / "stop"
        launcher = Launcher([sys.executable, "-m", "torch.distributed.run", *args], stop_file)
        previous = {sig: signal.signal(sig, launcher.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return launcher.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
