"""The ``lanton-dist plan`` report: the per-algorithm table of one model and layout (memory with
activations, with and without activation checkpointing, and for a setup that does not fit the
smallest TP × PP that does), and the estimation-overhead table over model sizes and k."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any

from lanton_dist.config import ModelConfig
from lanton_dist.names import ALGORITHMS
from lanton_dist.plan.inputs import PRESETS, Hardware, OptimSettings, ParallelLayout
from lanton_dist.plan.memory import ActivationSettings, fit_with_activations
from lanton_dist.plan.model import check_tp, resolve_model
from lanton_dist.plan.planner import StepPlanner
from lanton_dist.plan.predictions import STRATEGY_MODELS


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def plan_table(model: str | ModelConfig, layout: ParallelLayout, optim: OptimSettings, hw: Hardware | None = None,
               algorithms: Iterable[str] = ALGORITHMS, ks: Iterable[int] = (1, 5, 10, 20),
               global_batch: int = 1024, seq_len: int | None = None, growth_models: Iterable[str] = tuple(PRESETS),
               name: str | None = None, micro_batch: int = 1, activation_bytes: int = 2) -> tuple[str, dict[str, Any]]:
    """The ``lanton-dist plan`` report: ``(text, json-able dict)`` for ``algorithms`` on one model
    and layout, plus the estimation-overhead table over ``growth_models`` × ``ks``. Activations
    are those of ``micro_batch`` sequences of ``seq_len`` tokens in ``activation_bytes``-byte
    elements (:mod:`lanton_dist.plan.memory`)."""
    hw = hw or Hardware()
    plans = {a: StepPlanner(model, layout, replace(optim, algorithm=a), hw, name=name) for a in algorithms}
    summaries = {a: p.summary(global_batch, seq_len) for a, p in plans.items()}
    act = ActivationSettings(seq_len=seq_len or next(iter(plans.values())).model.max_seq_len, micro_batch=micro_batch,
                             activation_bytes=activation_bytes)
    for a, p in plans.items():
        summaries[a]["memory"]["with_activations"] = {
            "plain": fit_with_activations(p, act), "checkpointed": fit_with_activations(p, replace(act, recompute=True)),
            "settings": asdict(act)}
    first = next(iter(summaries.values()))
    lines = []
    cfg = first["model_config"]
    lines.append(f"{first['model']}: {first['params'] / 1e9:.3f}B params, d={cfg['dim']} L={cfg['n_layers']} "
                 f"heads={cfg['n_heads']}/{cfg['n_kv_heads']} ffn={cfg['ffn_dim']}, {first['hidden_matrices']} hidden matrices, "
                 f"NS5 of all = {first['ns_flops_total'] / 1e15:.3f} PFLOP")
    lines.append(f"layout: {layout.nodes} nodes x {layout.gpus_per_node} GPUs = {layout.world} ranks | TP {layout.tp} x PP {layout.pp} "
                 f"x DP {layout.dp} | {layout.strategy} (tp_mode {layout.tp_mode}) | bucket {layout.bucket_mb:g} MiB, "
                 f"{optim.param_bytes}-byte params | k={optim.estimate_every} option {optim.option} estimator {optim.nuclear_estimator}")
    lines.append(f"hardware: {hw.name} {hw.matmul_tflops:g} TFLOP/s matmul, NS at {hw.ns_efficiency:.0%} | NVLink {hw.intra_gbps:g} GB/s, "
                 f"network {hw.inter_gbps:g} GB/s per GPU, x{hw.comm_efficiency:g} efficiency | HBM {hw.hbm_gbps:g} GB/s")
    strat = STRATEGY_MODELS[layout.strategy]
    valid = strat.validated_by
    status = f"{layout.strategy} validated against {valid}" if valid else f"{layout.strategy}: NOT YET VALIDATED (analytic model only)"
    if layout.tp * layout.pp > 1:
        status += "; TP/PP parts (TP exchanges, stage split, world-wide scalars): NOT YET VALIDATED"
    lines.append(f"model status: {status}")
    lines.append("per rank and step (worst rank of the worst pipeline stage):")
    phases: list[str] = []
    for s in summaries.values():
        for step in (s["step"], s["estimation_step"], s["after_estimation_step"]):
            for ph in (step or {}).get("bytes_per_phase", {}):
                if ph not in phases:
                    phases.append(ph)
    header = f"{'algorithm':<9} {'step':<5} " + " ".join(f"{ph:>12}" for ph in phases) + \
             f" {'state/rank':>10} {'NS GFLOP':>9} {'imbal':>5} {'comm ms':>8} {'NS ms':>7} {'est ms':>7} {'elem ms':>7} {'opt ms':>7}"
    lines.append(header)
    for a, s in summaries.items():
        for label, step in (("plain", s["step"]), ("est", s["estimation_step"]), ("est+1", s["after_estimation_step"])):
            if step is None:
                continue
            t = step["time_s"]
            cells = " ".join(f"{human_bytes(step['bytes_per_phase'][ph]) if ph in step['bytes_per_phase'] else '-':>12}" for ph in phases)
            lines.append(f"{a:<9} {label:<5} {cells} {human_bytes(step['state_bytes_max']):>10} {step['ns_flops_max'] / 1e9:>9.0f} "
                         f"{step['ns_imbalance']:>5.2f} {t['comm'] * 1e3:>8.2f} {t['ns'] * 1e3:>7.2f} {t['estimator'] * 1e3:>7.2f} "
                         f"{t['elementwise'] * 1e3:>7.2f} {t['total'] * 1e3:>7.2f}")
    lines += _layout_lines(first, summaries)
    fit_search = _fit_search(plans, act)
    lines += _fit_search_lines(fit_search, summaries, layout)
    lines.append(f"fwd+bwd estimate: {first['fwd_bwd_s'] * 1e3:.0f} ms per step ({first['tokens_per_step']} tokens, MFU {hw.mfu:g})")
    if "lanton" in summaries and "dmuon" in summaries:
        lt, dm = summaries["lanton"]["amortized_step_s"], summaries["dmuon"]["amortized_step_s"]
        lines.append(f"LANTON optimizer step (mean over k={optim.estimate_every}) {lt * 1e3:.2f} ms vs D-Muon {dm * 1e3:.2f} ms: "
                     f"{(lt - dm) * 1e3:+.2f} ms = {(lt - dm) / (dm + first['fwd_bwd_s']):+.2%} of a D-Muon training step")
    growth = estimation_growth(layout, optim, hw, ks=tuple(ks), models=tuple(growth_models), global_batch=global_batch)
    lines.append(f"estimation overhead of LANTON over D-Muon, same {layout.world} ranks, {layout.strategy}, estimator "
                 f"{optim.nuclear_estimator}, option {optim.option} (extra ms per step / % of D-Muon training step):")
    lines.append(f"{'model':<10} {'tp x pp':>7} " + " ".join(f"{'k=' + str(k):>17}" for k in ks))
    for row in growth:
        if "error" in row:
            lines.append(f"{row['model']:<10} {'':>7} n/a: {row['error']}")
            continue
        cells = " ".join(f"{c['extra_s_per_step'] * 1e3:>8.2f} ({c['extra_vs_training']:>6.2%})" for c in row["by_k"])
        lines.append(f"{row['model']:<10} {row['tp']:>3} x{row['pp']:>2} {cells}")
    data = {"plans": summaries, "estimation_growth": growth, "strategy": strat.name,
            "strategy_description": strat.description, "fit_search": fit_search}
    return "\n".join(lines), data


def _layout_lines(first: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Padding of the engine layout, NS balance with and without split NS, per-rank memory and fit."""
    lines = []
    stats = first["layout_stats"]
    if stats:
        worst = max(stats, key=lambda x: x["padding_fraction"])
        big = max(x["max_bucket_numel"] for x in stats)
        honoured = all(x["cap_honoured"] for x in stats)
        lines.append(f"engine layout: padding {worst['padding_fraction']:.2%} (worst stage), {max(x['buckets'] for x in stats)} bucket(s) "
                     f"per stage, largest {big / 1e6:.1f} M elements; bucket cap {stats[0]['cap'] / 1e6:.1f} M elements "
                     + ("honoured" if honoured else "raised (whole matrices do not fit it within the padding bound)"))
    split = next((s["ns_split"] for s in summaries.values() if s["ns_split"]), None)
    if split:
        lines.append(f"NS imbalance (max/mean over NS ranks): whole matrices {split['ns_imbalance_whole']:.3f}, with split NS "
                     f"{split['ns_imbalance_split']:.3f} at optim.ns_split_tolerance: {split['ns_split_tolerance']:g} "
                     f"({split['split_matrices']} matrices split, "
                     f"{human_bytes(split['split_bytes_per_rank_max'])} per rank per step scatter/gather/Gram: NS "
                     f"{split['ns_s_whole'] * 1e3:.1f} -> {split['ns_s_split'] * 1e3:.1f} ms for {split['split_comm_s_max'] * 1e3:.1f} ms "
                     "of collectives; off by default: the ZeRO engine runs it with that setting, DP teams only)")
    gpu = first["memory"]["gpu_bytes"]
    st = first["memory"]["with_activations"]["settings"]
    lines.append(f"memory per rank (worst rank; GPU {human_bytes(gpu)}); activations of micro-batch {st['micro_batch']} x "
                 f"{st['seq_len']} tokens, {st['activation_bytes']}-byte, Korthikanti et al. (lanton_dist.plan.memory), "
                 "without | with activation checkpointing:")
    lines.append(f"{'algorithm':<9} {'params':>9} {'grads':>9} {'buffers':>9} {'state':>9} {'peak+':>9} {'no act.':>9} "
                 f"{'activ.':>9} {'total':>9} {'fits':>4} | {'activ.':>9} {'total':>9} {'fits':>4}")
    for a, s in summaries.items():
        m = s["memory"]
        extra = m["peak"] - m["steady"]
        plain, ckpt = m["with_activations"]["plain"], m["with_activations"]["checkpointed"]
        lines.append(f"{a:<9} {human_bytes(m['parameters']):>9} {human_bytes(m['gradients']):>9} {human_bytes(m['buffers']):>9} "
                     f"{human_bytes(m['state']):>9} {human_bytes(extra):>9} {human_bytes(m['peak']):>9} "
                     f"{human_bytes(plain['activations']):>9} {human_bytes(plain['total']):>9} {_yes(plain['fits']):>4} | "
                     f"{human_bytes(ckpt['activations']):>9} {human_bytes(ckpt['total']):>9} {_yes(ckpt['fits']):>4}")
    return lines


