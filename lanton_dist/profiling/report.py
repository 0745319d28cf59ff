"""Reports: per-step JSON records and a summary (:func:`build_report`), written as
``profile.json``, ``steps.jsonl`` and PNG plots (:func:`write_report`, :func:`render_plots`),
read back (:func:`load_report`) and printed (:func:`format_summary`). Torch-free; matplotlib is
imported only to plot."""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lanton_dist.profiling.sampler import nvml_unavailable

REPORT_VERSION = 1


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _interp(samples: list[tuple[float, float]], t: float) -> float | None:
    """Linear interpolation of a cumulative series ``[(t, value)]`` (sorted) at ``t``, clamped."""
    if not samples:
        return None
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return samples[-1][1]


def build_report(records: list[dict[str, Any]], nvml: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Report = ``{"version", "meta", "nvml", "steps", "summary"}`` from per-rank step records
    (:attr:`Profiler.records`) and an NVML dump (:meth:`NVMLSampler.to_json`).

    ``summary``: ``ranks``, ``steps`` (distinct step numbers), ``step_time_s`` (mean/median/max
    over records), ``compute_s_mean``, ``phases`` (per phase: ``time_s_per_step`` mean over
    records, ``time_s_total``, ``count_per_step``), ``bytes_per_step`` (per phase: ``mean`` over
    all rank-steps, ``mean_when_present`` over those issuing the phase, ``max``, ``total``),
    ``estimation_steps``, ``hidden_fraction`` (per async phase), ``energy`` (``J_per_step`` summed over GPUs,
    ``per_gpu_J_per_step``, ``power_W_mean``) or
    None with ``nvml_reason``.
    """
    nvml = nvml or nvml_unavailable("not sampled")
    records = sorted(records, key=lambda r: (r["step"], r["rank"], r["t_start"]))
    n = len(records)
    durations = sorted(r["duration_s"] for r in records)
    phases: dict[str, dict[str, float]] = defaultdict(lambda: {"time_s_total": 0.0, "count": 0})
    bytes_: dict[str, list[int]] = defaultdict(list)
    waits: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        for k, v in r["phases"].items():
            phases[k]["time_s_total"] += v["time_s"]
            phases[k]["count"] += v["count"]
        for k, v in r.get("bytes", {}).items():
            bytes_[k].append(v)
        for k, v in r.get("waits", {}).items():
            waits[k][0] += v["exposed_s"]
            waits[k][1] += v["span_s"]
    summary: dict[str, Any] = {
        "records": n, "ranks": sorted({r["rank"] for r in records}), "steps": sorted({r["step"] for r in records}),
        "step_time_s": {"mean": _mean(durations), "median": durations[n // 2] if n else None, "max": durations[-1] if n else None},
        "compute_s_mean": _mean([r["compute_s"] for r in records if r.get("compute_s") is not None]),
        "phases": {k: {"time_s_per_step": v["time_s_total"] / n, "time_s_total": v["time_s_total"], "count_per_step": v["count"] / n}
                   for k, v in sorted(phases.items())} if n else {},
        "bytes_per_step": {k: {"mean": sum(v) / n, "mean_when_present": sum(v) / len(v), "max": max(v), "total": sum(v)}
                           for k, v in sorted(bytes_.items())},
        "estimation_steps": sorted({r["step"] for r in records if r.get("estimation")}),
        "hidden_fraction": {k: (1.0 - e / s if s > 0 else None) for k, (e, s) in sorted(waits.items())},
        "energy": None, "nvml_reason": nvml.get("reason"),
    }
    samples = nvml.get("samples") or []
    if samples and records:
        by_gpu: dict[int, list[tuple[float, float]]] = defaultdict(list)
        power: dict[int, list[float]] = defaultdict(list)
        for s in samples:
            if s.get("energy_J") is not None:
                by_gpu[s["gpu"]].append((s["t"], s["energy_J"]))
            if s.get("power_W") is not None:
                power[s["gpu"]].append(s["power_W"])
        spans: dict[int, list[float]] = {}
        for r in records:
            a = spans.setdefault(r["step"], [r["t_start"], r["t_end"]])
            a[0], a[1] = min(a[0], r["t_start"] - (r.get("compute_s") or 0.0)), max(a[1], r["t_end"])
        per_gpu: dict[str, float] = {}
        for g, series in by_gpu.items():
            series.sort()
            joules = [(_interp(series, b) or 0.0) - (_interp(series, a) or 0.0) for a, b in spans.values()]
            per_gpu[str(g)] = sum(joules) / len(joules)
        summary["energy"] = {"J_per_step": sum(per_gpu.values()) if per_gpu else None, "per_gpu_J_per_step": per_gpu,
                             "power_W_mean": {str(g): sum(v) / len(v) for g, v in power.items()},
                             "note": "per step = previous step's end (incl. forward/backward) to this step's end"}
    return {"version": REPORT_VERSION, "meta": meta or {}, "nvml": nvml, "steps": records, "summary": summary}


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by :func:`write_report` (``profile.json`` or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    if not path.exists():
        raise FileNotFoundError(f"no profile report at {path}")
    data = json.loads(path.read_text())
    missing = {"version", "steps", "summary", "nvml"} - set(data)
    if missing:
        raise ValueError(f"{path} is not a lanton_dist profile report (missing {sorted(missing)})")
    return data


def write_report(report: dict[str, Any], out: str | Path, timeline_steps: int = 4) -> list[Path]:
    """Write ``profile.json``, ``steps.jsonl`` and the PNGs into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "profile.json", out / "steps.jsonl"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in report["steps"]))
    paths += render_plots(report, out, timeline_steps)
    return paths


