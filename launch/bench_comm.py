"""Communication and optimizer-step time: LANTON vs D-Muon vs AdamW, on the ZeRO engine and the adapters.

For each world size (spawned processes, one per device: ``--device cpu --backend gloo`` by
default, ``--device cuda --backend nccl`` for one GPU per process, ``cuda:<local rank>``) and
each framework:

* ``zero``      — :func:`lanton_dist.engine.build_sharded_optimizer` (owner-aligned ZeRO-1/2):
  LANTON, D-Muon, AdamW, and AdamW on ``layout='plain'`` (plain ZeRO, the baseline);
  every byte is the engine's own (grad reduce-scatter + param all-gather + scalars);
* ``fsdp2``     — :class:`lanton_dist.integrations.fsdp2.LANTONFSDP2` on a ``fully_shard`` model;
* ``deepspeed`` — :func:`lanton_dist.integrations.deepspeed.initialize`, ZeRO-2 (if installed).

For the adapters the meter sees what the optimizer adds on top of the framework's own
all-gathers/reduce-scatters (identical for every algorithm on one framework), so their
"bytes" are the optimizer's traffic; the extra over AdamW on the same framework is compared
with the all-to-all optimum (the bytes a rank must send to move its pieces to the owners and
the owners' results back, exact for the layout; ≈ 2 × owned hidden bytes × (W−1)/W) and
with one ring all-gather of the fp32 model (what one FSDP/ZeRO parameter gather costs).
``bytes_vs_dmuon`` is every row's bytes over D-Muon's on the same framework: hidden matrices'
owners keep momentum and Option I's previous gradient whole, so LANTON's only extra is its
scalar all-reduces. ``step_ms`` is the median wall
time of the optimizer step (for DeepSpeed,
``engine.step()``, which includes its own all-gather), after ``--warmup`` steps. Bytes are
per rank per step (sent bytes, standard ring/all-to-all accounting; see
:mod:`lanton_dist.engine.meter`), averaged over the measured steps (estimation steps every
``--k``) and over ranks. More ranks than cores oversubscribe the CPU: compare times only
side by side within one world size.

Usage::

    python launch/bench_comm.py --worlds 2 4 --steps 20 --out bench_comm.json
    python launch/bench_comm.py --device cuda --backend nccl --worlds 2 4 8

On CUDA the step is timed between two ``torch.cuda.synchronize()`` calls.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lanton_dist.config import ModelConfig, OptimConfig  # noqa: E402
from lanton_dist.model import Transformer  # noqa: E402

MODEL = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=64)
ALGORITHMS = ("lanton", "dmuon", "adamw")


def _batches(steps: int, batch: int, seq: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, MODEL.vocab_size, (batch, seq + 1), generator=g).to(device) for _ in range(steps)]


def _device(args) -> torch.device:
    """This process's device: the CPU, or ``cuda:<local rank>`` (set as the current device)."""
    if args.device == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def _summary(meter, times: list[float], first: int, last: int, optimum: float = 0.0) -> dict:
    steps = range(first, last + 1)
    tensor = [meter.tensor_bytes(s) for s in steps]
    scalar = [meter.scalar_bytes(s) for s in steps]
    return dict(tensor_bytes=statistics.mean(tensor), scalar_bytes=statistics.mean(scalar),
                max_step_bytes=max(t + s for t, s in zip(tensor, scalar)), step_ms=statistics.median(times) * 1e3,
                a2a_optimum_bytes=optimum)


def _run_zero(rank, world, args, algo, layout):
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.factory import hyper_parameters, lanton_options, param_groups
    from lanton_dist.engine.zero import ShardedLANTON

    cfg = OptimConfig(name=algo, estimate_every=args.k)
    model = Transformer(MODEL).to(_device(args))
    if layout == "plain":
        opt = ShardedLANTON(param_groups(model, cfg), "adamw", layout="plain", **lanton_options(cfg), **hyper_parameters(cfg))
    else:
        opt = build_sharded_optimizer(model, cfg)
    return _train(rank, world, args, model, opt.step, opt.zero_grad, opt.meter)


def _run_fsdp2(rank, world, args, algo):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    device = _device(args)
    mesh = init_device_mesh(device.type, (world,))
    model = Transformer(MODEL).to(device)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LANTONFSDP2(model, OptimConfig(name=algo, estimate_every=args.k))
    return _train(rank, world, args, model, opt.step, opt.zero_grad, opt.meter,
                  optimum=opt.exchange.optimum_sent_elements() * 4)


