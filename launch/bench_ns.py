#!/usr/bin/env python
"""Nuclear-norm estimator table (error, cost) and Newton–Schulz kernel ratio.

    python launch/bench_ns.py [--shapes 512x1376,1024x2752] [--dtypes fp32,bf16] [--device cpu]
                              [--repeats 3] [--out launch/results/bench_ns.json]

Estimator table: for every shape, compute dtype and test spectrum (:data:`SPECTRA`), the
relative error (estimate − Σσ)/Σσ against fp64 ``svdvals`` of every configuration in
:data:`CANDIDATES`, its FLOPs relative to one plain 5-step Newton–Schulz call (the LMO's), and
its measured time relative to that call. bf16 rows feed a bf16 D (the truth is the fp64 SVD of
the rounded D) and run Newton–Schulz in bf16; products accumulate in fp32 (CPU BLAS and
tensor cores alike). The choice of :data:`lanton_dist.nuclear.NS_ESTIMATE` is read off this table.

Kernel table: time of :func:`lanton_dist.newton_schulz.newton_schulz_reference` (textbook NS5)
over :func:`lanton_dist.newton_schulz.newton_schulz` (fused ``baddbmm`` updates; with
``--compile`` also under ``torch.compile``), same inputs, same steps.

``launch/gpu_check.py`` runs the same functions at LLaMA-7B shapes on a GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lanton_dist.newton_schulz import newton_schulz, newton_schulz_reference
from lanton_dist.nuclear import NS_ESTIMATE, NSEstimate, nuclear_norm

SPECTRA = ("gaussian", "decaying", "lowrank_noise")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: name -> the ``ns`` run; "default" is :data:`NS_ESTIMATE`.
CANDIDATES: dict[str, NSEstimate] = {
    "muon5+3cubic (old GPU default)": NSEstimate(5, 3, "muon", "frobenius"),
    "frob+PE6": NSEstimate(6, 0, "polar_express", "frobenius"),
    "gram+PE5": NSEstimate(5, 0),
    "gram+PE6": NSEstimate(6, 0),
    "gram+PE7": NSEstimate(7, 0),
    "gram+PE6+1cubic (default)": NSEstimate(6, 1),
}


def spectrum_matrix(kind: str, m: int, n: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """An fp32 ``m × n`` test matrix of one of :data:`SPECTRA`.

    ``gaussian``: i.i.d. N(0, 1). ``decaying``: U diag(logspace(0, −4, r)) Vᵀ, random orthonormal
    U, V, r = min(m, n). ``lowrank_noise``: rank-16 signal with σ from 1 to 0.5 plus
    0.01·N(0, 1/max(m, n)) noise (σ_noise ≈ 0.01·(1 ± √(min/max)))."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = min(m, n)

    def randn(*shape: int) -> torch.Tensor:  # drawn on CPU (the same matrix everywhere), used on device
        return torch.randn(*shape, generator=g).to(device)

    if kind == "gaussian":
        return randn(m, n)
    if kind not in ("decaying", "lowrank_noise"):
        raise ValueError(f"unknown spectrum {kind!r}; choose one of {SPECTRA}")
    k = r if kind == "decaying" else min(16, r)
    u, _ = torch.linalg.qr(randn(m, k))
    v, _ = torch.linalg.qr(randn(n, k))
    s = torch.logspace(0, -4, k) if kind == "decaying" else torch.linspace(1.0, 0.5, k)
    d = (u * s.to(device)) @ v.T
    if kind == "lowrank_noise":
        d = d + 0.01 * randn(m, n) / max(m, n) ** 0.5
    return d


def true_nuclear(d: torch.Tensor) -> float:
    """‖d‖_* from fp64 svdvals (on d's device)."""
    return float(torch.linalg.svdvals(d.detach().double()).sum())


