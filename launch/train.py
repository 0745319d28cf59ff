"""Train one run from a YAML config plus ``--section.key value`` overrides.

    python launch/train.py --config configs/llama-tiny-cpu.yaml --optim.name dmuon --train.steps 50

``--config PATH`` is optional (defaults: :class:`lanton_dist.config.RunConfig`); every other
argument is an override. Rank and world come from the backend (``parallel.backend``), so
the same command runs under ``torchrun`` once a distributed backend is configured.
SIGUSR1/SIGTERM or ``$LANTON_STOP_FILE`` make every rank checkpoint at the end of the current
step and exit (Slurm requeue: ``slurm/pretrain_llama.sbatch``); ``--train.resume true`` continues.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lanton_dist.config import load_run_config  # noqa: E402
from lanton_dist.preemption import StopRequest  # noqa: E402
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
        raise SystemExit(f"config file not found: {path}")
    try:
        cfg = load_run_config(path, overrides)
    except ValueError as e:
        raise SystemExit(f"config error: {e}\n{USAGE}") from None
    summary = train(cfg, stop=StopRequest.from_environment())
    if summary.get("final_train_loss") is not None:
        val = summary["final_val_loss"]
        print(f"final train loss {summary['final_train_loss']:.4f} | final val loss "
              f"{'n/a' if val is None else f'{val:.4f}'} | unigram baseline {summary['unigram_baseline']:.4f}")
        print(f"metrics {summary['metrics']}\nplot {summary['plot']}\ncheckpoint {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    main()