def _run_deepspeed(rank, world, args, algo):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    from lanton_dist.integrations.deepspeed import initialize

    model = Transformer(MODEL).to(_device(args))
    config = {"train_micro_batch_size_per_gpu": args.batch // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, opt = initialize(model, OptimConfig(name=algo, estimate_every=args.k), config)

    def backward_step(x):
        engine.backward(_loss(engine, x))

    return _train(rank, world, args, engine, engine.step, lambda: None, opt.meter, backward=backward_step,
                  optimum=opt.exchange.optimum_sent_elements() * 4)


def _train(rank, world, args, model, step, zero_grad, meter, backward=None, optimum=0.0):
    device = _device(args)
    xs = _batches(args.warmup + args.steps, args.batch, args.seq, device)
    times = []
    for i, x in enumerate(xs):
        local = x[rank * (args.batch // world):(rank + 1) * (args.batch // world)]
        if backward is None:
            _loss(model, local).backward()
        else:
            backward(local)
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        _sync(device)
        t = time.perf_counter() - t0
        zero_grad()
        if i >= args.warmup:
            times.append(t)
    return _summary(meter, times, args.warmup + 1, args.warmup + args.steps, optimum)


def _job(rank, world, args, framework):
    torch.manual_seed(0)
    out = {}
    if framework == "zero":
        for algo in ALGORITHMS:
            out[algo] = _run_zero(rank, world, args, algo, "owner")
        out["adamw_plain"] = _run_zero(rank, world, args, "adamw", "plain")
    elif framework == "fsdp2":
        for algo in ALGORITHMS:
            out[algo] = _run_fsdp2(rank, world, args, algo)
    else:
        for algo in ALGORITHMS:
            out[algo] = _run_deepspeed(rank, world, args, algo)
    return out


def _worker(rank, world, init_file, out_dir, args, framework):
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        _device(args)
    try:
        dist.init_process_group(args.backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        result = ("ok", _job(rank, world, args, framework))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        result = ("error", f"rank {rank}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def spawn(world: int, args, framework: str) -> list[dict]:
    """Run one framework's configurations on ``world`` processes (``args.backend``); per-rank results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, args, framework), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"{r}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"{framework} on {world} ranks failed:\n{value}")
            results.append(value)
    return results


def check_device(ap: argparse.ArgumentParser, device: str, backend: str, world: int) -> None:
    """Reject a device/backend pair that cannot run: nccl without CUDA, CUDA absent, or fewer GPUs
    than processes."""
    if backend == "nccl" and device != "cuda":
        ap.error("--backend nccl needs --device cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
        if torch.cuda.device_count() < world:
            ap.error(f"--device cuda: {world} processes need {world} GPUs, found {torch.cuda.device_count()}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=20, help="measured steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--k", type=int, default=10, help="LANTON estimate_every")
    ap.add_argument("--batch", type=int, default=8, help="global batch (divisible by every world size)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--frameworks", nargs="+", default=["zero", "fsdp2", "deepspeed"])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="one device per process (cuda: cuda:<rank>)")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="torch.distributed backend (nccl needs --device cuda)")
    ap.add_argument("--out", default="bench_comm.json")
    args = ap.parse_args(argv)
    for w in args.worlds:
        if args.batch % w:
            ap.error(f"--batch {args.batch} is not divisible by world size {w}")
    check_device(ap, args.device, args.backend, max(args.worlds))
    frameworks = list(args.frameworks)
    if "deepspeed" in frameworks:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("deepspeed not installed: skipping the DeepSpeed adapter")
            frameworks.remove("deepspeed")
    n_params = sum(p.numel() for p in Transformer(MODEL).parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({MODEL}); k = {args.k}; {args.steps} steps after {args.warmup}; "
          f"{args.device}/{args.backend}")
    rows = []
    for world in args.worlds:
        for fw in frameworks:
            per_rank = spawn(world, args, fw)
            res = {algo: {key: statistics.mean(r[algo][key] for r in per_rank) for key in per_rank[0][algo]}
                   for algo in per_rank[0]}
            base = res["adamw"]
            model_bytes = n_params * 4 * (world - 1) / world  # one ring all-gather of the fp32 model
            for algo, m in res.items():
                total = m["tensor_bytes"] + m["scalar_bytes"]
                row = dict(world=world, framework=fw, algorithm=algo, bytes_per_step=total, **m,
                           time_vs_adamw=m["step_ms"] / base["step_ms"],
                           time_vs_dmuon=m["step_ms"] / res["dmuon"]["step_ms"],
                           bytes_vs_dmuon=total / (res["dmuon"]["tensor_bytes"] + res["dmuon"]["scalar_bytes"]))
                if fw == "zero":
                    plain = res["adamw_plain"]
                    row["bytes_vs_adamw"] = total / (base["tensor_bytes"] + base["scalar_bytes"])
                    row["bytes_vs_plain_zero_adamw"] = total / (plain["tensor_bytes"] + plain["scalar_bytes"])
                    ratio = (f"×AdamW {row['bytes_vs_adamw']:.3f} ×plain-ZeRO-AdamW "
                             f"{row['bytes_vs_plain_zero_adamw']:.3f}")
                else:
                    extra = total - (base["tensor_bytes"] + base["scalar_bytes"])
                    row["extra_bytes_vs_adamw"] = extra
                    row["extra_vs_a2a_optimum"] = extra / m["a2a_optimum_bytes"] if m["a2a_optimum_bytes"] else 0.0
                    row["extra_vs_model_allgather"] = extra / model_bytes
                    ratio = (f"extra over AdamW {extra:.0f} = ×{row['extra_vs_a2a_optimum']:.3f} all-to-all optimum "
                             f"({m['a2a_optimum_bytes']:.0f}) = ×{row['extra_vs_model_allgather']:.3f} "
                             "one model all-gather")
                rows.append(row)
                print(f"W={world} {fw:9s} {algo:11s} bytes/step {total:10.0f} step {m['step_ms']:8.2f} ms "
                      f"(×AdamW {row['time_vs_adamw']:.2f}, ×D-Muon {row['time_vs_dmuon']:.2f}) | bytes ×D-Muon "
                      f"{row['bytes_vs_dmuon']:.4f} {ratio}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=MODEL.__dict__, args=vars(args), rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
