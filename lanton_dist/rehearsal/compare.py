"""Rehearsed ranks beside the planner, and the cross-rank consistency check.

* :func:`planner_for` — the :class:`~lanton_dist.plan.StepPlanner` of the rehearsed setup
  (strategy ``zero2``: what :class:`~lanton_dist.engine.ShardedLANTON` is; device ``cpu``: on
  meta the engine takes its non-CUDA path, the variance all-reduce at the estimation step).
* :func:`sample_ranks` — 0, 1, the most loaded Newton–Schulz owner, a middle rank and the last.
* :func:`compare_rank` — per rank: memory by kind (exact: parameters, gradients, buffers,
  state, Option I's previous gradient, Option II's half buffer; the early owner steps'
  transient is an upper bound in the planner, so measured ≤ planned) and, per step, the
  ordered list of metered collectives against the planner's (op, phase, group size, elements,
  element size, tensor bytes, sent bytes; FSDP2: as multisets, its planner model does not
  give the order of its pipelined exchange buckets). Host milliseconds and construction seconds have no
  planner figure (the planner models device time): reported, not compared.
* :func:`consistency` — a rank's collective sequence restricted to what every rank of a group
  must agree on (step, op, phase, group, group size, element size and, except for
  all-to-alls whose splits are per rank, the element count), compared per process group
  among the sampled ranks of the same group instance (Megatron: a DP group is one (stage, TP
  rank), a TP group one (stage, DP rank), ``world`` everyone): a difference is the bug class
  that hangs NCCL; the first divergent collective is named. :func:`sequence_digest` is the
  digest of a rank's whole sequence, printed per rank. The objects the ranks of one DP group
  gave ``all_gather_object`` are compared the same way (the fake backend cannot).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from lanton_dist.config import RunConfig
from lanton_dist.plan import OptimSettings, ParallelLayout, StepPlanner, human_bytes

#: Record fields compared with the planner (CommRecord minus step and group name).
_KEY = (0, 1, 3, 4, 5, 6, 7)
#: How each memory kind is compared, per planner strategy: ``=`` exactly, ``<=`` the planner's
#: figure is an upper bound, ``model`` not compared (what the planner models is not what runs
#: in the rehearsal: FSDP2's own unsharded-unit buffers, hence its peak).
_MEMORY_RULES: dict[str, dict[str, str]] = {
    "zero2": {"parameters": "=", "gradients": "=", "buffers": "=", "state": "=", "prev_grad": "=", "half_buffer": "=",
              "early_owner_steps": "<=", "peak": "<="},
    "fsdp2": {"parameters": "=", "gradients": "=", "buffers": "model", "state": "=", "prev_grad": "=", "half_buffer": "model",
              "early_owner_steps": "=", "peak": "model"},
}
#: Strategies whose planner model gives the issue order of collectives; the others (FSDP2's
#: pipelined exchange buckets) are compared as multisets per step, as tests/test_plan.py does.
_ORDERED = {"zero2": True, "fsdp2": False}
#: Planner phases of work the rehearsal does not run (FSDP2's own collectives).
_NOT_REHEARSED_PHASES = ("fsdp_",)


def planner_for(cfg: RunConfig, nodes: int, gpus_per_node: int, strategy: str = "zero2") -> StepPlanner:
    """The planner's model of ``strategy`` (``zero2``: the ZeRO engine, also under Megatron with
    the config's TP/PP; ``fsdp2``) for ``cfg`` on ``nodes × gpus_per_node`` ranks; fp32
    parameters (the rehearsed models are built in fp32, as training builds them)."""
    o = cfg.optim
    tp, pp = (cfg.parallel.tp, cfg.parallel.pp) if cfg.parallel.backend == "megatron" else (1, 1)
    layout = ParallelLayout(nodes=nodes, gpus_per_node=gpus_per_node, tp=tp, pp=pp, strategy=strategy,
                            bucket_mb=cfg.parallel.bucket_mb)
    settings = OptimSettings(algorithm=o.name, estimate_every=o.estimate_every, option=o.option,
                             nuclear_estimator=o.nuclear_estimator, ns_steps=o.ns_steps,
                             skip_nonfinite=True, param_bytes=4, device="cpu")
    return StepPlanner(cfg.model, layout, settings)


def sample_ranks(planner: StepPlanner, which: str) -> dict[int, str]:
    """``{rank: why}``: ``all`` ranks, or ``sample``: 0, 1, the most loaded owner (most
    Newton–Schulz FLOPs), the middle rank and the last."""
    world = planner.layout.world
    if which == "all":
        return {r: "" for r in range(world)}
    if which != "sample":
        raise ValueError(f"--ranks must be 'sample' or 'all', got {which!r}")
    loaded = max(range(world), key=lambda r: (_ns_flops(planner, r), -r))
    out: dict[int, str] = {}
    for r, why in ((0, "first"), (1, "second"), (loaded, "most loaded owner"), (world // 2, "middle"), (world - 1, "last")):
        if r < world:
            out[r] = ", ".join(x for x in (out.get(r), why) if x)
    return dict(sorted(out.items()))


def position(planner: StepPlanner, rank: int) -> tuple[int, int, int]:
    """(pipeline stage, DP rank, TP rank) of global ``rank`` in Megatron's order (TP fastest, then DP, then PP)."""
    L = planner.layout
    return rank // (L.tp * L.dp), rank // L.tp % L.dp, rank % L.tp


