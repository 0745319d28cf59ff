#!/usr/bin/env python
"""LLaMA pretraining on Megatron-core (tensor + pipeline parallel) with a LANTON-family optimizer.

    torchrun --nproc-per-node 8 launch/pretrain_llama.py --config configs/llama-1b.yaml \\
        [--section.key value ...]

One process per GPU (``torchrun``; ``slurm/launch.py`` builds the multi-node command). Without
``torchrun`` it runs as a single process. Steps:

1. ``--config`` + ``--section.key value`` overrides → :class:`lanton_dist.config.RunConfig`.
2. ``torch.distributed`` (NCCL on GPU, gloo on CPU), then Megatron's TP/PP/DP groups from
   ``parallel.tp``/``parallel.pp`` (DP = world / (tp·pp)).
3. This rank's pipeline stage of the LLaMA ``GPTModel``
   (:mod:`lanton_dist.integrations.megatron_model`): fp32 parameters, bf16 compute through
   ``torch.autocast`` when ``train.dtype: bf16`` on GPU.
4. Data: ``data.source: megatron`` reads a Megatron indexed dataset (``data.path`` is the
   ``.bin``/``.idx`` prefix, already tokenised) through ``megatron.core.datasets.GPTDataset``;
   ``data.source: synthetic`` is a deterministic, learnable token stream (sample i is an
   arithmetic progression mod vocab whose start and step come from a generator seeded with
   ``(data.seed, i)``). Sample indices are a function of the step, so a resumed run sees
   exactly the data it would have seen.
5. Each step: ``global_batch`` sequences = ``num_microbatches`` × ``micro_batch`` × DP, run by
   Megatron's ``get_forward_backward_func()`` (1F1B pipeline schedule when pp > 1; gradient
   accumulation over micro-batches), then the optimizer from :func:`make_optimizer` and the
   warm-up + cosine schedule of :mod:`lanton_dist.schedule`.
6. Checkpoints with ``torch.distributed.checkpoint`` under ``train.out_dir/checkpoints/
   step_XXXXXXXX`` (model shards, optimizer state; scheduler and step in ``loop.json``),
   written atomically by :mod:`lanton_dist.checkpoint_dir` (the same scheme as
   ``launch/train.py``). ``train.resume: true`` resumes from the newest complete one and starts
   from scratch when there is none (so a requeued Slurm job can always pass it); its config
   must match (:func:`lanton_dist.config.check_resume`). A checkpoint is written every
   ``train.checkpoint_every`` steps, at the end, and when the job is asked to stop: SIGUSR1 or
   SIGTERM to a training process, or the file named by ``$LANTON_STOP_FILE`` appearing
   (``slurm/pretrain_llama.sbatch`` creates it on its pre-emption signal). A run that finished
   all steps writes ``train.out_dir/COMPLETED``.

Exit status: 0 when the run finished or stopped on request; 2 with one ``config error: …``
line for a bad config (checked before the model is built); 3 when training diverged
(``train.max_consecutive_skips`` skipped or non-finite steps in a row; no ``COMPLETED``).

``--cpu-shim`` (CI and tests only) loads ``tests/megatron_cpu_shim.py`` so that Megatron-core
runs on a CPU-only machine under gloo; see that file for what it patches.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lanton_dist import checkpoint_dir  # noqa: E402
from lanton_dist.backends import pieces_grad_norm  # noqa: E402
from lanton_dist.config import DATA_SOURCES, ConfigError, RunConfig, check_run_config, load_run_config, to_dict  # noqa: E402
from lanton_dist.data import INDEXED_SOURCES, TokenSamples, build_dataset, build_gpt_datasets  # noqa: E402
from lanton_dist.divergence import EXIT_DIVERGED, DivergenceGuard, Diverged  # noqa: E402
from lanton_dist.factory import build_optimizer, param_groups  # noqa: E402
from lanton_dist.preemption import COMPLETED, StopRequest, any_rank  # noqa: E402
from lanton_dist.schedule import build_scheduler  # noqa: E402
from lanton_dist.training_log import RunShape, Throughput, format_line, model_flops_per_token  # noqa: E402

CPU_SHIM = ROOT / "tests" / "megatron_cpu_shim.py"


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (configs/llama-7b.yaml, ...)")
    parser.add_argument("--cpu-shim", action="store_true",
                        help="CI/tests only: run Megatron-core on CPU via tests/megatron_cpu_shim.py")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def load_cpu_shim():
    """Import ``tests/megatron_cpu_shim.py`` by path and install it (test/CI use only)."""
    if not CPU_SHIM.exists():
        raise FileNotFoundError(f"--cpu-shim needs {CPU_SHIM} (it ships with the repository's tests)")
    spec = importlib.util.spec_from_file_location("megatron_cpu_shim", CPU_SHIM)
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_cpu_shim"] = module
    spec.loader.exec_module(module)
    module.install()
    return module


# ----------------------------------------------------------------------------- config checks
def check_pretrain_config(cfg: RunConfig) -> None:
    """:func:`lanton_dist.config.check_run_config` for this job's data-parallel size, plus what
    this entry does not run; a :class:`ConfigError` naming the key, before anything is built."""
    if cfg.parallel.backend != "megatron":
        raise ConfigError(f"parallel.backend: launch/pretrain_llama.py runs megatron, the config says {cfg.parallel.backend!r}")
    if cfg.data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source: launch/pretrain_llama.py reads {DATA_SOURCES}, got {cfg.data.source!r}")
    if cfg.optim.name == "lanton" and cfg.optim.option == "II":
        raise ConfigError("optim.option II needs two half-batch gradients, which Megatron's pipeline schedule does "
                          "not produce: use optim.option I with launch/pretrain_llama.py")
    world, model_parallel = int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel.tp * cfg.parallel.pp
    check_run_config(cfg, max(1, world // model_parallel) if model_parallel > 0 else 1)


# ----------------------------------------------------------------------------- distributed
def resolve_device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but CUDA is not available")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: RunConfig, device: torch.device) -> None:
    """``env://`` under torchrun; a one-process group otherwise."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = dict(backend=backend, timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


