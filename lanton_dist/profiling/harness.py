"""The built-in engine run: a short training of a small LLaMA on the ZeRO engine over N spawned
processes, profiled (:func:`run_engine_profile`)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lanton_dist.config import ModelConfig
from lanton_dist.profiling.report import build_report
from lanton_dist.profiling.sampler import NVMLSampler
from lanton_dist.profiling.timers import Profiler


@dataclass
class EngineRun:
    """A short training of a small LLaMA on :class:`~lanton_dist.engine.ShardedLANTON`.

    ``world`` processes (gloo on CPU, nccl with ``device='cuda'``, one GPU each), ``steps``
    optimizer steps of ``batch`` random-token sequences of ``seq_len`` per rank.
    """

    world: int = 2
    steps: int = 6
    algorithm: str = "lanton"
    option: str = "I"
    estimate_every: int = 2
    nuclear_estimator: str = "auto"
    device: str = "cpu"
    bucket_mb: float = 25.0
    overlap: bool = True
    batch: int = 8
    seq_len: int = 64
    seed: int = 0
    timeout_s: float = 300.0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                                                   ffn_dim=352, max_seq_len=64))

    def __post_init__(self) -> None:
        if self.world < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError(f"world, steps and batch must be >= 1, got {self.world}, {self.steps}, {self.batch}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and torch.cuda.device_count() < self.world:
            raise ValueError(f"device cuda needs {self.world} GPUs, this machine has {torch.cuda.device_count()}")
        if self.option == "II" and self.batch % 2:
            raise ValueError("Option II splits each rank's batch in two halves: batch must be even")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        from lanton_dist.model import check_model_config

        check_model_config(self.model)


def _engine_worker(rank: int, cfg: EngineRun, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from lanton_dist.config import OptimConfig
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.model import Transformer

    result: dict[str, Any]
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world))
        device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from datetime import timedelta

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=cfg.world, timeout=timedelta(seconds=cfg.timeout_s))
        model = Transformer(cfg.model, seed=cfg.seed).to(device)
        ocfg = OptimConfig(name=cfg.algorithm, option=cfg.option, estimate_every=cfg.estimate_every,
                           nuclear_estimator=cfg.nuclear_estimator)
        opt = build_sharded_optimizer(model, ocfg, bucket_mb=cfg.bucket_mb, overlap=cfg.overlap, overlap_grad_reduce=True)
        prof = Profiler(rank, cfg.world, device).attach(opt)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

        for _ in range(cfg.steps):
            x = torch.randint(0, cfg.model.vocab_size, (cfg.batch, cfg.seq_len + 1), generator=gen).to(device)
            with prof.phase("forward_backward"):
                if opt.needs_two_half_batches():
                    h = cfg.batch // 2
                    (0.5 * loss_of(x[:h])).backward()
                    opt.stash_half_gradient()
                    (0.5 * loss_of(x[h:])).backward()
                else:
                    loss_of(x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        result = {"status": "ok", "records": prof.finalize(),
                  "meter": {"init_sync_bytes": opt.meter.by_phase(0).get("init_sync", 0), "buckets": len(opt.layout.buckets)}}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"status": "error", "error": f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_engine_profile(cfg: EngineRun, nvml_interval_s: float = 0.1, nvml: Any = None) -> dict[str, Any]:
    """Run :class:`EngineRun` on ``cfg.world`` spawned processes, profiled; return the report."""
    import torch.multiprocessing as mp

    sampler = NVMLSampler(nvml_interval_s, nvml=nvml).start()
    started = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "init")
            ctx = mp.spawn(_engine_worker, args=(cfg, init_file, tmp), nprocs=cfg.world, join=False)
            deadline = time.time() + cfg.timeout_s * 2
            while True:
                try:
                    if ctx.join(timeout=1):
                        break
                except mp.ProcessException:
                    break  # a rank died: its missing or error result is reported below
                if time.time() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    raise RuntimeError(f"profile run did not finish within {cfg.timeout_s * 2:.0f} s")
            results = []
            for r in range(cfg.world):
                path = Path(tmp, f"rank{r}.json")
                results.append(json.loads(path.read_text()) if path.exists() else {"status": "error", "error": f"rank {r}: no result"})
    finally:
        sampler.stop()
    errors = [r["error"] for r in results if r["status"] != "ok"]
    if errors:
        raise RuntimeError("profile run failed:\n" + "\n".join(errors))
    records = [rec for r in results for rec in r["records"]]
    meta = {"kind": "engine", "created": started, "host": socket.gethostname(), "torch": torch.__version__,
            "config": dataclasses.asdict(cfg), "wall_s": time.time() - started, "buckets": results[0]["meter"]["buckets"],
            "init_sync_bytes": [r["meter"]["init_sync_bytes"] for r in results]}
    return build_report(records, sampler.to_json(), meta)