def _yes(fits: bool) -> str:
    return "yes" if fits else "NO"


def candidate_layouts(model: ModelConfig, layout: ParallelLayout) -> list[ParallelLayout]:
    """The other TP × PP splits of ``layout``'s ranks, smallest ``tp·pp`` first (larger TP first
    at equal product: it stays inside a node): TP a power of two up to ``gpus_per_node`` that
    the model splits over (:func:`~lanton_dist.plan.model.check_tp`), PP a divisor of ``n_layers``."""
    out = []
    tp = 1
    while tp <= layout.gpus_per_node:
        try:
            check_tp(model, tp)
        except ValueError:
            tp *= 2
            continue
        for pp in range(1, model.n_layers + 1):
            if model.n_layers % pp == 0 and layout.world % (tp * pp) == 0 and (tp, pp) != (layout.tp, layout.pp):
                out.append(replace(layout, tp=tp, pp=pp))
        tp *= 2
    return sorted(out, key=lambda lay: (lay.tp * lay.pp, -lay.tp))


def smallest_fitting_layout(planner: StepPlanner, act: ActivationSettings) -> dict[str, Any] | None:
    """The first of :func:`candidate_layouts` of ``planner``'s model and ranks where every rank
    holds its memory and activations (:func:`~lanton_dist.plan.memory.fit_with_activations`), with
    that fit; None if none does."""
    for lay in candidate_layouts(planner.model, planner.layout):
        p = StepPlanner(planner.model, lay, planner.optim, planner.hw, name=planner.model_name)
        fit = fit_with_activations(p, act)
        if fit["fits"]:
            return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, **fit}
    return None