def _ns_flops(planner: StepPlanner, rank: int) -> int:
    s, d, t = position(planner, rank)
    st = planner.stages[s]
    return st.ownership.flops[planner.ns_rank(st, d, t)]


@dataclass
class RankComparison:
    """One rank's rehearsal beside the planner; ``differences`` empty when they agree."""

    rank: int
    why: str
    memory: dict[str, tuple[int, int]]            # kind → (rehearsed, planned)
    steps: list[dict[str, Any]]                    # per step: count, bytes by phase, both sides
    step_ms: list[float]
    construction_s: float
    skip_vote_reads: list[int]
    differences: list[str] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)   # memory kind → "=", "<=" or "model"


def _memory_ok(rule: str, rehearsed: int, planned: int) -> bool:
    return rule == "model" or (rehearsed <= planned if rule == "<=" else rehearsed == planned)


def _phases(records: list[list[Any]]) -> dict[str, list[int]]:
    """phase → [count, sent bytes]."""
    out: dict[str, list[int]] = {}
    for r in records:
        c = out.setdefault(r[1], [0, 0])
        c[0] += 1
        c[1] += r[7]
    return out


def compare_rank(planner: StepPlanner, result: dict[str, Any], why: str = "") -> RankComparison:
    """``result`` (a :class:`~.driver.RankResult` as JSON) against the planner (module doc)."""
    d = result["rank"]
    where = position(planner, d)
    mem = planner.rank_memory(*where)
    got = result["memory"]
    peak = (got["parameters"] + got["gradients"] + got["buffers"] + got["state"]
            + max(got["buffers_peak_extra"], got["early_peak_extra"]) + got["prev_grad"])
    memory = {"parameters": (got["parameters"], mem.parameters), "gradients": (got["gradients"], mem.gradients),
              "buffers": (got["buffers"], mem.buffers), "state": (got["state"], mem.state),
              "prev_grad": (got["prev_grad"], mem.state_peak_extra),
              "half_buffer": (got["buffers_peak_extra"], mem.buffers_peak_extra),
              "early_owner_steps": (got["early_peak_extra"], mem.early_peak_extra), "peak": (peak, mem.peak)}
    rules = _MEMORY_RULES[planner.layout.strategy]
    out = RankComparison(d, why, memory, [], result["step_ms"], result["construction_s"], result["skip_vote_reads"],
                         rules=rules)
    if tuple(result["position"]) != where:
        out.differences.append(f"rank {d}: (stage, DP rank, TP rank) {tuple(result['position'])} rehearsed vs {where} planned")
    for kind, (a, b) in memory.items():
        if not _memory_ok(rules[kind], a, b):
            out.differences.append(f"rank {d}: {kind} {a} B rehearsed vs {b} B planned"
                                   + (" (planned is an upper bound)" if rules[kind] == "<=" else ""))
    for step, records in enumerate(result["collectives"]):
        planned = [c for c in planner.rank_step(*where, step).collectives if not c.phase.startswith(_NOT_REHEARSED_PHASES)]
        measured_keys = [tuple(r[i] for i in _KEY) for r in records]
        planned_keys = [c.key() for c in planned]
        pl_records = [[c.op, c.phase, c.group, c.group_size, c.numel, c.elem_size, c.tensor_bytes, c.sent_bytes] for c in planned]
        out.steps.append({"step": step, "estimation": planner.optim.estimates(step), "count": (len(records), len(planned)),
                          "phases": {"rehearsed": _phases(records), "planned": _phases(pl_records)}})
        if not _ORDERED[planner.layout.strategy]:
            measured_keys, planned_keys = sorted(measured_keys), sorted(planned_keys)
        if measured_keys != planned_keys:
            i = next((i for i, (a, b) in enumerate(zip(measured_keys, planned_keys)) if a != b),
                     min(len(measured_keys), len(planned_keys)))
            a = measured_keys[i] if i < len(measured_keys) else "nothing"
            b = planned_keys[i] if i < len(planned_keys) else "nothing"
            out.differences.append(f"rank {d} step {step}: collective #{i} is {a} rehearsed vs {b} planned "
                                   f"({len(measured_keys)} vs {len(planned_keys)} collectives)")
    return out


