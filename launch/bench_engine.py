#!/usr/bin/env python
"""The ZeRO engine's gradient-reduce overlap, and its step time and memory next to torch DDP +
``ZeroRedundancyOptimizer(AdamW)`` and FSDP2 + AdamW, on CPU gloo ranks.

    python launch/bench_engine.py [--steps 8] [--worlds 2 4] [--bucket-mb 0.5] [--out launch/results/bench_engine.json]

Model: ``configs/llama-tiny-cpu.yaml``'s tiny LLaMA, random tokens, ``--batch`` rows of
``--seq`` tokens per rank. Every configuration of one part runs in the same processes,
**interleaved** (step s of each before step s+1 of any), so machine load hits them alike; the
first ``--warmup`` steps are not counted; times are medians over the measured steps.

(a) overlap, world 2: the engine (LANTON) with ``overlap_grad_reduce`` on and off. ``exposed
reduce`` is the wall time ``step()`` spends in the gradient reduction (launching what is
not launched yet and waiting for all buckets): with overlap on, buckets launched from backward
hooks are (partly) done by then. ``hidden = 1 − exposed_on / exposed_off``.

(b) step time and memory, world ``--worlds``: ``engine-lanton`` and ``engine-adamw``
(``build_sharded_optimizer``, overlap on, all-gathers awaited by the next forward), ``ddp-zero``
(``DistributedDataParallel(gradient_as_bucket_view=True)`` + ``ZeroRedundancyOptimizer(AdamW)``)
and ``fsdp2`` (``fully_shard`` per block and root + ``torch.optim.AdamW``). ``step`` is the
wall time of forward + backward + optimizer step. ``held`` is the bytes of the distinct tensor
storages reachable from the model, its gradients and the optimizer (Python attributes, dicts and
lists — what stays allocated between steps; transient buffers inside a collective or FSDP2's
unsharded parameters during forward/backward are not seen), the largest over two points:
after backward and after the step. The process's peak resident set is reported once per world
(all four configurations share the process; mostly torch itself at this model size).

Prints one line per result; writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "launch")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_common import load_config  # noqa: E402
from distributed import run  # noqa: E402


#: Objects whose attributes the memory walk follows (the optimizers and the engine's parts).
OBJECT_MODULES = ("lanton_dist", "torch.optim", "torch.distributed.optim")


def _reachable(roots) -> dict[int, int]:
    """Distinct tensor storages reachable from ``roots`` (attributes, dicts, sequences)."""
    seen, out, stack = set(), {}, list(roots)
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            local = getattr(x, "_local_tensor", None)
            t = local if local is not None else x
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
            if x.grad is not None:
                stack.append(x.grad)
        elif isinstance(x, dict):
            stack += list(x.keys()) + list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif isinstance(x, torch.nn.Module):
            stack += list(x.parameters()) + list(x.buffers())
        elif hasattr(x, "__dict__") and not isinstance(x, type) and type(x).__module__.startswith(OBJECT_MODULES):
            stack += list(vars(x).values())
    return out


def _model(seed: int = 0):
    from lanton_dist.model import Transformer

    torch.manual_seed(seed)
    return Transformer(load_config([]).model)


def _tokens(args, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, load_config([]).model.vocab_size, (args.batch, args.seq + 1), generator=g)


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def _engine(kind: str, args, overlap_grad_reduce: bool = True):
    from lanton_dist.config import OptimConfig
    from lanton_dist.engine import build_sharded_optimizer

    model = _model()
    cfg = load_config([]).optim if kind == "engine-lanton" else OptimConfig(name="adamw")
    opt = build_sharded_optimizer(model, cfg, bucket_mb=args.bucket_mb, overlap_grad_reduce=overlap_grad_reduce, attach=True)
    return model, model, opt


def _ddp_zero(args):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=args.bucket_mb)
    return ddp, model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)


def _fsdp2(args, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _timed_reduce(opt, sink: list[float]) -> None:
    """Record the wall time of every ``opt.storage.reduce()`` (the step's gradient reduction)."""
    inner = opt.storage.reduce

    def reduce() -> None:
        t0 = time.perf_counter()
        inner()
        sink.append(time.perf_counter() - t0)

    opt.storage.reduce = reduce


def _overlap_worker(rank, world, args):
    runs = {}
    for on in (True, False):
        wrapped, model, opt = _engine("engine-lanton", args, overlap_grad_reduce=on)
        runs[on] = (model, opt, [], [], [])
        _timed_reduce(opt, runs[on][2])
    for step in range(args.warmup + args.steps):
        x = _tokens(args, rank, step)
        for on, (model, opt, reduce_t, backward_t, step_t) in runs.items():
            t0 = time.perf_counter()
            _loss(model, x).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if step >= args.warmup:
                backward_t.append(t1 - t0)
                step_t.append(t2 - t0)
    out = {}
    for on, (model, opt, reduce_t, backward_t, step_t) in runs.items():
        opt.wait_params()
        out["on" if on else "off"] = {"exposed_reduce_s": statistics.median(reduce_t[args.warmup:]),
                                      "forward_backward_s": statistics.median(backward_t),
                                      "step_s": statistics.median(step_t), "buckets": len(opt.layout.buckets)}
    out["params"] = {n: p.detach().clone() for n, p in runs[True][0].named_parameters()}
    out["params_off"] = {n: p.detach().clone() for n, p in runs[False][0].named_parameters()}
    return out


def _compare_worker(rank, world, args):
    setups = {kind: _engine(kind, args) for kind in ("engine-lanton", "engine-adamw")}
    setups["ddp-zero"] = _ddp_zero(args)
    setups["fsdp2"] = _fsdp2(args, world)
    times = {k: [] for k in setups}
    held = {k: 0 for k in setups}
    for step in range(args.warmup + args.steps):
        x = _tokens(args, rank, step)
        for kind, (wrapped, model, opt) in setups.items():
            t0 = time.perf_counter()
            _loss(wrapped, x).backward()
            after_backward = _reachable([model, opt])
            opt.step()
            t1 = time.perf_counter()
            after_step = _reachable([model, opt])
            opt.zero_grad(set_to_none=True)
            held[kind] = max(held[kind], sum(after_backward.values()), sum(after_step.values()))
            if step >= args.warmup:
                times[kind].append(t1 - t0)
    out = {k: {"step_s": statistics.median(times[k]), "held_bytes": held[k]} for k in setups}
    return out | {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="rows per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bucket-mb", type=float, default=0.5, help="bucket size (the tiny model is ~3.4 MB in fp32)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", default=str(ROOT / "launch" / "results" / "bench_engine.json"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    result: dict = {"args": vars(args), "host": platform.node(), "torch": torch.__version__,
                    "cpu_threads_per_rank": 1}
    ov = run(_overlap_worker, 2, args, timeout_s=600)
    same = all(torch.equal(r["params"][n], r["params_off"][n]) for r in ov for n in r["params"])
    on = statistics.mean(r["on"]["exposed_reduce_s"] for r in ov)
    off = statistics.mean(r["off"]["exposed_reduce_s"] for r in ov)
    result["overlap"] = {"world": 2, "ranks": [{k: r[k] for k in ("on", "off")} for r in ov], "exposed_reduce_on_s": on,
                         "exposed_reduce_off_s": off, "hidden_fraction": 1 - on / off if off > 0 else 0.0,
                         "on_equals_off": same}
    print(f"overlap world 2: exposed reduction {on * 1e3:.2f} ms (overlap on) vs {off * 1e3:.2f} ms (off): "
          f"{100 * result['overlap']['hidden_fraction']:.0f}% hidden; step {ov[0]['on']['step_s'] * 1e3:.1f} vs "
          f"{ov[0]['off']['step_s'] * 1e3:.1f} ms; {ov[0]['on']['buckets']} buckets; parameters equal: {same}")
    result["compare"] = {}
    for world in args.worlds:
        ranks = run(_compare_worker, world, args, timeout_s=600)
        per = {k: {"step_s": statistics.median(r[k]["step_s"] for r in ranks),
                   "held_bytes_max": max(r[k]["held_bytes"] for r in ranks)} for k in ranks[0] if k != "max_rss_bytes"}
        rss = max(r["max_rss_bytes"] for r in ranks)
        result["compare"][str(world)] = per | {"max_rss_bytes_all_four": rss}
        for k, v in per.items():
            print(f"world {world} {k:14s} step {v['step_s'] * 1e3:8.1f} ms  held {v['held_bytes_max'] / 2**20:7.2f} MiB")
        print(f"world {world} max RSS per process (all four in one process): {rss / 2**20:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