# ----------------------------------------------------------------------------- batch geometry
def batch_geometry(cfg: RunConfig, dp: int) -> tuple[int, int]:
    """``(micro_batch, num_microbatches)`` with global_batch = micro · num_microbatches · dp."""
    gb = cfg.train.global_batch
    if gb < 1:
        raise ValueError(f"train.global_batch must be >= 1, got {gb}")
    if gb % dp:
        raise ValueError(f"train.global_batch {gb} is not divisible by the data-parallel size {dp}")
    micro = cfg.train.micro_batch or gb // dp
    if micro < 1 or gb % (micro * dp):
        raise ValueError(
            f"train.global_batch {gb} is not divisible by train.micro_batch {micro} × data-parallel size {dp}"
        )
    return micro, gb // (micro * dp)


# ----------------------------------------------------------------------------- data
class SyntheticTokens:
    """Deterministic, learnable sequences: sample i is ``(a + b·t) mod vocab``, t = 0..seq_len,
    with ``(a, b)`` drawn from a generator seeded by ``(seed, stream, i)``. ``stream`` 0 is
    training, 1 validation."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, stream: int = 0) -> None:
        self.vocab_size, self.seq_len, self.seed, self.stream = vocab_size, seq_len, seed, stream

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, idx])
        a = int(rng.integers(0, self.vocab_size))
        b = int(rng.integers(1, min(17, self.vocab_size)))
        text = torch.from_numpy((a + b * np.arange(self.seq_len + 1)) % self.vocab_size).long()
        return dict(tokens=text[:-1], labels=text[1:], loss_mask=torch.ones(self.seq_len),
                    position_ids=torch.arange(self.seq_len))

    def __len__(self) -> int:
        return 2**62


def build_data(cfg: RunConfig, train_samples: int, valid_samples: int):
    """``(train, valid)`` sample sources of ``data.source`` (checked by :func:`check_pretrain_config`):
    ``synthetic`` here; ``indexed``/``megatron`` through Megatron's ``GPTDataset``;
    ``stdlib``/``text``/``jsonl`` as launch/train.py's global batches."""
    source = cfg.data.source
    if source == "synthetic":
        return (SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.seed, 0),
                SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.seed, 1))
    if source in INDEXED_SOURCES:
        return build_gpt_datasets(cfg.data, cfg.model.vocab_size, train_samples, valid_samples,
                                  Path(cfg.train.out_dir) / "data_cache")
    data = build_dataset(cfg.data, cfg.model.vocab_size)
    return TokenSamples(data, cfg.train.global_batch, "train"), TokenSamples(data, cfg.train.global_batch, "val")