def agreement_keys(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What every rank must issue identically, in order (module doc)."""
    return [(s, r[0], r[1], r[2], r[3], None if r[0] == "all_to_all" else r[4], r[5])
            for s, records in enumerate(result["collectives"]) for r in records]


def sequence_digest(result: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(agreement_keys(result)).encode()).hexdigest()[:16]


def _instance(result: dict[str, Any], group: str) -> tuple[int, ...]:
    """Which instance of ``group`` a rank is in, from its (stage, DP rank, TP rank): ``world``
    is one group; a ``dp`` group is one (stage, TP rank); a ``tp`` group one (stage, DP rank)."""
    s, d, t = result["position"]
    return {"world": (), "dp": (s, t), "tp": (s, d)}.get(group, (s, d, t))


def consistency(results: list[dict[str, Any]]) -> list[str]:
    """Differences between the collective sequences of sampled ranks that share a process
    group (each group's collectives compared among the ranks of the same group instance) and
    between the objects ranks of one data-parallel group gave ``all_gather_object`` (empty:
    consistent). Each names the first divergent collective against the lowest such rank."""
    lanes: dict[tuple[str, tuple[int, ...]], list[tuple[int, list[tuple[Any, ...]]]]] = defaultdict(list)
    objects: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)
    for res in results:
        keys = agreement_keys(res)
        for group in dict.fromkeys(k[3] for k in keys):
            lanes[(group, _instance(res, group))].append((res["rank"], [k for k in keys if k[3] == group]))
        objects[_instance(res, "dp")].append(res)
    problems = []
    for (group, _), ranks in lanes.items():
        ref_rank, ref = ranks[0]
        for rank, keys in ranks[1:]:
            if keys != ref:
                i = next((i for i, (a, b) in enumerate(zip(ref, keys)) if a != b), min(len(ref), len(keys)))
                a = ref[i] if i < len(ref) else "nothing"
                b = keys[i] if i < len(keys) else "nothing"
                problems.append(f"ranks {ref_rank} and {rank} diverge at their {group} collective #{i} "
                                f"(step, op, phase, group, group size, elements, element size): {a} vs {b}")
    for peers in objects.values():
        for res in peers[1:]:
            if res["object_digests"] != peers[0]["object_digests"]:
                problems.append(f"ranks {peers[0]['rank']} and {res['rank']} (one data-parallel group) gave all_gather_object "
                                f"different objects (digests {peers[0]['object_digests']} vs {res['object_digests']})")
    return problems


def _ms(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def _phase_text(phase: str, rehearsed: list[int], planned: list[int]) -> str:
    text = f"{phase} {rehearsed[0]}×/{human_bytes(rehearsed[1])}"
    return text if rehearsed == planned else text + f" [planner {planned[0]}×/{human_bytes(planned[1])}]"


def format_rank(c: RankComparison) -> str:
    """The text block of one rank (rehearsed | planned | verdict)."""
    lines = [f"rank {c.rank}" + (f" ({c.why})" if c.why else "")]
    lines.append(f"  {'memory':<20}{'rehearsed':>14}{'planner':>14}")
    for kind, (a, b) in c.memory.items():
        rule = c.rules[kind]
        verdict = "not compared (planner: a model of work not rehearsed)" if rule == "model" else \
            ("ok" if _memory_ok(rule, a, b) else "DIFFERS") + ("  (planned: upper bound)" if rule == "<=" else "")
        lines.append(f"  {kind:<20}{human_bytes(a):>14}{human_bytes(b):>14}  {verdict}")
    for s in c.steps:
        name = "construction" if s["step"] == 0 else f"step {s['step']}" + (" (estimation)" if s["estimation"] else "")
        a, b = s["count"]
        rp, pp = s["phases"]["rehearsed"], s["phases"]["planned"]
        phases = ", ".join(_phase_text(ph, rp.get(ph, [0, 0]), pp.get(ph, [0, 0])) for ph in sorted(set(rp) | set(pp)))
        lines.append(f"  {name:<22} {a} collectives (planner {b}){': ' + phases if phases else ''}")
    lines.append(f"  optimizer host ms per step: {_ms(c.step_ms)} (planner: not modelled)")
    lines.append(f"  construction: {c.construction_s:.2f} s (planner: not modelled); "
                 f"skip-vote host reads answered per step: {' '.join(map(str, c.skip_vote_reads))}")
    return "\n".join(lines)