_LANE = {"optimizer_step": 0, "forward_backward": 0, "grad_reduce": 1, "grad_reduce_half": 1, "core": 1, "param_gather": 1,
         "lmo": 2, "variance_estimate": 2, "variance_finish": 2}


def _lane(name: str) -> int:
    return 3 if name.startswith("wait:") else _LANE.get(name, 2)


def render_plots(report: dict[str, Any], out: Path, timeline_steps: int = 4) -> list[Path]:
    """``timeline.png`` (phases per rank over the last ``timeline_steps`` steps), ``bytes.png``
    (bytes per phase per step, rank mean) and, with NVML samples, ``nvml.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["steps"]
    if not records:
        raise ValueError("the report has no step records to plot")
    paths = []
    steps = sorted({r["step"] for r in records})[-max(1, timeline_steps):]
    shown = [r for r in records if r["step"] in steps]
    names = sorted({iv[0] for r in shown for iv in r["intervals"]} | {"between steps"}, key=lambda n: (_lane(n), n))
    cmap = plt.get_cmap("tab20")
    color = {n: cmap(i % 20) for i, n in enumerate(names)}
    color["between steps"] = (0.85, 0.85, 0.85, 1.0)
    ranks = sorted({r["rank"] for r in shown})
    t0 = min(min((iv[1] for iv in r["intervals"]), default=r["t_start"]) - (r.get("compute_s") or 0.0) for r in shown)
    lanes = 4
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(ranks)))
    for i, rank in enumerate(ranks):
        base = i * (lanes + 1)
        for r in (r for r in shown if r["rank"] == rank):
            if r.get("compute_s"):
                ax.broken_barh([(r["t_start"] - r["compute_s"] - t0, r["compute_s"])], (base + lanes - 1, 0.9),
                               facecolors=color["between steps"])
            for name, a, b in r["intervals"]:
                lane = lanes - 1 - _lane(name)
                ax.broken_barh([(a - t0, max(b - a, 1e-7))], (base + lane, 0.9), facecolors=color[name])
    ax.set_yticks([i * (lanes + 1) + lanes / 2 for i in range(len(ranks))], [f"rank {r}" for r in ranks])
    ax.set_xlabel("time (s)")
    ax.set_title(f"phases of steps {steps[0]}–{steps[-1]} per rank (lanes: step / engine phases / NS, variance / waits)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=color[n]) for n in names], labels=names, fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(out / "timeline.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    all_steps = sorted({r["step"] for r in records})
    phases = sorted({p for r in records for p in r.get("bytes", {})})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(all_steps)
    for i, p in enumerate(phases):
        vals = []
        for s in all_steps:
            rs = [r for r in records if r["step"] == s]
            vals.append(sum(r.get("bytes", {}).get(p, 0) for r in rs) / len(rs))
        a1.bar([str(s) for s in all_steps], vals, bottom=bottom, label=p, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, vals)]
    a1.set_xlabel("step")
    a1.set_ylabel("bytes sent per rank")
    a1.set_title("bytes per step (rank mean), by phase")
    if phases:
        a1.legend(fontsize=7)
    per = report["summary"]["bytes_per_step"]
    a2.barh(
        phases or ["(no metered collectives)"],
        [per[p]["mean"] for p in phases] or [0],
        color=[cmap(i % 20) for i in range(len(phases))] or None,
    )
    if phases and any(per[p]["mean"] > 0 for p in phases):
        a2.set_xscale("log")
    a2.set_xlabel("mean bytes per rank and step (log)")
    a2.set_title("bytes per phase")
    fig.tight_layout()
    paths.append(out / "bytes.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    samples = report["nvml"].get("samples") or []
    if samples:
        ts0 = min(s["t"] for s in samples)
        gpus = sorted({s["gpu"] for s in samples})
        panels = [("power_W", "power (W)"), ("sm_util_pct", "SM util (%)"), ("mem_used_bytes", "memory used (GB)"),
                  ("nvlink_tx_Bps", "NVLink TX (GB/s)")]
        panels = [p for p in panels if any(s.get(p[0]) is not None for s in samples)]
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.3 * len(panels)), sharex=True, squeeze=False)
        for ax_, (key, label) in zip(axes[:, 0], panels):
            scale = 1e-9 if key in ("mem_used_bytes", "nvlink_tx_Bps") else 1.0
            for g in gpus:
                pts = [(s["t"] - ts0, s[key] * scale) for s in samples if s["gpu"] == g and s.get(key) is not None]
                if pts:
                    ax_.plot(*zip(*pts), lw=1, label=f"GPU {g}")
            for r in records:
                if r["rank"] == records[0]["rank"]:
                    ax_.axvspan(r["t_start"] - ts0, r["t_end"] - ts0, color="0.9", zorder=0)
            ax_.set_ylabel(label)
        axes[-1, 0].set_xlabel("time (s); grey: optimizer steps of the first rank")
        axes[0, 0].legend(fontsize=7, ncol=min(8, len(gpus)))
        fig.tight_layout()
        paths.append(out / "nvml.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    s = report["summary"]
    lines = [f"{s['records']} step records, ranks {s['ranks']}, steps {s['steps'][0] if s['steps'] else '-'}.."
             f"{s['steps'][-1] if s['steps'] else '-'}; mean step {1e3 * (s['step_time_s']['mean'] or 0):.2f} ms"
             + (f", between steps {1e3 * s['compute_s_mean']:.2f} ms" if s.get("compute_s_mean") else "")]
    lines.append(f"{'phase':<24} {'ms/step':>9} {'bytes/step':>12} {'hidden':>7}")
    for n in sorted(set(s["phases"]) | set(s["bytes_per_step"])):
        t = s["phases"].get(n, {}).get("time_s_per_step")
        b = s["bytes_per_step"].get(n, {}).get("mean")
        h = s["hidden_fraction"].get(n[5:]) if n.startswith("wait:") else None
        lines.append(f"{n:<24} {'' if t is None else f'{1e3 * t:.3f}':>9} {'' if b is None else f'{b:.0f}':>12} "
                     f"{'' if h is None else f'{h:.1%}':>7}")
    if s.get("energy"):
        lines.append(f"energy: {s['energy']['J_per_step']:.2f} J per step over {len(s['energy']['per_gpu_J_per_step'])} GPU(s)")
    else:
        lines.append(f"energy: n/a ({s.get('nvml_reason')})")
    return "\n".join(lines)