def micro_batches(dataset, step: int, global_batch: int, micro: int, num_micro: int,
                  dp_rank: int, dp: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of ``step`` for data-parallel rank ``dp_rank`` (global sample index
    ``step·global_batch + (m·dp + dp_rank)·micro + j``)."""
    for m in range(num_micro):
        base = step * global_batch + (m * dp + dp_rank) * micro
        samples = [dataset[base + j] for j in range(micro)]
        yield {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}


# ----------------------------------------------------------------------------- model + step
def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer for this rank's Megatron parameters. The one place that picks it.

    One process: :func:`lanton_dist.build_optimizer` on the local parameters with the logical
    ParamSpecs (fused ``linear_qkv`` → q/k/v blocks, ``linear_fc1`` → gate/up). Otherwise the
    TP/PP/DP-aware engine (:func:`lanton_dist.integrations.megatron.build_megatron_optimizer`):
    gradient reduce-scatter over DP to matrix owners, TP-gathered Newton–Schulz and dual norms
    on one rank per matrix, scalar reductions (and the group-wide α max) over the whole job.
    """
    from lanton_dist.integrations.megatron import build_megatron_optimizer
    from lanton_dist.integrations.megatron_model import logical_param_specs

    if dist.get_world_size() > 1:
        return build_megatron_optimizer(model, cfg)
    specs = logical_param_specs(model, cfg)
    groups = param_groups(model, cfg.optim, specs={name: info.spec for name, info in specs.items()})
    return build_optimizer(model, cfg.optim, groups)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float()
    mask = loss_mask.to(losses.device, torch.float32).view(-1)
    loss = torch.sum(losses.view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.detach().float()])}


def make_forward_step(device: torch.device, attn_mask: torch.Tensor, bf16: bool):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(tokens, position_ids, attn_mask, labels=labels)
        return output, partial(_loss_func, batch["loss_mask"])
    return forward_step


