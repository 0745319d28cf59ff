#!/usr/bin/env python
"""Build (and run) the srun/torchrun command lines of a LLaMA pretraining job.

Inside an allocation ``slurm/pretrain_llama.sbatch`` calls it; anywhere, ``--dry-run`` prints
the exact commands for a given node count without Slurm being present::

    python slurm/launch.py --config configs/llama-7b.yaml --nodes 4 --gpus-per-node 8 \\
        --nodelist 'gpu[001-004]' --job-id 1234 --dry-run -- --data.path /data/c4_text_document

Multi-node: one ``srun`` task per node, each running ``torchrun --nnodes N --nproc-per-node G
--rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:PORT --rdzv-id JOB_ID``, whose workers run
the training entry ``launch/train.py`` for a distributed ``parallel.backend`` (``zero | ddp |
fsdp2 | deepspeed | megatron``). ``--single-node``: ``torchrun
--standalone`` without srun.
Values default to the Slurm environment (``SLURM_NNODES``, ``SLURM_JOB_NODELIST``,
``SLURM_JOB_ID``, ``GPUS_PER_NODE``/``SLURM_GPUS_ON_NODE``, ``MASTER_ADDR``, ``MASTER_PORT``).
The run config is loaded (with the overrides after ``--``) and checked before anything starts:
the world size N·G must be divisible by tp·pp (Megatron) or divide ``train.global_batch``.
``--train.resume true`` is appended unless ``--no-resume``, so a requeued job continues from
its latest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist (``gpu[001-003,007],login1``) like ``scontrol show hostnames``."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if not match:
            if "[" in item or "]" in item:
                raise ValueError(f"cannot parse hostlist entry {item!r} (nested or several ranges are not supported)")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                    raise ValueError(f"bad range {part!r} in {item!r}")
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            elif part.isdigit():
                hosts.append(f"{prefix}{part}{suffix}")
            else:
                raise ValueError(f"bad range {part!r} in {item!r}")
    if not hosts:
        raise ValueError(f"empty nodelist {nodelist!r}")
    return hosts


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return [p for p in parts if p]


def first_host(nodelist: str) -> str:
    """The first host of ``nodelist``: ``scontrol show hostnames`` when Slurm is installed."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            match = re.match(r"\d+", value)  # SLURM_GPUS_ON_NODE may read "8", SLURM_NNODES "4"
            if match:
                return int(match.group())
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=_env_int("SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
    p.add_argument("--gpus-per-node", type=int, default=_env_int("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE") or 8)
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"))
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"))
    p.add_argument("--port", type=int, default=_env_int("MASTER_PORT") or 29500)
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID"))
    p.add_argument("--single-node", action="store_true", help="torchrun --standalone on this node, no srun")
    p.add_argument("--no-resume", action="store_true", help="do not append --train.resume true")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--print-out-dir", action="store_true", help="print the run's train.out_dir and exit")
    args = p.parse_args(argv)
    args.overrides = overrides
    return args


def load_config(config: str, overrides: list[str]):
    sys.path.insert(0, str(ROOT))
    from lanton_dist.config import load_run_config

    return load_run_config(config, overrides)


def entry_script(backend: str) -> str:
    """The training entry of a distributed ``parallel.backend``: ``launch/train.py``."""
    from lanton_dist.config import TRAINER_BACKENDS

    if backend in TRAINER_BACKENDS and backend != "none":
        return "launch/train.py"
    raise ValueError(f"parallel.backend is {backend!r}; this launcher runs "
                     f"{', '.join(b for b in TRAINER_BACKENDS if b != 'none')} (a distributed backend)")


def build_commands(args: argparse.Namespace) -> dict:
    """``env`` (dict), ``torchrun`` (argv) and ``srun`` (argv or None) for this job."""
    cfg = load_config(args.config, args.overrides)
    backend = cfg.parallel.backend
    script = entry_script(backend)
    nodes = 1 if args.single_node else args.nodes
    if nodes is None:
        raise ValueError("--nodes is required outside a Slurm allocation (SLURM_NNODES is not set)")
    if args.single_node and args.nodes not in (None, 1):
        raise ValueError(f"--single-node with --nodes {args.nodes}")
    if nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {args.gpus_per_node}")
    world = nodes * args.gpus_per_node
    tp, pp = (cfg.parallel.tp, cfg.parallel.pp) if backend == "megatron" else (1, 1)
    if world % (tp * pp):
        raise ValueError(
            f"{nodes} node(s) × {args.gpus_per_node} GPUs = {world} ranks, not divisible by tp·pp = {tp}·{pp} = {tp * pp}"
        )
    if backend != "megatron" and cfg.train.global_batch % world:
        raise ValueError(f"train.global_batch {cfg.train.global_batch} is not divisible by the {world} ranks "
                         f"({nodes} node(s) × {args.gpus_per_node} GPUs)")
    train_args = [script, "--config", args.config, *args.overrides]
    if not args.no_resume:
        train_args += ["--train.resume", "true"]
    torchrun = ["torchrun"]
    if args.single_node:
        torchrun += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(args.gpus_per_node)]
        srun = None
    else:
        if args.master_addr:
            master = args.master_addr
        elif args.nodelist:
            master = first_host(args.nodelist)
        else:
            raise ValueError("need --master-addr or --nodelist (SLURM_JOB_NODELIST) for a multi-node launch")
        if args.nodelist:
            hosts = expand_nodelist(args.nodelist) if not shutil.which("scontrol") else None
            if hosts is not None and len(hosts) != nodes:
                raise ValueError(f"nodelist {args.nodelist!r} has {len(hosts)} hosts, --nodes is {nodes}")
        job_id = args.job_id or "lanton-llama"
        torchrun += [
            "--nnodes", str(nodes), "--nproc-per-node", str(args.gpus_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master}:{args.port}", "--rdzv-id", str(job_id),
            "--max-restarts", "0",
        ]
        srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                "--cpu-bind=none"]
    torchrun += train_args
    env = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "8"),
    }
    if not args.single_node:
        env["MASTER_ADDR"] = master
        env["MASTER_PORT"] = str(args.port)
    return dict(env=env, torchrun=torchrun, srun=srun, world=world, dp=world // (tp * pp), out_dir=cfg.train.out_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_out_dir:
        print(load_config(args.config, args.overrides).train.out_dir)
        return 0
    try:
        cmds = build_commands(args)
    except ValueError as err:
        print(f"slurm/launch.py: error: {err}", file=sys.stderr)
        return 2
    full = (cmds["srun"] or []) + cmds["torchrun"]
    if args.dry_run:
        for k, v in cmds["env"].items():
            print(f"export {k}={shlex.quote(v)}")
        print(f"# world={cmds['world']} data_parallel={cmds['dp']} out_dir={cmds['out_dir']}")
        if cmds["srun"]:
            print("# srun starts one task per node; each runs the torchrun line below")
            print(shlex.join(cmds["srun"]) + " \\")
            print("    " + shlex.join(cmds["torchrun"]))
        else:
            print(shlex.join(cmds["torchrun"]))
        return 0
    os.environ.update(cmds["env"])
    os.chdir(ROOT)
    print("+ " + shlex.join(full), flush=True)
    os.execvp(full[0], full)
    return 1  # unreachable


if __name__ == "__main__":
    sys.exit(main())