def relative_error(estimate: torch.Tensor, truth: float) -> float:
    """(estimate − truth)/truth; the estimate itself when truth is 0."""
    est = float(estimate.double().cpu())
    return (est - truth) / truth if truth > 0 else est


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> tuple[Any, float]:
    """(first result, median seconds of ``repeats`` calls); on GPU after a warm-up call, synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        fn()
        sync()
    out, times = None, []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        res = fn()
        sync()
        times.append(time.perf_counter() - t0)
        out = res if out is None else out
    return out, sorted(times)[len(times) // 2]


def estimator_table(shapes: list[tuple[int, int]], dtypes: list[str], candidates: dict[str, NSEstimate],
                    device: torch.device, repeats: int = 1, exact_time: bool = False) -> list[dict[str, Any]]:
    """One row per (shape, dtype, spectrum, candidate): rel_err, flops_ratio, time_s, time_ratio
    (time over one plain NS5 call on the same D); with ``exact_time`` also a row for fp32 svdvals."""
    rows = []
    for m, n in shapes:
        for dname in dtypes:
            dt = DTYPES[dname]
            for kind in SPECTRA:
                d = spectrum_matrix(kind, m, n, device=device).to(dt)
                truth = true_nuclear(d)
                _, base = timed(lambda d=d, dt=dt: newton_schulz(d, dtype=dt), device, repeats)
                for name, est in candidates.items():
                    est = replace(est, dtype=dt)
                    value, t = timed(lambda d=d, est=est: nuclear_norm(d, "ns", ns=est), device, repeats)
                    rows.append({"shape": [m, n], "dtype": dname, "spectrum": kind, "estimator": name,
                                 "steps": est.steps, "refine_steps": est.refine_steps, "schedule": est.schedule,
                                 "start": est.start, "rel_err": relative_error(value, truth),
                                 "flops_ratio": est.cost(m, n), "time_s": t, "time_ratio": t / base})
                if exact_time:
                    value, t = timed(lambda d=d: torch.linalg.svdvals(d.float()).sum(), device, 1)
                    rows.append({"shape": [m, n], "dtype": dname, "spectrum": kind, "estimator": "exact (svdvals fp32)",
                                 "rel_err": relative_error(value, truth), "time_s": t, "time_ratio": t / base})
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (estimator, dtype): worst |rel_err| over spectra and shapes, max FLOPs ratio and the
    median measured time ratio (a median: single CPU timings on a shared machine are noisy)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        key = (r["estimator"], r["dtype"])
        s = out.setdefault(key, {"estimator": r["estimator"], "dtype": r["dtype"], "worst_abs_err": 0.0, "flops_ratio": 0.0})
        s["worst_abs_err"] = max(s["worst_abs_err"], abs(r["rel_err"]))
        s["flops_ratio"] = max(s["flops_ratio"], r.get("flops_ratio", 0.0))
        s.setdefault("errors", {})[f"{r['spectrum']} {r['shape'][0]}x{r['shape'][1]}"] = r["rel_err"]
        ratios.setdefault(key, []).append(r["time_ratio"])
    for key, s in out.items():
        xs = sorted(ratios[key])
        s["time_ratio_median"] = xs[len(xs) // 2]
    return list(out.values())


def kernel_table(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, repeats: int = 3,
                 compile_backend: str | None = None, symmetric: bool = False) -> list[dict[str, Any]]:
    """Textbook NS5 time over ours (fused; optionally compiled / symmetric kernel) and their max difference."""
    rows = []
    for m, n in shapes:
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n)).to(device)
        variants = {"fused": {}}
        if compile_backend:
            variants["fused+compile"] = {"compile_backend": compile_backend}
        if symmetric:
            variants["fused+symmetric"] = {"symmetric": True}
        ref, t_ref = timed(lambda x=x: newton_schulz_reference(x, dtype=dtype), device, repeats)
        for name, kw in variants.items():
            out, t = timed(lambda x=x, kw=kw: newton_schulz(x, dtype=dtype, **kw), device, repeats)
            rows.append({"shape": [m, n], "variant": name, "dtype": str(dtype).removeprefix("torch."),
                         "reference_s": t_ref, "ours_s": t, "speedup": t_ref / t,
                         "max_abs_diff": float((out.float() - ref.float()).abs().max())})
    return rows


#: LMO variants measured before any default changes: name -> newton_schulz keyword arguments.
LMO_VARIANTS: dict[str, dict[str, Any]] = {
    "muon5 frobenius (default)": {"steps": 5, "start": "frobenius"},
    "muon4 gram": {"steps": 4, "start": "gram"},
    "muon5 gram": {"steps": 5, "start": "gram"},
}


def lmo_table(shapes: list[tuple[int, int]], dtypes: list[str], device: torch.device) -> list[dict[str, Any]]:
    """Effect of the start on the LMO's update O = polar(G) (Muon quintic) on the test spectra:
    orthogonality error ‖OOᵀ − I‖₂ = max|σᵢ² − 1| (wide O) and σ_max(O), which is the RMS→RMS
    norm of the step −√(d_out/d_in)·O per unit learning rate; σ_min(O) on the top half of the
    spectrum (the directions that carry the gradient)."""
    rows = []
    for m, n in shapes:
        for dname in dtypes:
            for kind in SPECTRA:
                g = spectrum_matrix(kind, m, n, device=device)
                for name, kw in LMO_VARIANTS.items():
                    s = torch.linalg.svdvals(newton_schulz(g, dtype=DTYPES[dname], **kw).double().cpu())
                    rows.append({"shape": [m, n], "dtype": dname, "spectrum": kind, "variant": name,
                                 "orth_err": float((s**2 - 1).abs().max()), "rms_to_rms": float(s[0]),
                                 "sigma_min_top_half": float(s[: max(1, len(s) // 2)].min())})
    return rows


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=_shapes("512x1376,1024x2752"))
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compile", default=None, help="torch.compile backend for the kernel table (e.g. inductor)")
    p.add_argument("--sections", default="estimators,lmo,kernel", help="comma list of estimators, lmo, kernel")
    p.add_argument("--out", default="launch/results/bench_ns.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sections = set(args.sections.split(","))
    est_rows = estimator_table(args.shapes, args.dtypes.split(","), CANDIDATES, device, args.repeats) if "estimators" in sections else []
    summary = summarize(est_rows)
    print(f"{'estimator':34s} {'dtype':5s} {'worst |err|':>11s} {'FLOPs/NS5':>9s} {'time/NS5':>8s}")
    for s in summary:
        print(f"{s['estimator']:34s} {s['dtype']:5s} {s['worst_abs_err']:11.2e} {s['flops_ratio']:9.2f} {s['time_ratio_median']:8.2f}")
    lmo = lmo_table(args.shapes, args.dtypes.split(","), device) if "lmo" in sections else []
    for r in lmo:
        print(f"lmo {r['shape']} {r['dtype']} {r['spectrum']:13s} {r['variant']:26s} ‖OOᵀ−I‖₂ {r['orth_err']:.3f} "
              f"RMS→RMS {r['rms_to_rms']:.3f} σ_min(top half) {r['sigma_min_top_half']:.3f}")
    kern = kernel_table(args.shapes, DTYPES[args.dtypes.split(",")[0]], device, args.repeats, args.compile) if "kernel" in sections else []
    for k in kern:
        print(f"kernel {k['shape']} {k['variant']}: textbook {k['reference_s']*1e3:.1f} ms / ours {k['ours_s']*1e3:.1f} ms "
              f"= {k['speedup']:.2f}x, max diff {k['max_abs_diff']:.1e}")
    out = {"device": str(device), "host": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "default": {"steps": NS_ESTIMATE.steps, "refine_steps": NS_ESTIMATE.refine_steps,
                                                           "schedule": NS_ESTIMATE.schedule, "start": NS_ESTIMATE.start},
           "estimators": est_rows, "summary": summary, "lmo": lmo, "kernel": kern}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