def _fit_search(plans: dict[str, StepPlanner], act: ActivationSettings) -> dict[str, dict[str, Any]]:
    """For each algorithm whose run does not fit (without, then with activation checkpointing):
    the smallest TP × PP that does (None: no split of these ranks fits)."""
    out: dict[str, dict[str, Any]] = {}
    for a, p in plans.items():
        for label, settings in (("plain", act), ("checkpointed", replace(act, recompute=True))):
            if not fit_with_activations(p, settings)["fits"]:
                out.setdefault(a, {})[label] = smallest_fitting_layout(p, settings)
    return out


def _fit_search_lines(search: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]], layout: ParallelLayout) -> list[str]:
    """One line per algorithm that does not fit without activation checkpointing, or not with it either."""
    lines = []
    for a, by in search.items():
        fits = summaries[a]["memory"]["with_activations"]
        parts = []
        for label, how in (("plain", "without"), ("checkpointed", "with")):
            if label not in by:
                parts.append(f"{how} activation checkpointing it fits ({human_bytes(fits[label]['total'])})")
            elif by[label] is None:
                parts.append(f"{how} activation checkpointing no TP x PP of these ranks fits (more nodes with zero3/fsdp2/"
                             "deepspeed3, a smaller micro-batch or a larger GPU)")
            else:
                f = by[label]
                parts.append(f"{how} activation checkpointing the smallest TP x PP that fits is TP {f['tp']} x PP {f['pp']} "
                             f"(x DP {f['dp']}, {human_bytes(f['total'])})")
        lines.append(f"WARNING: does not fit: {a} at TP {layout.tp} x PP {layout.pp} on {layout.world} ranks "
                     f"({human_bytes(fits['plain']['total'])} per rank with activations): " + "; ".join(parts))
    return lines


