#!/usr/bin/env python
"""One-GPU check of the numbers the README quotes: one script, one JSON file.

    python launch/gpu_check.py [--out runs/gpu_check]            # one H100/H200: ≤ 8 minutes
    python launch/gpu_check.py --device cpu --tiny --out DIR      # the same code, tiny shapes (tests)

Sections (each records its own ``seconds``; a section still to start once ``--budget-s`` is
spent is recorded as ``{"skipped": "budget"}``):

* ``matmul``: bf16 matmul rate (TFLOP/s) of an n×n product (n = 8192; 256 with ``--tiny``).
* ``ns_kernel``: textbook NS5 (:func:`~lanton_dist.newton_schulz.newton_schulz_reference`) over
  ours — fused, fused + ``torch.compile`` (inductor, GPU only), fused + Triton one-triangle
  Gram kernel (where Triton runs) — on LLaMA-7B shapes 4096², 4096×11008, 11008×4096, bf16.
* ``estimator``: error and time of the ``ns`` estimator (default, and the old NS5 + 3 cubic)
  and of fp32 ``svdvals`` against fp64 svdvals on the three spectra of ``launch/bench_ns.py``
  at 4096×11008, bf16 and fp32.
* ``optimizer_step``: LANTON / Scion / D-Muon / AdamW ``step()`` time on TinyLlama-1.1B shapes
  (22 layers, d 2048, FFN 5632, GQA 32/4, vocab 32000) with seeded random gradients; the
  engine (:func:`lanton_dist.engine.build_sharded_optimizer`) at world 1 on NCCL (gloo on CPU),
  k = 10; per step times and the mean of estimation / plain steps.
* ``host_syncs``: host synchronisations per optimizer step over k steps
  (``torch.cuda.set_sync_debug_mode('warn')`` warnings); on CPU ``{"available": false}``.
* ``profile``: a 20-step profile of a small LLaMA on the engine
  (:func:`lanton_dist.profiling.run_engine_profile`, NVML sampling) with its report PNGs
  (``timeline.png``, ``bytes.png``, ``nvml.png``) under ``<out>/profile``; without NVML the
  profiler's documented fallback (timings and bytes only, said once).

Writes ``<out>/gpu_check.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "launch"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_ns

from lanton_dist.config import ModelConfig, OptimConfig
from lanton_dist.nuclear import NS_ESTIMATE, NSEstimate

LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TINY_SHAPES = [(64, 64), (64, 172), (172, 64)]
LLAMA_1B = ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048)
TINY_MODEL = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172, max_seq_len=32)
PROFILE_MODEL = ModelConfig(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=2816, max_seq_len=512)
ALGORITHMS = ("lanton", "scion", "dmuon", "adamw")
K = 10


def matmul_tflops(n: int, device: torch.device, repeats: int = 10) -> dict[str, Any]:
    """bf16 n×n @ n×n rate."""
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    _, t = bench_ns.timed(lambda: a @ b, device, repeats)
    return {"n": n, "seconds": t, "tflops": 2 * n**3 / t / 1e12}


def ns_kernel(shapes: list[tuple[int, int]], device: torch.device) -> list[dict[str, Any]]:
    from lanton_dist.kernels import triton_usable

    probe = torch.ones(1, device=device, dtype=torch.bfloat16)
    return bench_ns.kernel_table(shapes, torch.bfloat16, device, repeats=5,
                                 compile_backend="inductor" if device.type == "cuda" else None,
                                 symmetric=triton_usable(probe))


def estimator(shape: tuple[int, int], device: torch.device) -> dict[str, Any]:
    cands = {"ns default (gram+PE6+1cubic)": NS_ESTIMATE, "ns old (muon5+3cubic)": NSEstimate(5, 3, "muon", "frobenius")}
    rows = bench_ns.estimator_table([shape], ["bf16", "fp32"], cands, device, repeats=3, exact_time=True)
    return {"rows": rows, "summary": bench_ns.summarize([r for r in rows if "flops_ratio" in r])}


def _model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """The LLaMA at ``cfg`` with N(0, 0.02) weights allocated directly on ``device`` (shapes matter, values not)."""
    from lanton_dist.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def _set_grads(model: torch.nn.Module, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=p.device, generator=gen).mul_(1e-3)


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by ``fn`` (sync debug mode 'warn'), None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def optimizer_steps(cfg: ModelConfig, device: torch.device, steps: int) -> dict[str, Any]:
    """Step times and host syncs of every algorithm on the engine at world 1 (NCCL / gloo)."""
    import torch.distributed as dist

    from lanton_dist.engine import build_sharded_optimizer

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, Any] = {}
    syncs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/init",
                                rank=0, world_size=1)
        try:
            model = _model(cfg, device)
            n_params = sum(p.numel() for p in model.parameters())
            for alg in ALGORITHMS:
                opt = build_sharded_optimizer(model, OptimConfig(name=alg, estimate_every=K))
                gen = torch.Generator(device=device).manual_seed(1)
                per_step = []
                for _ in range(steps + 1):  # the first step allocates state: not timed
                    _set_grads(model, gen)
                    sync()
                    t0 = time.perf_counter()
                    opt.step()
                    sync()
                    per_step.append(time.perf_counter() - t0)
                per_step = per_step[1:]
                est = [t for i, t in enumerate(per_step) if (i + 1) % K == 0]
                plain = [t for i, t in enumerate(per_step) if (i + 1) % K != 0]
                times[alg] = {"step_s": per_step, "mean_s": sum(per_step) / len(per_step),
                              "mean_plain_s": sum(plain) / max(1, len(plain)), "mean_every_kth_s": sum(est) / max(1, len(est))}

                def k_steps(opt: Any = opt, gen: torch.Generator = gen) -> None:
                    for _ in range(K):
                        _set_grads(model, gen)
                        opt.step()

                n = count_host_syncs(k_steps, device)
                syncs[alg] = {"available": False, "reason": "CPU: no CUDA stream"} if n is None else \
                    {"available": True, "syncs_over_k_steps": n, "per_step": n / K}
                del opt
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            dist.destroy_process_group()
    base = times["dmuon"]["mean_s"]
    for t in times.values():
        t["ratio_to_dmuon"] = t["mean_s"] / base
    return {"model": vars(cfg), "parameters": n_params, "k": K, "steps": steps, "times": times, "host_syncs": syncs}


def profile(cfg: ModelConfig, device: torch.device, steps: int, out: Path, tiny: bool) -> dict[str, Any]:
    from lanton_dist import profiling as prof

    run = prof.EngineRun(world=1, steps=steps, device=device.type, estimate_every=K, model=cfg,
                         batch=2 if tiny else 8, seq_len=cfg.max_seq_len, timeout_s=300.0)
    report = prof.run_engine_profile(run, nvml_interval_s=0.05)
    paths = prof.write_report(report, out / "profile")
    return {"summary": report.get("summary"), "nvml": {k: v for k, v in (report.get("nvml") or {}).items() if k != "samples"},
            "files": [str(p.relative_to(out)) for p in paths]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the test of this script on CPU")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device here; use --device cpu --tiny")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tiny = args.tiny
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "tiny": tiny, "cuda": torch.version.cuda,
        "default_estimator": vars(NS_ESTIMATE) | {"dtype": str(NS_ESTIMATE.dtype)},
    }
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("matmul", lambda: matmul_tflops(256 if tiny else 8192, device)),
        ("ns_kernel", lambda: ns_kernel(TINY_SHAPES if tiny else LLAMA7B_SHAPES, device)),
        ("estimator", lambda: estimator(TINY_SHAPES[1] if tiny else LLAMA7B_SHAPES[1], device)),
        ("optimizer_step", lambda: optimizer_steps(TINY_MODEL if tiny else LLAMA_1B, device, K + 1 if tiny else 2 * K)),
        ("profile", lambda: profile(TINY_MODEL if tiny else PROFILE_MODEL, device, 3 if tiny else 20, out, tiny)),
    ]
    for name, fn in sections:
        if time.perf_counter() - t_start > args.budget_s:
            result[name] = {"skipped": "budget"}
            continue
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # one failing section must not lose the others' numbers
            value = {"error": f"{type(exc).__name__}: {exc}"}
        result[name] = {"seconds": time.perf_counter() - t0, "result": value}
        print(f"[gpu_check] {name}: {result[name]['seconds']:.1f} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    if isinstance(result.get("optimizer_step", {}).get("result"), dict) and "host_syncs" in result["optimizer_step"]["result"]:
        result["host_syncs"] = result["optimizer_step"]["result"].pop("host_syncs")
    result["elapsed_s"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out / 'gpu_check.json'} in {result['elapsed_s']:.0f} s")
    return 1 if any(isinstance(v, dict) and "error" in v.get("result", {}) for v in result.values()
                    if isinstance(v, dict) and isinstance(v.get("result"), dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