def run_batches(model, forward_step, batches: Iterator, num_micro: int, seq_len: int, micro: int,
                forward_only: bool, device: torch.device) -> torch.Tensor:
    """One forward(/backward) over ``num_micro`` micro-batches; returns ``[Σ loss, Σ tokens]``
    summed over the whole job (DP replicas included), the same on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model],
        num_microbatches=num_micro, seq_length=seq_len, micro_batch_size=micro, forward_only=forward_only,
    )
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for r in results:
            total += r["lm loss"].to(device, torch.float64)
    dist.all_reduce(total)
    return total


# ----------------------------------------------------------------------------- checkpoints
def _tensor_key(info) -> str:
    if info.is_sharded:
        from megatron.core import parallel_state as ps
        return f"{info.global_name}@tp{ps.get_tensor_model_parallel_rank()}of{info.tp_size}"
    return info.global_name


def _rank_tag() -> str:
    from megatron.core import parallel_state as ps
    return f"tp{ps.get_tensor_model_parallel_rank()}pp{ps.get_pipeline_model_parallel_rank()}"


def _optimizer_layout(optimizer, key_of: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"groups": [], "tensors": {}, "scalars": {}}
    for g in optimizer.param_groups:
        keys = [key_of[id(p)] for p in g["params"]]
        meta["groups"].append(dict({k: v for k, v in g.items() if k not in ("params", "specs")}, keys=keys))
        for p, key in zip(g["params"], keys):
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{key}/{k}"] = v
                    meta["tensors"].setdefault(key, []).append((k, list(v.shape), str(v.dtype).removeprefix("torch.")))
                else:
                    meta["scalars"].setdefault(key, {})[k] = v
    for attr in ("skipped_steps",):
        if hasattr(optimizer, attr):
            meta[attr] = getattr(optimizer, attr)
    return tensors, meta


class Checkpointer:
    """``torch.distributed.checkpoint`` save/load of model and optimizer, inside the atomic
    ``step_N`` directories of :mod:`lanton_dist.checkpoint_dir` (step, scheduler and config in
    its ``loop.json``).

    Keys: a parameter's global (pipeline-independent) name, suffixed ``@tp<r>of<T>`` when it is
    TP-sharded (replicated tensors are written once); optimizer tensors under
    ``optim/<param key>/<state name>``. The optimizer's param-group settings and non-tensor
    state go to ``optim_meta/<tp,pp rank>.json`` (written by data-parallel rank 0 of each
    model-parallel rank). Identical keys on data-parallel replicas are written once, which is
    right for the replicated (DP = 1 or redundant) optimizer that :func:`make_optimizer` builds.
    """

    META_DIR = "optim_meta"

    def __init__(self, out_dir: str, model, specs: dict, optimizer, scheduler, cfg: RunConfig) -> None:
        self.dir = checkpoint_dir.root_of(out_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = to_dict(cfg)
        self.keep = cfg.train.keep_checkpoints
        params = dict(model.named_parameters())
        self.param_keys = {name: _tensor_key(info) for name, info in specs.items()}
        self.params = {self.param_keys[n]: params[n] for n in specs}
        self.key_of = {id(params[n]): self.param_keys[n] for n in specs}

    @property
    def sharded(self) -> bool:
        from lanton_dist.engine import ShardedLANTON

        return isinstance(self.optimizer, ShardedLANTON)

    def save(self, step: int) -> Path:
        loop = {"step": step, "backend": "megatron", "world": dist.get_world_size(), "config": self.config,
                "scheduler": self.scheduler.state_dict()}
        return checkpoint_dir.save(self.dir, step, self._write, loop, is_main=dist.get_rank() == 0,
                                   barrier=dist.barrier, keep_last=self.keep)

    def _write(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from megatron.core import parallel_state as ps

        from lanton_dist.engine import checkpoint as engine_ckpt

        if self.sharded:  # the engine writes its own pieces (owner-only and DP-sharded state)
            engine_ckpt.save(self.optimizer, str(path), extra={"model": dict(self.params)})
            return
        tensors, meta = _optimizer_layout(self.optimizer, self.key_of)
        dcp.save({"model": dict(self.params), "optim": tensors}, checkpoint_id=str(path))
        if ps.get_data_parallel_rank() == 0:
            (path / self.META_DIR).mkdir(exist_ok=True)
            (path / self.META_DIR / f"{_rank_tag()}.json").write_text(json.dumps(meta))

    def load(self, path: Path, loop: dict[str, Any]) -> int:
        """Restore model, optimizer and scheduler from complete checkpoint ``path`` whose
        ``loop.json`` is ``loop``; returns its step."""
        if self.sharded:
            from lanton_dist.engine import checkpoint as engine_ckpt

            with torch.no_grad():
                extra = {"model": {k: torch.empty_like(p) for k, p in self.params.items()}}
                engine_ckpt.load(self.optimizer, str(path), extra=extra)
                for k, p in self.params.items():
                    p.copy_(extra["model"][k])
            self.optimizer.sync_from_model()  # every rank continues from the saved weights
        else:
            meta_file = path / self.META_DIR / f"{_rank_tag()}.json"
            if not meta_file.is_file():
                raise ValueError(f"{path}: no optimizer metadata for {_rank_tag()} (was it written with another tp/pp layout?)")
            self._load_replicated(path, json.loads(meta_file.read_text()))
        checkpoint_dir.restore_scheduler(self.scheduler, loop["scheduler"])
        return int(loop["step"])

    def _load_replicated(self, path: Path, meta: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        by_key = {self.key_of[id(p)]: p for g in self.optimizer.param_groups for p in g["params"]}
        optim_tensors = {
            f"{key}/{name}": torch.empty(shape, dtype=getattr(torch, dtype), device=by_key[key].device)
            for key, entries in meta["tensors"].items() for name, shape, dtype in entries
        }
        with torch.no_grad():
            model_state = {k: torch.empty_like(p) for k, p in self.params.items()}
            dcp.load({"model": model_state, "optim": optim_tensors}, checkpoint_id=str(path))
            for k, p in self.params.items():
                p.copy_(model_state[k])
        if len(meta["groups"]) != len(self.optimizer.param_groups):
            raise ValueError(f"{path}: {len(meta['groups'])} optimizer param groups saved, this run has {len(self.optimizer.param_groups)}")
        for g, saved in zip(self.optimizer.param_groups, meta["groups"]):
            keys = [self.key_of[id(p)] for p in g["params"]]
            if keys != saved["keys"]:
                raise ValueError(f"{path}: optimizer param group holds {saved['keys'][:3]}…, this run has {keys[:3]}…")
            # JSON has lists where the group had tuples (betas): give them back their type
            g.update({k: tuple(v) if isinstance(g.get(k), tuple) else v for k, v in saved.items() if k != "keys"})
        self.optimizer.state.clear()
        for key, p in by_key.items():
            st = {name: optim_tensors[f"{key}/{name}"] for name, _, _ in meta["tensors"].get(key, [])}
            st.update(meta["scalars"].get(key, {}))
            if st:
                self.optimizer.state[p] = st
        if "skipped_steps" in meta:
            self.optimizer.skipped_steps = meta["skipped_steps"]


# ----------------------------------------------------------------------------- main
def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def train(cfg: RunConfig) -> dict[str, Any]:
    """The whole training run (torch.distributed must not be initialised yet, or be ours)."""
    check_pretrain_config(cfg)
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda _msg: None)
    resume = checkpoint_dir.resume_point(cfg, say)  # before anything is built: a mismatch is a config error
    from megatron.core import parallel_state as ps

    from lanton_dist.integrations import megatron_model as mm

    device = resolve_device(cfg)
    bf16 = cfg.train.dtype == "bf16"
    if bf16 and device.type != "cuda":
        raise ConfigError(
            "train.dtype bf16 needs CUDA here: Megatron's linear layers re-enter autocast in backward "
            "only for CUDA (custom_bwd), so CPU autocast fails; use --train.dtype fp32 on CPU"
        )
    init_distributed(cfg, device)
    dp = mm.initialize_model_parallel(cfg)
    micro, num_micro = batch_geometry(cfg, dp)
    dp_rank = ps.get_data_parallel_rank()

    model = mm.build_gpt_model(cfg)
    if device.type == "cuda":
        model.cuda(device)
    specs = mm.logical_param_specs(model, cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_ratio)
    ckpt = Checkpointer(cfg.train.out_dir, model, specs, optimizer, scheduler, cfg)

    out_dir = Path(cfg.train.out_dir)
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    start = 0
    if resume is not None:
        start = ckpt.load(*resume)
        log(f"resume: loaded {resume[0]} (step {start})")

    metrics_path = out_dir / "metrics.jsonl"
    if dist.get_rank() == 0:
        if start < cfg.train.steps:
            (out_dir / COMPLETED).unlink(missing_ok=True)
        if metrics_path.exists():  # drop rows of steps that the resumed run will redo
            rows = metrics_path.read_text().splitlines()
            metrics_path.write_text("".join(r + "\n" for r in rows if r and json.loads(r)["step"] <= start))

    eval_every, eval_batches = cfg.train.eval_every, cfg.train.eval_batches
    if eval_every > 0 and cfg.data.source in INDEXED_SOURCES and cfg.data.val_fraction == 0:
        log("eval: data.val_fraction is 0, so there is no validation split; evaluation is off")
    train_samples = cfg.train.steps * cfg.train.global_batch
    valid_samples = eval_batches * cfg.train.global_batch if eval_every > 0 else 0
    train_data, valid_data = build_data(cfg, train_samples, valid_samples)
    seq = cfg.data.seq_len
    attn_mask = mm.causal_attention_mask(seq, device)
    forward_step = make_forward_step(device, attn_mask, bf16)
    stop = StopRequest.from_environment()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"megatron LLaMA: world={dist.get_world_size()} tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={dp} "
        f"micro={micro}x{num_micro} params/rank={n_params / 1e6:.2f}M optimizer={cfg.optim.name} device={device}")

    history: list[dict[str, Any]] = []
    tokens_per_step = cfg.train.global_batch * seq
    shape = RunShape.of(cfg.train.steps, tokens_per_step, model_flops_per_token(cfg.model, seq), device,
                        dist.get_world_size(), cfg.logging.peak_tflops)
    window = Throughput(start)
    step = start
    stopped = False
    last_saved = start if start else -1
    guard = DivergenceGuard(cfg.train.max_consecutive_skips, int(getattr(optimizer, "skipped_steps", 0)))
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        model.train()
        model.zero_grad(set_to_none=True)
        batches = micro_batches(train_data, step, cfg.train.global_batch, micro, num_micro, dp_rank, dp)
        total = run_batches(model, forward_step, batches, num_micro, seq, micro, False, device)
        loss = float(total[0] / total[1])
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()  # skips (and counts) a step whose gradients are not finite
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        skipped = int(getattr(optimizer, "skipped_steps", 0))
        record = dict(step=step, loss=loss, lr=lrs, step_s=dt, skipped_steps=skipped)
        logging_step = step % max(1, cfg.train.log_every) == 0 or step == cfg.train.steps
        if logging_step:  # the same line and fields as lanton_dist.trainer (lanton_dist.training_log)
            record.update(shape.log_fields(window.lap(step, tokens_per_step), float(grad_norm(model, optimizer, device)),
                                           device))
        if eval_every > 0 and valid_data is not None and (step % eval_every == 0 or step == cfg.train.steps):
            t_eval = time.perf_counter()
            record["val_loss"] = evaluate(model, forward_step, valid_data, cfg, micro, num_micro, dp_rank, dp, device)
            window.exclude(time.perf_counter() - t_eval)
        history.append(record)
        if dist.get_rank() == 0 and (logging_step or "val_loss" in record):
            print(format_line(record, cfg.train.steps), flush=True)
        if dist.get_rank() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        guard.observe(step, skipped, loss)  # the same on every rank: loss and skip decision are job-wide
        every = cfg.train.checkpoint_every
        if every > 0 and step % every == 0:
            ckpt.save(step)
            last_saved = step
        if step < cfg.train.steps and stop.agreed(partial(any_rank, device=device)):
            log(f"stop requested: checkpointing at step {step} and exiting")
            stopped = True
            break
    if last_saved != step:
        ckpt.save(step)
    if not stopped and dist.get_rank() == 0:
        (out_dir / COMPLETED).write_text(f"{step}\n")
    return dict(history=history, start=start, step=step, stopped=stopped)


def grad_norm(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Global L2 norm of the gradient of the step just taken: from the sharded engine's pieces
    (:func:`lanton_dist.backends.pieces_grad_norm`), or in one process from ``p.grad``."""
    if hasattr(optimizer, "pieces"):
        return pieces_grad_norm(optimizer, device)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def evaluate(model, forward_step, dataset, cfg: RunConfig, micro: int, num_micro: int,
             dp_rank: int, dp: int, device: torch.device) -> float:
    """Mean loss per token over the same ``train.eval_batches`` global batches every time."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for b in range(cfg.train.eval_batches):
            batches = micro_batches(dataset, b, cfg.train.global_batch, micro, num_micro, dp_rank, dp)
            total += run_batches(model, forward_step, batches, num_micro, cfg.data.seq_len, micro, True, device)
    model.train()
    return float(total[0] / total[1])


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        if args.config is not None and not Path(args.config).is_file():
            raise ConfigError(f"config file not found: {args.config}")
        cfg = load_run_config(args.config, overrides)
        check_pretrain_config(cfg)  # before the (slow) shim and Megatron imports
        if args.cpu_shim:
            load_cpu_shim()
        train(cfg)
    except (ConfigError, Diverged) as e:  # one line from global rank 0: every rank reaches the same verdict
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"config error: {e}" if isinstance(e, ConfigError) else f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else EXIT_DIVERGED
    finally:
        if dist.is_initialized():
            from megatron.core import parallel_state as ps
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