def estimation_growth(layout: ParallelLayout, optim: OptimSettings, hw: Hardware, ks: tuple[int, ...] = (1, 5, 10, 20),
                      models: tuple[str, ...] = tuple(PRESETS), global_batch: int = 1024) -> list[dict[str, Any]]:
    """LANTON's estimation overhead over D-Muon for each preset and k on the same world size.
    TP and PP are those of ``layout`` reduced (halving) until they fit the model."""
    rows = []
    for name in models:
        cfg = PRESETS[name] if name in PRESETS else resolve_model(name)[1]
        tp, pp = layout.tp, layout.pp
        while tp > 1 and any(v % tp for v in (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size)):
            tp //= 2
        while pp > 1 and cfg.n_layers % pp:
            pp //= 2
        try:
            lay = replace(layout, tp=tp, pp=pp)
            planner = StepPlanner(cfg, lay, replace(optim, algorithm="lanton"), hw)
            fwd = planner.fwd_bwd_seconds(global_batch)
            by_k = planner.estimation_overhead(ks)
        except ValueError as exc:
            rows.append({"model": name, "error": str(exc)})
            continue
        for r in by_k:
            r["extra_vs_training"] = r["extra_s_per_step"] / (r["dmuon_step_s"] + fwd)
        rows.append({"model": name, "tp": tp, "pp": pp, "fwd_bwd_s": fwd, "by_k": by_k})
    return rows
