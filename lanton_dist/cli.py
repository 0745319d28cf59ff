"""``lanton-dist``: the command line of lanton_dist.

Subcommands
-----------
``lanton-dist plan``     the analytic step model of :mod:`lanton_dist.plan` for a LLaMA preset,
                         a ``configs/*.yaml`` model section or custom dims, on ``--nodes`` ×
                         ``--gpus-per-node`` GPUs with ``--tp``/``--pp`` and a data-parallel
                         ``--strategy``: bytes per phase, optimizer-state memory, Newton–Schulz
                         FLOPs and balance, implied times, and LANTON's estimation overhead vs
                         model size and k. ``--json PATH`` (``-``: stdout, after the table) writes
                         everything.
``lanton-dist profile``  the profiler of :mod:`lanton_dist.profiling`, three ways:

    * ``lanton-dist profile [--out DIR] -- python launch/train.py --config ...`` wraps any Python
      training command (also ``torchrun ...``): every optimizer step of every process is
      timed by phase and merged with its :class:`~lanton_dist.engine.meter.CommMeter` bytes,
      NVML is sampled meanwhile, and ``DIR`` gets the report.
    * ``lanton-dist profile --engine [--world N --steps S --algorithm ...] [--out DIR]`` runs a
      short built-in training of a small LLaMA on the ZeRO engine over N spawned CPU (gloo)
      processes, or N GPUs (nccl) with ``--device cuda``.
    * ``lanton-dist profile --report DIR_or_profile.json [--out DIR]`` re-renders a saved report.

``lanton-dist verify-checkpoint DIR``
                         checks a checkpoint (``step_N``) or every complete checkpoint of a run
                         directory against the manifest in its ``COMMITTED`` marker (sizes, CRC-32):
                         exit 0 intact, 1 damaged (file and reason printed), 2 no checkpoint.
``lanton-dist prepare-data --input FILES/DIR/GLOB [...] --output PREFIX``
                         tokenizes text (or ``.jsonl``: ``--jsonl-key``) files into the Megatron
                         indexed dataset ``PREFIX.bin``/``PREFIX.idx`` (:mod:`lanton_dist.data.prepare`)
                         that ``data.source: indexed`` (every backend) reads: byte
                         tokens with end-of-document byte 0, or ``--tokenizer tokenizer.json``.
``lanton-dist export-hf CHECKPOINT OUT_DIR [--dtype ...]``
                         writes a checkpoint as a Hugging Face ``LlamaForCausalLM`` directory
                         (``config.json`` + ``model.safetensors``; :mod:`lanton_dist.export_hf`).
``lanton-dist eval CONFIG --checkpoint DIR [--split val|train] [--section.key value ...]``
                         loss, perplexity and token count of a checkpoint on every token of a
                         split of CONFIG's data (overrides after CONFIG), one line and a JSON
                         file (:mod:`lanton_dist.evaluate`).

``lanton-dist rehearse CONFIG [key=value ...] --nodes N --gpus-per-node G [--ranks sample|all]``
                         builds the run's real optimizer (:mod:`lanton_dist.rehearsal`) as sampled
                         ranks of a fake N·G-rank world on one CPU (meta parameters), steps it, and
                         prints bytes held, collectives per step, host ms and construction s beside
                         the planner, and whether the ranks' collective sequences agree; exit 1
                         where they differ (docs/rehearsal.md).

Bad input (unknown model, a world size not divisible by tp·pp, …) exits with status 2 and
a one-line message; a profiled run that fails (or runs no optimizer step) exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from lanton_dist.config import ModelConfig
from lanton_dist.names import ALGORITHMS, ESTIMATORS, OPTIONS


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
    return parse


# ============================================================================ plan
def _plan_parser(sub) -> None:
    from lanton_dist import plan as P

    p = sub.add_parser("plan", help="analytic per-rank bytes, memory, NS FLOPs and times of one step",
                       description="Analytic model of one optimizer step (lanton_dist.plan).")
    p.add_argument("--model", default="llama-7b", help=f"preset ({', '.join(P.PRESETS)}), a YAML run config, or 'custom'")
    for name in ("vocab-size", "dim", "n-layers", "n-heads", "n-kv-heads", "ffn-dim"):
        p.add_argument(f"--{name}", type=int, help=f"custom model: {name} (overrides the preset/YAML value)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the YAML's parallel.tp, else 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline parallel size (default: the YAML's parallel.pp, else 1)")
    p.add_argument("--strategy", default="zero2", choices=sorted(P.STRATEGY_MODELS))
    p.add_argument("--tp-mode", default="owner", choices=P.TP_MODES)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--algorithms", type=_csv(str), default=ALGORITHMS)
    p.add_argument("--k", type=int, default=None, help="estimate_every (default: the YAML's optim.estimate_every, else 10)")
    p.add_argument("--option", default=None, choices=OPTIONS)
    p.add_argument("--estimator", default="ns", choices=ESTIMATORS)
    p.add_argument("--param-bytes", type=int, default=4, help="bytes per parameter/state element (4 = fp32)")
    p.add_argument("--ns-split-tolerance", type=float, default=None,
                   help="split Newton-Schulz the plan reports: per-rank NS target (1 + value)·mean (default: the YAML's "
                        "optim.ns_split_tolerance, else 0.02)")
    p.add_argument("--hardware", default="h100", choices=sorted(P.HARDWARE))
    for name, help_ in (("matmul-tflops", "bf16 matmul TFLOP/s"), ("ns-efficiency", "NS rate / matmul rate"),
                        ("intra-gbps", "NVLink GB/s per GPU per direction"), ("inter-gbps", "network GB/s per GPU"),
                        ("comm-efficiency", "fraction of nominal bandwidth reached"), ("hbm-gbps", "HBM GB/s"),
                        ("mfu", "model FLOP utilisation of fwd+bwd"),
                        ("memory-gib", "GPU memory the per-rank bytes must fit (GiB)")):
        p.add_argument(f"--{name}", type=float, help=help_)
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: YAML train.global_batch, else 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: YAML data.seq_len, else max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward for the activation memory (default: YAML train.micro_batch if > 0, else 1)")
    p.add_argument("--activation-bytes", type=int, default=2, choices=(2, 4), help="bytes per activation element (2: bf16)")
    p.add_argument("--ks", type=_csv(int), default=(1, 5, 10, 20), help="k values of the estimation-overhead table")
    p.add_argument("--growth-models", type=_csv(str), default=tuple(P.PRESETS), help="models of the estimation-overhead table")
    p.add_argument("--json", default=None, help="write the full plan as JSON to this path ('-': stdout)")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from lanton_dist import plan as P
    from lanton_dist.config import load_yaml

    started = time.perf_counter()
    yaml_cfg: dict = {}
    if args.model.endswith((".yaml", ".yml")):
        if not Path(args.model).exists():
            raise ValueError(f"model config {args.model} does not exist")
        yaml_cfg = load_yaml(args.model)
    if args.model == "custom":
        model: str | ModelConfig = ModelConfig()
    else:
        model = P.resolve_model(args.model)[1]
    dims = {
        k: getattr(args, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim") if getattr(args, k) is not None
    }
    name = P.resolve_model(args.model)[0] if args.model != "custom" else "custom"
    if dims or args.model == "custom":
        model = replace(model, **dims)
        name = "custom" if args.model == "custom" else f"{name}+custom"
    par = yaml_cfg.get("parallel", {})
    optim = yaml_cfg.get("optim", {})
    layout = P.ParallelLayout(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tp=args.tp or int(par.get("tp", 1)),
                              pp=args.pp or int(par.get("pp", 1)), strategy=args.strategy, tp_mode=args.tp_mode,
                              bucket_mb=args.bucket_mb)
    settings = P.OptimSettings(estimate_every=args.k or int(optim.get("estimate_every", 10)),
                               option=args.option or str(optim.get("option", "I")), nuclear_estimator=args.estimator,
                               param_bytes=args.param_bytes, ns_split_tolerance=_split_tolerance(args, optim))
    hw = P.HARDWARE[args.hardware]
    overrides = {k: getattr(args, k) for k in ("matmul_tflops", "ns_efficiency", "intra_gbps", "inter_gbps", "comm_efficiency",
                                               "hbm_gbps", "mfu", "memory_gib") if getattr(args, k) is not None}
    hw = replace(hw, **overrides)
    unknown = set(args.algorithms) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown algorithm(s) {sorted(unknown)}; choose from {ALGORITHMS}")
    global_batch = args.global_batch or int(yaml_cfg.get("train", {}).get("global_batch", 1024))
    seq_len = args.seq_len or yaml_cfg.get("data", {}).get("seq_len")
    text, data = P.plan_table(model, layout, settings, hw, algorithms=args.algorithms, ks=args.ks, global_batch=global_batch,
                              seq_len=int(seq_len) if seq_len else None, growth_models=args.growth_models, name=name,
                              micro_batch=args.micro_batch or int(yaml_cfg.get("train", {}).get("micro_batch", 0)) or 1,
                              activation_bytes=args.activation_bytes)
    print(text, flush=True)
    data["elapsed_s"] = time.perf_counter() - started
    data["startup_s"] = (_process_age_s() or 0.0) - data["elapsed_s"]
    data["import_s"] = data["startup_s"]
    if args.json == "-":
        print(json.dumps(data, indent=1, default=str))
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0


def _split_tolerance(args: argparse.Namespace, optim: dict) -> float:
    """``--ns-split-tolerance``, else the YAML's ``optim.ns_split_tolerance``, else the planner's default."""
    from lanton_dist.engine.split_plan import SPLIT_TOLERANCE

    for value in (args.ns_split_tolerance, optim.get("ns_split_tolerance")):
        if value is not None:
            return float(value)
    return SPLIT_TOLERANCE


# ============================================================================ export-hf
def _export_hf_parser(sub) -> None:
    p = sub.add_parser("export-hf", help="export a checkpoint to Hugging Face format (config.json + model.safetensors)",
                       description="Write a checkpoint of our LLaMA as a transformers LlamaForCausalLM directory "
                                   "(lanton_dist.export_hf); backends none, ddp, zero and fsdp2.")
    p.add_argument("checkpoint", help="a checkpoints/step_N directory, the checkpoints directory or a run's out_dir (newest)")
    p.add_argument("out_dir", help="the Hugging Face model directory to write")
    p.add_argument("--dtype", default="float32", help="dtype of the exported weights: float32, bfloat16 or float16")
    p.set_defaults(func=_cmd_export_hf)


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from lanton_dist.export_hf import export_hf

    try:
        out, ckpt = export_hf(args.checkpoint, args.out_dir, args.dtype)
    except ImportError as exc:
        print(f"lanton-dist export-hf: error: {exc}", file=sys.stderr)
        return 2
    m = ckpt.model
    print(f"exported {ckpt.path} (step {ckpt.step}, backend {ckpt.backend}; {m.n_layers}L d{m.dim} heads {m.n_heads}/"
          f"{m.n_kv_heads} vocab {m.vocab_size}) to {out} ({args.dtype}): load with "
          f"transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0


# ============================================================================ eval
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a data split (no training)",
                       description="Evaluate a checkpoint on the data of CONFIG (lanton_dist.evaluate): every token of "
                                   "one split in consecutive windows. Any --section.key override applies to CONFIG "
                                   "(e.g. --data.source text --data.path other.txt); the model comes from the checkpoint.")
    p.add_argument("config", help="a YAML run config (its data section is evaluated)")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_N directory, the checkpoints directory or a run's out_dir")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--batch-size", type=int, default=0, help="windows per forward (default: train.global_batch)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (default 0: the whole split)")
    p.add_argument("--json", default=None, help="result JSON path (default: <run dir>/eval_step<N>_<split>.json)")
    p.set_defaults(func=_cmd_eval, takes_overrides=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from lanton_dist.config import ConfigError, load_run_config
    from lanton_dist.evaluate import evaluate_checkpoint

    try:
        cfg = load_run_config(args.config, args.overrides)
        result = evaluate_checkpoint(cfg, args.checkpoint, split=args.split, batch_size=args.batch_size,
                                     max_batches=args.max_batches)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(result.line(), flush=True)
    run_dir = Path(result.checkpoint).parent.parent
    path = Path(args.json) if args.json else run_dir / f"eval_step{result.step}_{args.split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    print(f"wrote {path}")
    return 0


# ============================================================================ profile
def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="phase timings, bytes and NVML samples of training steps",
                       description="Profile a training command, a built-in engine run, or re-render a saved report.")
    p.add_argument("--out", default=None, help="report directory (default: runs/profile, or the report's directory)")
    p.add_argument("--interval", type=float, default=0.1, help="NVML sampling interval in seconds")
    p.add_argument("--report", default=None, help="re-render this saved profile.json (or its directory)")
    p.add_argument("--engine", action="store_true", help="run the built-in short engine training")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--algorithm", default="lanton", choices=ALGORITHMS)
    p.add_argument("--option", default="I", choices=OPTIONS)
    p.add_argument("--k", type=int, default=2, help="estimate_every")
    p.add_argument("--estimator", default="auto", choices=("auto", *ESTIMATORS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--no-overlap", action="store_true", help="wait for the variance all-reduce in the same step")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--timeline-steps", type=int, default=4, help="steps shown in the timeline plot")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command to wrap")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from lanton_dist import profiling as prof

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    modes = sum([bool(command), bool(args.report), bool(args.engine)])
    if modes != 1:
        raise ValueError("give exactly one of: a command after --, --engine, or --report PATH")
    if args.report:
        path = Path(args.report)
        report = prof.load_report(path)
        out = Path(args.out) if args.out else (path if path.is_dir() else path.parent)
        paths = prof.write_report(report, out, timeline_steps=args.timeline_steps)
        print(prof.format_summary(report))
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    out = Path(args.out or "runs/profile")
    if args.engine:
        cfg = prof.EngineRun(world=args.world, steps=args.steps, algorithm=args.algorithm, option=args.option,
                             estimate_every=args.k, nuclear_estimator=args.estimator, device=args.device,
                             bucket_mb=args.bucket_mb, overlap=not args.no_overlap, batch=args.batch, seq_len=args.seq_len,
                             model=ModelConfig(vocab_size=256, dim=args.dim, n_layers=args.n_layers, n_heads=max(1, args.dim // 32),
                                               n_kv_heads=max(1, args.dim // 64), ffn_dim=args.dim * 11 // 4 // 8 * 8,
                                               max_seq_len=args.seq_len))
        report = prof.run_engine_profile(cfg, nvml_interval_s=args.interval)
        rc = 0
    else:
        report, rc = prof.profile_command(command, out, nvml_interval_s=args.interval)
    paths = prof.write_report(report, out, timeline_steps=args.timeline_steps)
    print(prof.format_summary(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return rc


# ============================================================================ prepare-data
def _prepare_data_parser(sub) -> None:
    from lanton_dist.config import SAMPLE_BY

    p = sub.add_parser("prepare-data", help="tokenize text/JSONL files into a Megatron indexed dataset (.bin/.idx)",
                       description="Tokenize text or JSONL files into PREFIX.bin/PREFIX.idx (Megatron's indexed format); "
                                   "every document is followed by an end-of-document token.")
    p.add_argument("--input", action="append", required=True,
                   help="a file, a directory (its .txt or .jsonl files) or a glob; repeat for more")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--format", default=None, choices=("text", "jsonl"), help="default: jsonl for .jsonl/.ndjson inputs, else text")
    p.add_argument("--jsonl-key", default="text", help="the JSON field holding a document's text")
    p.add_argument("--tokenizer", default="", help="a Hugging Face tokenizer.json (needs the 'tokenizers' package); default: UTF-8 bytes")
    p.add_argument("--eod-token", default="", help="the tokenizer's end-of-document token (default: the first of <|endoftext|>, </s>, ...)")
    p.add_argument("--sample-by", default="auto", choices=SAMPLE_BY,
                   help="text files: one document per file, paragraph or line (auto: per file, or per paragraph of a single file)")
    p.set_defaults(func=_cmd_prepare_data)


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from lanton_dist.data.prepare import prepare_data

    try:
        stats = prepare_data(args.input, args.output, fmt=args.format or "", text_key=args.jsonl_key, tokenizer=args.tokenizer,
                             eod_token=args.eod_token, sample_by=args.sample_by)
    except ImportError as exc:  # --tokenizer without the 'tokenizers' package
        print(f"lanton-dist prepare-data: error: {exc}", file=sys.stderr)
        return 2
    print(stats.summary())
    return 0


# ============================================================================ verify-checkpoint
def _verify_checkpoint_parser(sub) -> None:
    p = sub.add_parser("verify-checkpoint", help="check a checkpoint's files against its manifest (size, CRC-32)",
                       description="Verify one checkpoint directory (step_N) or every complete checkpoint of a run "
                                   "directory (or its checkpoints/) against the manifest in each COMMITTED marker. "
                                   "Exit 0: all intact; 1: a damaged file (each printed with the reason).")
    p.add_argument("dir", help="a run's train.out_dir, its checkpoints/ directory, or one step_N checkpoint")
    p.set_defaults(func=_cmd_verify_checkpoint)


def _cmd_verify_checkpoint(args: argparse.Namespace) -> int:
    from lanton_dist import checkpoint_dir as cd

    target = Path(args.dir)
    if not target.is_dir():
        raise FileNotFoundError(f"{target}: no such directory")
    if cd.is_complete(target):
        found = [target]
    else:
        root = target if target.name == cd.CHECKPOINTS else cd.root_of(target)
        found = [p for _, p in cd.complete_checkpoints(root)]
        if not found:
            raise FileNotFoundError(f"{target}: no complete checkpoint (a step_N directory with {cd.MARKER} and {cd.LOOP_STATE})")
    damaged = 0
    for path in found:
        problems = cd.verify(path)
        if problems:
            damaged += 1
            print(f"{path}: DAMAGED")
            for problem in problems:
                print(f"  {problem}")
        elif (manifest := cd.read_manifest(path)) is None:
            print(f"{path}: no manifest (written before checkpoints carried one): not verifiable")
        else:
            print(f"{path}: ok ({len(manifest)} files, sizes and CRC-32 match)")
    return 1 if damaged else 0


# ============================================================================ rehearse
def _rehearse_options(p: argparse.ArgumentParser, **defaults) -> None:
    """The rehearse options (also accepted after CONFIG, among the overrides)."""
    p.add_argument("--nodes", type=int, **defaults.get("nodes", {}))
    p.add_argument("--gpus-per-node", type=int, **defaults.get("gpus_per_node", {}))
    p.add_argument("--ranks", choices=("sample", "all"), **defaults.get("ranks", {}),
                   help="sample: 0, 1, the most loaded owner, the middle and the last rank; all: every rank")
    p.add_argument("--steps", type=int, **defaults.get("steps", {}), help="optimizer steps per rank (>= 3; step 2 estimates)")
    p.add_argument("--jobs", type=int, **defaults.get("jobs", {}), help="rank processes run at once")
    p.add_argument("--json", **defaults.get("json", {}), help="write the full report as JSON to this path ('-': stdout)")
    p.add_argument("--model", **defaults.get("model", {}), help="a planner preset (llama-7b, llama-13b, llama-70b, ...) "
                   "replacing the config's model section")


def _rehearse_parser(sub) -> None:
    p = sub.add_parser("rehearse", help="build and step the real optimizer as sampled ranks of a fake world, vs the planner",
                       description="Rehearse a run on one CPU (lanton_dist.rehearsal): fake process group, meta parameters.")
    _rehearse_options(p, nodes={"default": 1}, gpus_per_node={"default": 8}, ranks={"default": "sample"},
                      steps={"default": 3}, jobs={"default": 1}, json={"default": None},
                      model={"default": None})
    p.add_argument("config", help="run config YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="--section.key=value overrides, as for training (e.g. --parallel.backend=zero), and the options above")
    p.set_defaults(func=_cmd_rehearse)


def _cmd_rehearse(args: argparse.Namespace) -> int:
    from lanton_dist.rehearsal import rehearse

    late = argparse.ArgumentParser(prog="lanton-dist rehearse", add_help=False, allow_abbrev=False)
    names = ("nodes", "gpus_per_node", "ranks", "steps", "jobs", "json", "model")
    _rehearse_options(late, **{k: {"default": argparse.SUPPRESS} for k in names})
    opts, overrides = late.parse_known_args(args.overrides)
    for key, value in vars(opts).items():
        setattr(args, key, value)
    args.overrides = overrides
    if not Path(args.config).exists():
        raise FileNotFoundError(f"config {args.config} does not exist")
    report = rehearse(args.config, list(args.overrides), args.nodes, args.gpus_per_node, args.ranks, args.steps, args.jobs,
                      args.model)
    print(report.text(), flush=True)
    if args.json == "-":
        print(json.dumps(report.to_json(), indent=1))
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
    return 0 if report.ok else 1


# ============================================================================ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lanton-dist", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    _plan_parser(sub)
    _export_hf_parser(sub)
    _eval_parser(sub)
    _profile_parser(sub)
    _prepare_data_parser(sub)
    _verify_checkpoint_parser(sub)
    _rehearse_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        args.overrides = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"lanton-dist {args.cmd}: error: {exc}\n")
    except RuntimeError as exc:  # a profiled run that failed or ran no optimizer step
        parser.exit(1, f"lanton-dist {args.cmd}: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
