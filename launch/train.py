"""Train one run from a YAML config plus ``--section.key value`` overrides.

    python launch/train.py --config configs/llama-tiny-cpu.yaml --optim.name dmuon --train.steps 50

``--config PATH`` is optional (defaults: :class:`lanton_dist.config.RunConfig`); every other
argument is an override. Rank and world come from the backend (``parallel.backend``), so
the same command runs under ``torchrun`` once a distributed backend is configured; Megatron-core
LLaMA pretraining (TP × PP × DP) is ``parallel.backend: megatron``::

    torchrun --nproc-per-node 8 launch/train.py --config configs/llama-1b.yaml --data.path /data/c4_text_document

(``slurm/launch.py`` builds the multi-node command; ``train.device cpu`` runs Megatron on a
CPU-only machine through the CI/test shim :mod:`lanton_dist.integrations.megatron_cpu`.)
SIGUSR1, SIGTERM, SIGINT (Ctrl-C, also at ``torchrun``, which forwards it) or
``$LANTON_STOP_FILE`` make every rank checkpoint at the end of the current step and exit 0
without ``COMPLETED`` (Slurm requeue: ``slurm/pretrain_llama.sbatch``); ``--train.resume true``
continues; a second Ctrl-C stops at once (exit 130). Under ``torchrun`` a trainer whose
``torchrun`` dies gets SIGTERM (:func:`lanton_dist.preemption.exit_with_launcher`), so it
checkpoints and exits too. ``python -m lanton_dist.launcher`` (``torchrun``'s arguments) makes
SIGINT/SIGTERM at the launcher a stop request and exits 0 after the checkpoint, where ``torchrun``
itself re-raises the signal (exit 1).

Exit status: 0 when the run finished or stopped on request; 2 with one ``config error: …``
line for a bad config (checked before anything is built) or one ``data error: …`` line for
data the run cannot use (:class:`lanton_dist.data.errors.DataError`: empty, not UTF-8, a JSONL
line without its key, ids beyond ``model.vocab_size``, no validation documents; see
docs/robustness_errors.md); 3 when training diverged
(``train.max_consecutive_skips`` skipped steps in a row; no ``COMPLETED``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lanton_dist.checkpoint_dir import OutOfSpace  # noqa: E402
from lanton_dist.config import ConfigError, load_run_config  # noqa: E402
from lanton_dist.data.errors import DataError  # noqa: E402
from lanton_dist.divergence import EXIT_DIVERGED, Diverged  # noqa: E402
from lanton_dist.preemption import StopRequest, exit_with_launcher  # noqa: E402
from lanton_dist.trainer import train  # noqa: E402

USAGE = "usage: python launch/train.py [--config PATH] [--section.key VALUE | --section.key=VALUE ...]"


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(config path or None, remaining override args)``; ``--config`` may appear anywhere."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            print(USAGE)
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise SystemExit(f"--config needs a path\n{USAGE}")
            path, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        else:
            rest.append(arg)
            i += 1
    return path, rest


def main(argv: list[str] | None = None) -> dict:
    path, overrides = split_config_arg(sys.argv[1:] if argv is None else argv)
    if path is not None and not Path(path).is_file():
        _exit(2, f"config error: config file not found: {path}")
    try:
        with StopRequest.from_environment() as stop:
            exit_with_launcher()  # under torchrun: SIGTERM (the stop above) when torchrun dies
            cfg = load_run_config(path, overrides)
            summary = train(cfg, stop=stop)
    except KeyboardInterrupt:
        _exit(130, "interrupted by a second Ctrl-C: the current step was not checkpointed")
    except ConfigError as e:
        _exit(2, f"config error: {e}")
    except DataError as e:
        _exit(2, f"data error: {e}")
    except Diverged as e:
        _exit(EXIT_DIVERGED, f"error: {e}")
    except OutOfSpace as e:  # a checkpoint save found the disk full: the previous checkpoint is intact
        _exit(2, f"error: {e}")
    if summary.get("final_train_loss") is not None:
        val = summary["final_val_loss"]
        print(f"final train loss {summary['final_train_loss']:.4f} | final val loss "
              f"{'n/a' if val is None else f'{val:.4f}'} | unigram baseline {summary['unigram_baseline']:.4f}")
        print(f"metrics {summary['metrics']}\nplot {summary['plot']}\ncheckpoint {summary['checkpoint']}")
    return summary


def _exit(code: int, line: str) -> None:
    """Leave with ``code`` after one line on stderr (no traceback), written by global rank 0
    only: under torchrun every rank reaches the same verdict."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
