"""The planner: :class:`StepPlanner` puts a model, a layout, the optimizer settings and hardware
together and predicts every rank's collectives, FLOPs, memory and time per step.

Tensor and pipeline parallelism (modelled after lanton_dist.integrations.megatron; not validated)
-----------------------------------------------------------------------------------------------
Megatron rank order (TP fastest, then DP, then PP). Each TP rank holds Megatron's shards of our
LLaMA: ``wq/wk/wv/w_gate/w_up`` and the embedding/head split by rows, ``wo/w_down`` by
columns, norm gains replicated. The data-parallel strategy runs per (stage, TP rank) on the
local shards with the engine's own plan (``plan_ownership(local shards, dp)``, the same on every
TP rank). Whole matrices for Newton–Schulz, with ``tp_mode``:

* ``owner`` (default; the design of the Megatron adapter's ``TensorParallelExchange``): the
  matrices DP rank d owns are planned over its TP group (``plan_ownership(full shapes, tp)``);
  one all-to-all over TP brings every shard to the TP owner (``lmo_gather``, group ``tp``) and
  one returns each TP rank its shard of the result (``lmo_scatter``); the TP owner keeps the
  matrix's momentum and Option I's previous gradient whole, so only Option II's estimation steps
  add ``variance_gather`` (its half-batch difference). Each matrix is orthogonalised once in the job.
* ``duplicated`` (Megatron-LM's ``duplicated`` mode): the owner's TP group all-gathers each owned
  matrix (``lmo_gather``, one all-gather per matrix) and every TP rank runs the same Newton–Schulz.

Pipeline stages hold ``n_layers / pp`` blocks each (the embedding on the first stage, final norm
and head on the last). The tables report the worst stage. With ``tp·pp > 1`` the scalar
all-reduces run over the world (the engine's ``scalar_world=True``): ``finite``, ``norm`` (every
vector parameter of the job) and ``variance`` (2L elements over *all* layers, which also gives the
group-wide max α across stages). The Megatron adapter works on Megatron's fused weights
(``linear_qkv``, ``linear_fc1``), so its byte counts differ from these (unfused) ones by the
fusion's layout only; it has not been compared with this model yet.

Time model
----------
A collective takes ``latency·hops + sent_bytes / (bandwidth·efficiency)`` (hops:
:meth:`Collective.latency_steps`) with the NVLink figure when its group lies inside one node and
the per-GPU network figure otherwise.
Newton–Schulz runs at ``matmul_tflops · ns_efficiency`` (spec table: NS5 at 74–81% of the
733–777 TFLOP/s bf16 matmul rate of one H100, so 750 · 0.75); elementwise optimizer work is
HBM-bound (:data:`ELEMENTWISE_ACCESSES` tensor reads+writes per owned element). Nothing is
assumed to overlap: this is the step as :class:`~lanton_dist.engine.ShardedLANTON` runs it
(reduce-scatter in ``step()``, not under backward). Nuclear-norm estimators: ``ns`` costs
``newton_schulz_flops(m, n, 6, refine)`` at the NS rate (Gram start, 6 Polar Express steps and
1 cubic step, as :data:`lanton_dist.nuclear.NS_ESTIMATE`), ``rsvd`` ``(2 + 4q)·m·n·r + (q+1)·4·l·r²`` FLOPs at the fp32 rate,
``exact`` (svdvals) ``4·l·s² + 8·s³`` FLOPs at :attr:`Hardware.svd_tflops`, calibrated on the
spec's 1.0–1.35 s for one 4096×11008 matrix. ``fwd+bwd`` is ``6·N·tokens/world`` at
``matmul_tflops · mfu`` (attention FLOPs and pipeline bubbles ignored) and only serves to put
the optimizer in proportion.

How the estimation overhead grows (the paper gives one number: +4% over D-Muon at k = 10)
---------------------------------------------------------------------------------------
Per estimation step a rank runs one estimator per owned matrix: with ``ns`` that is
(5 quintic + 3 cubic)/(5 quintic) ≈ 1.4–1.5 Newton–Schulz calls, so amortised the estimation
adds ≈ 1.45/k of the LMO's Newton–Schulz time, plus the tiny ``variance`` all-reduce and (Option
II) one more gradient reduce-scatter per k steps. Newton–Schulz time per rank scales as
``Σ s²·l ∝ d³·n_layers / ranks`` and fwd+bwd as ``d²·n_layers·tokens / ranks``, so the
estimation overhead *relative to the training step* grows linearly with the width ``d`` at a
fixed token batch and falls as 1/k; :meth:`StepPlanner.estimation_overhead` and the
``lanton-dist plan`` table give the numbers.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, replace
from functools import cached_property, lru_cache
from typing import Any

from lanton_dist.config import ModelConfig
from lanton_dist.engine.layout import build_layout
from lanton_dist.engine.meter import SCALAR_PHASES
from lanton_dist.engine.ownership import OwnershipPlan, ns_cost, plan_ownership
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.newton_schulz import ESTIMATE_STEPS, newton_schulz_flops
from lanton_dist.plan.inputs import Hardware, OptimSettings, ParallelLayout
from lanton_dist.plan.model import check_tp, engine_order, llama_specs, local_spec, resolve_model, stage_specs
from lanton_dist.plan.memory import RankMemory, rank_memory
from lanton_dist.plan.predictions import STRATEGY_MODELS, Collective, RankStep, StagePlan
from lanton_dist.plan.splitns import SplitPlan, batch_collectives, plan_split, split_batches

#: Tensor reads + writes per owned element of one step's elementwise work (momentum/moments,
#: gradient, parameter), per algorithm and geometry: LANTON/Scion read G, read+write B, read
#: O, read+write W (6); AdamW reads G, read+writes m, v and W (7).
ELEMENTWISE_ACCESSES: dict[str, dict[str, int]] = {
    "lanton": {"hidden": 6, "embed_head": 6, "vector": 6},
    "scion": {"hidden": 6, "embed_head": 6, "vector": 6},
    "dmuon": {"hidden": 6, "embed_head": 7, "vector": 7},
    "adamw": {"hidden": 7, "embed_head": 7, "vector": 7},
}
#: Optimizer state tensors per element (same dtype as the parameters), per algorithm/geometry.
STATE_TENSORS: dict[str, dict[str, int]] = {
    "lanton": {"hidden": 1, "embed_head": 1, "vector": 1},
    "scion": {"hidden": 1, "embed_head": 1, "vector": 1},
    "dmuon": {"hidden": 1, "embed_head": 2, "vector": 2},
    "adamw": {"hidden": 2, "embed_head": 2, "vector": 2},
}



def estimator_flops(m: int, n: int, optim: OptimSettings) -> int:
    """FLOPs of one nuclear-norm estimate of an ``m × n`` matrix (module doc, "Time model"); for
    ``ns`` exactly the Newton–Schulz kernel's (6 Polar Express + ``refine`` cubic steps, as
    :func:`lanton_dist.nuclear.nuclear_norm` calls it; the final ⟨D, polar⟩ is not counted)."""
    s, l = min(m, n), max(m, n)
    if optim.nuclear_estimator == "ns":
        return newton_schulz_flops(m, n, ESTIMATE_STEPS, optim.refine)
    if optim.nuclear_estimator == "rsvd":
        r, q = min(optim.rsvd_rank, s), optim.rsvd_power_iters
        return (2 + 4 * q) * m * n * r + (q + 1) * 4 * l * r * r + 4 * n * r * r
    return 4 * l * s * s + 8 * s**3


def estimator_seconds(flops: int, optim: OptimSettings, hw: Hardware) -> float:
    rate = {"ns": hw.ns_flops_per_s, "rsvd": hw.fp32_tflops * 1e12, "exact": hw.svd_tflops * 1e12}[optim.nuclear_estimator]
    return flops / rate


def block_estimator_flops(spec: ParamSpec, optim: OptimSettings) -> int:
    return sum(estimator_flops(b.d_out, spec.d_in, optim) for b in spec.blocks)


class StepPlanner:
    """Predictions for one (model, layout, optimizer, hardware); see :mod:`lanton_dist.plan` and this module.

    Args:
        model: preset name, YAML path or :class:`ModelConfig`.
        layout: :class:`ParallelLayout`.
        optim: :class:`OptimSettings`.
        hardware: :class:`Hardware` (default: H100).
        specs: override the parameter list (must be model-ordered; used by tests and adapters).
        name: the model's display name (default: the preset/YAML name, or "custom").
    """

    def __init__(self, model: str | ModelConfig, layout: ParallelLayout, optim: OptimSettings,
                 hardware: Hardware | None = None, specs: list[ParamSpec] | None = None, name: str | None = None) -> None:
        self.model_name, self.model = resolve_model(model)
        self.model_name = name or self.model_name
        self.layout, self.optim, self.hw = layout, optim, hardware or Hardware()
        if layout.strategy not in STRATEGY_MODELS:
            raise ValueError(f"no model for strategy {layout.strategy!r}; registered: {sorted(STRATEGY_MODELS)}")
        self.strategy = STRATEGY_MODELS[layout.strategy]
        if layout.zero_layout == "plain" and optim.algorithm != "adamw":
            raise ValueError("zero_layout='plain' has no matrix owners: only algorithm='adamw' can use it")
        if layout.tp > 1:
            check_tp(self.model, layout.tp)
        self.specs = specs if specs is not None else llama_specs(self.model)
        self.n_layers_total = sum(len(s.blocks) for s in self.specs)
        self.n_vector_total = sum(1 for s in self.specs if s.geometry is Geometry.VECTOR)
        self.bucket_numel = int(layout.bucket_mb * 2**20 / optim.param_bytes)
        self._seconds: dict[Collective, float] = {}     # collective_seconds of each distinct collective

    # ------------------------------------------------------------------ structure
    @cached_property
    def stages(self) -> list[StagePlan]:
        return _build_stages(tuple(self.specs), self.model.n_layers, self.layout, self.optim.ns_steps, self.bucket_numel)

    # ------------------------------------------------------------------ per rank
    def ns_rank(self, stage: StagePlan, d: int, t: int) -> int:
        """Index into ``stage.ownership`` of the NS work rank (d, t) does."""
        L = self.layout
        if L.strategy == "ddp":
            return t if L.tp_mode == "owner" else 0
        return d * L.tp + t if (L.tp_mode == "owner" and L.tp > 1) else d

    def rank_step(self, stage: int, d: int, t: int, step: int) -> RankStep:
        """Prediction for DP rank ``d``, TP rank ``t`` of pipeline stage ``stage`` at ``step`` (1-based; 0 = construction)."""
        st = self.stages[stage]
        colls = self.strategy.collectives(self, st, d, t, step)
        if step >= 1 and self.layout.tp > 1 and self.optim.uses_ns:
            colls = colls + self._tp_exchange(st, d, t, step)
        q = self.ns_rank(st, d, t)
        ns = st.ownership.flops[q] if (self.optim.uses_ns and step >= 1) else 0
        est = self._estimator_flops(st, q) if self.optim.estimator_runs(step) else 0
        return RankStep(stage, d, t, step, colls, ns, est, self._owned(st, d, t))

    def _estimator_flops(self, st: StagePlan, q: int) -> int:
        o = self.optim
        key = ("estimator", o.nuclear_estimator, o.ns_steps, o.refine, o.rsvd_rank, o.rsvd_power_iters)

        def per_rank() -> list[int]:
            out = [0] * st.ns_ranks
            for s in st.hidden:
                out[st.ownership.owner[s.name]] += block_estimator_flops(s, o)
            return out

        return st.memo(key, per_rank)[q]

    def _tp_exchange(self, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
        """TP collectives bringing whole hidden matrices to where NS runs (module doc), as the
        Megatron adapter's ``TensorParallelExchange`` issues them: one all-to-all over TP for each
        ``gather``/``scatter`` call of the core (``lmo_gather``/``lmo_scatter`` every step,
        ``variance_gather`` every Option II estimation step)."""
        L, E = self.layout, self.optim.param_bytes
        T = L.tp
        mine_dp = self._mine_dp(st, d)
        out: list[Collective] = []
        estimating = self.optim.estimates(step)
        if L.tp_mode == "owner":
            send, self_part, owned_full = st.memo(("tp_sums", d, t), lambda: self._tp_sums(st, d, t))
            if estimating and self.optim.option == "II":
                out.append(Collective("all_to_all", "variance_gather", "tp", T, send, E, self_part))
            out.append(Collective("all_to_all", "lmo_gather", "tp", T, send, E, self_part))
            out.append(Collective("all_to_all", "lmo_scatter", "tp", T, owned_full, E, self_part))
        else:
            for phase in (["variance_gather"] if self.optim.estimator_runs(step) else []) + ["lmo_gather"]:
                out += [Collective("all_gather", phase, "tp", T, s.numel, E) for s in mine_dp]
        return out

    def _mine_dp(self, st: StagePlan, d: int) -> list[ParamSpec]:
        """The hidden matrices DP rank ``d``'s TP group runs Newton–Schulz for (all of them under ``ddp``)."""
        def build() -> list[list[ParamSpec]]:
            if self.layout.strategy == "ddp":
                return [st.hidden] * self.layout.dp
            out: list[list[ParamSpec]] = [[] for _ in range(self.layout.dp)]
            for s in st.hidden:
                out[st.dp_plan.owner[s.name]].append(s)
            return out
        return st.memo(("tp_mine", self.layout.strategy), build)[d]

    def _tp_sums(self, st: StagePlan, d: int, t: int) -> tuple[int, int, int]:
        """Owner mode, TP rank ``t`` of DP rank ``d``: elements of its shards of every matrix its
        DP rank owns, of those it runs Newton–Schulz for, and of the whole results it sends back."""
        T = self.layout.tp
        mine_dp = self._mine_dp(st, d)
        base = 0 if self.layout.strategy == "ddp" else d * T
        mine = [s for s in mine_dp if st.ownership.owner[s.name] - base == t]
        return sum(s.numel // T for s in mine_dp), sum(s.numel // T for s in mine), sum(s.numel for s in mine)

    def ranks(self) -> Iterable[tuple[int, int, int]]:
        for s in range(self.layout.pp):
            for d in range(self.layout.dp):
                for t in range(self.layout.tp):
                    yield s, d, t

    @cached_property
    def rank_classes(self) -> list[tuple[tuple[int, int, int], int]]:
        """``((stage, d, t), members)`` per class of ranks that predict alike — the same multiset
        of collectives at every step (the strategy's ``rank_class``), NS and estimator FLOPs,
        TP exchange, owned elements per geometry, TP rank — with its first member in
        :meth:`ranks` order as the representative, in that order. Summaries over ranks (maxima,
        means, the worst rank) visit one rank per class: at 1,024 ranks a handful of classes,
        not 1,024 ranks of hundreds of collectives each."""
        return [(rep, n) for rep, n, _ in self._classes]

    @cached_property
    def _classes(self) -> list[list[Any]]:
        """``[first member, members, last member]`` per rank class, in :meth:`ranks` order."""
        classes: dict[Any, list[Any]] = {}
        for s, d, t in self.ranks():
            key = self.rank_class_of(s, d, t)
            entry = classes.get(key)
            if entry is None:
                classes[key] = [(s, d, t), 1, (s, d, t)]
            else:
                entry[1] += 1
                entry[2] = (s, d, t)
        return list(classes.values())

    def rank_class_of(self, stage: int, d: int, t: int) -> Any:
        """The class key of DP rank ``d``, TP rank ``t`` of ``stage`` (:attr:`rank_classes`)."""
        st = self.stages[stage]
        q = self.ns_rank(st, d, t)
        by_class = self.strategy.rank_class
        return (stage, t, by_class(self, st, d, t) if by_class else d, st.ownership.flops[q], self._estimator_flops(st, q),
                self._tp_key(st, d, t), tuple(sorted(self._owned(st, d, t).items())))

    def _owned(self, st: StagePlan, d: int, t: int) -> dict[str, int]:
        """Elements (``d``, ``t``) updates per geometry (the strategy's ``owned``; per algorithm family)."""
        return st.memo(("owned", self.layout.strategy, self.optim.uses_ns, d, t), lambda: self.strategy.owned(self, st, d, t))

    def _tp_key(self, st: StagePlan, d: int, t: int) -> tuple[int, ...]:
        """What :meth:`_tp_exchange` of (``d``, ``t``) depends on besides the step: the owner
        mode's three sums, or the duplicated mode's gathered matrix sizes."""
        L = self.layout
        if L.tp == 1 or not self.optim.uses_ns:
            return ()
        if L.tp_mode == "owner":
            return st.memo(("tp_sums", d, t), lambda: self._tp_sums(st, d, t))
        return tuple(sorted(s.numel for s in self._mine_dp(st, d)))

    # ------------------------------------------------------------------ time and memory
    def collective_seconds(self, c: Collective) -> float:
        t = self._seconds.get(c)
        if t is None:
            intra = self.layout.intra_node(c.group)
            bw = (self.hw.intra_gbps if intra else self.hw.inter_gbps) * 1e9 * self.hw.comm_efficiency
            lat = (self.hw.intra_latency_us if intra else self.hw.inter_latency_us) * 1e-6
            t = self._seconds[c] = c.latency_steps() * lat + c.sent_bytes / bw
        return t

    def state_bytes(self, owned: dict[str, int], stage: StagePlan) -> tuple[int, int]:
        """(steady optimizer-state bytes, peak extra) of a rank owning ``owned`` elements per
        geometry. Peak extra: Option I keeps the previous gradient on the step before each
        estimation; Option II holds a stashed half-batch gradient of the local model."""
        a, E = self.optim.algorithm, self.optim.param_bytes
        steady = sum(n * STATE_TENSORS[a][g] * E for g, n in owned.items())
        steady += 2 * self.n_layers_total * self.optim.scalar_bytes      # the core's H and F (replicated, every algorithm)
        extra = 0
        if a == "lanton":
            extra = sum(owned.values()) * E if self.optim.option == "I" else sum(s.numel for s in stage.local) * E
        return steady, extra

    def rank_memory(self, stage: int, d: int, t: int) -> RankMemory:
        """Bytes DP rank ``d``, TP rank ``t`` of pipeline stage ``stage`` holds (:mod:`lanton_dist.plan.memory`)."""
        st = self.stages[stage]
        return st.memo(("memory", self.layout.strategy, self.optim, d, t), lambda: rank_memory(self, st, d, t))

    def memory_summary(self) -> dict[str, Any]:
        """The rank with the largest peak memory (the last such rank): its components, and whether
        it fits the GPU. One rank per class: its last member, as every member holds the same."""
        worst = max(((self.rank_memory(*last), last) for _, _, last in self._classes), key=lambda x: (x[0].peak, x[1]))
        m, (s, d, t) = worst
        return asdict(m) | {"stage": s, "dp_rank": d, "tp_rank": t, "steady": m.steady, "peak": m.peak,
                            "gpu_bytes": self.hw.memory_bytes, "fits": m.peak <= self.hw.memory_bytes}

    def split_plan(self, stage: int) -> SplitPlan:
        """NS of stage ``stage`` with large matrices split over teams (:mod:`lanton_dist.plan.splitns`)."""
        st, L = self.stages[stage], self.layout
        group = L.tp if (L.tp > 1 and L.tp_mode == "owner") else 1
        o = self.optim
        return st.memo(("split", o.ns_steps, o.ns_split_tolerance),
                       lambda: plan_split(st.hidden, st.ownership, o.ns_steps, group, o.ns_split_tolerance))

    def split_summary(self) -> dict[str, Any]:
        """NS imbalance (max/mean per-rank NS FLOPs over every rank of every stage) of the
        whole-matrix plan and with split NS; the number of split matrices and the split's bytes per rank
        (max, per step: :func:`~lanton_dist.plan.splitns.split_collectives`, in the NS dtype; one pass over the batches)."""
        whole, split, n_split, sent, comm_t = [], [], 0, 0, 0.0
        E = self.optim.ns_bytes
        for s, st in enumerate(self.stages):
            plan = self.split_plan(s)
            whole += list(plan.whole_flops)
            split += list(plan.flops)
            n_split += len(plan.teams)
            per_rank: dict[int, list[Collective]] = defaultdict(list)   # ranks in no team issue nothing
            for batch in split_batches(plan, st.hidden):
                for q in batch.ranks:
                    per_rank[q] += batch_collectives(batch, q, self.optim.ns_steps, E)
            for colls in per_rank.values():
                sent = max(sent, sum(c.sent_bytes for c in colls))
                comm_t = max(comm_t, sum(self.collective_seconds(c) for c in colls))
        mean = sum(whole) / len(whole) if whole else 0
        return {"ns_imbalance_whole": max(whole) / mean if mean else 1.0, "ns_imbalance_split": max(split) / mean if mean else 1.0,
                "ns_split_tolerance": self.optim.ns_split_tolerance,
                "split_matrices": n_split,
                "split_bytes_per_rank_max": sent, "ns_flops_max_split": max(split) if split else 0,
                "ns_s_whole": max(whole, default=0) / self.hw.ns_flops_per_s, "ns_s_split": max(split, default=0) / self.hw.ns_flops_per_s,
                "split_comm_s_max": comm_t}

    def layout_summary(self) -> list[dict[str, Any]]:
        """Per stage: buckets, padding and the bucket cap of the engine layout (zero strategies)."""
        out = []
        for st in self.stages:
            lay = st.layout
            if lay is None:
                continue
            out.append({"stage": st.index, "buckets": len(lay.buckets), "numel": lay.numel, "padding": lay.padding,
                        "padding_fraction": lay.padding_fraction, "max_bucket_numel": lay.max_bucket_numel,
                        "cap": lay.cap, "cap_honoured": lay.cap_honoured})
        return out

    def step_summary(self, step: int) -> dict[str, Any]:
        """Per-step figures over all ranks: bytes per phase (max over ranks), collective counts,
        NS/estimator FLOPs (max and mean), state memory (max), times (worst rank), and every
        collective of the rank with the longest communication time (``worst_rank``)."""
        opt, hw = self.optim, self.hw
        phase_bytes: dict[str, int] = defaultdict(int)
        phase_time: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        ns_max, ns_sum, ranks, est, state, peak, comm_t, elem_t = 0, 0, 0, 0, 0, 0, 0.0, 0.0
        worst: tuple[float, RankStep | None] = (-1.0, None)
        for (s, d, t), members in self.rank_classes:
            rs = self.rank_step(s, d, t, step)
            st = self.stages[s]
            by_phase: dict[str, int] = defaultdict(int)
            times: dict[str, float] = defaultdict(float)
            n_by: dict[str, int] = defaultdict(int)
            for c in rs.collectives:
                by_phase[c.phase] += c.sent_bytes
                times[c.phase] += self.collective_seconds(c)
                n_by[c.phase] += 1
            for p, v in by_phase.items():
                phase_bytes[p] = max(phase_bytes[p], v)
                phase_time[p] = max(phase_time[p], times[p])
                counts[p] = max(counts[p], n_by[p])
            comm_t = max(comm_t, sum(times.values()))
            if sum(times.values()) > worst[0]:
                worst = (sum(times.values()), rs)
            ns_max, ns_sum, ranks = max(ns_max, rs.ns_flops), ns_sum + members * rs.ns_flops, ranks + members
            est = max(est, rs.estimator_flops)
            sb, pk = self.state_bytes(rs.owned, st)
            state, peak = max(state, sb), max(peak, pk)
            acc = ELEMENTWISE_ACCESSES[opt.algorithm]
            elem_t = max(elem_t, sum(n * acc[g] * opt.param_bytes for g, n in rs.owned.items()) / (hw.hbm_gbps * 1e9))
        ns_t = ns_max / hw.ns_flops_per_s
        est_t = estimator_seconds(est, opt, hw)
        tensor = {p: v for p, v in phase_bytes.items() if p not in SCALAR_PHASES}
        return {
            "step": step, "estimation": opt.estimates(step),
            "bytes_per_phase": dict(phase_bytes), "collectives_per_phase": dict(counts),
            "tensor_bytes": sum(tensor.values()), "scalar_bytes": sum(v for p, v in phase_bytes.items() if p in SCALAR_PHASES),
            "ns_flops_max": ns_max, "ns_flops_mean": ns_sum / ranks,
            "ns_imbalance": (ns_max / (ns_sum / ranks)) if ns_sum else 1.0,
            "estimator_flops_max": est,
            "state_bytes_max": state, "state_peak_extra_bytes_max": peak,
            "worst_rank": None if worst[1] is None else {
                "stage": worst[1].stage, "dp_rank": worst[1].dp_rank, "tp_rank": worst[1].tp_rank,
                "collectives": [vars(c) | {"sent_bytes": c.sent_bytes, "seconds": self.collective_seconds(c)}
                                for c in worst[1].collectives]},
            "time_s": {"comm": comm_t, "comm_per_phase": dict(phase_time), "ns": ns_t, "estimator": est_t,
                       "elementwise": elem_t, "total": comm_t + ns_t + est_t + elem_t},
        }

    def representative_steps(self) -> tuple[int, int, int]:
        """``(plain, est, after)``: a step that neither estimates nor follows an estimation, an
        estimation step, and the step after it (which carries a deferred variance all-reduce)."""
        k = self.optim.estimate_every
        if k == 1:
            return 2, 2, 3
        return k - 1, k, k + 1

    def same_collectives(self, a: int, b: int) -> bool:
        """Whether steps ``a`` and ``b`` issue the same collectives and FLOPs on every rank (one per class)."""
        for (s, d, t), _ in self.rank_classes:
            x, y = self.rank_step(s, d, t, a), self.rank_step(s, d, t, b)
            if [c.key() for c in x.collectives] != [c.key() for c in y.collectives] or \
                    (x.ns_flops, x.estimator_flops) != (y.ns_flops, y.estimator_flops):
                return False
        return True

    def cycle_mean(self, totals: tuple[float, float, float]) -> float:
        """Mean over one estimation cycle of k steps from the ``(plain, est, after)`` totals."""
        k = self.optim.estimate_every
        if self.optim.algorithm != "lanton":
            return totals[0]
        if k == 1:
            return totals[1]
        return (totals[1] + totals[2] + (k - 2) * totals[0]) / k

    def summary(self, global_batch: int = 1024, seq_len: int | None = None) -> dict[str, Any]:
        """The plan: a plain step, an estimation step and the step after it (LANTON), their mean
        over an estimation cycle, model facts, and the fwd+bwd yardstick for ``global_batch ×
        seq_len`` tokens."""
        plain, est, after = self.representative_steps()
        lanton = self.optim.algorithm == "lanton"
        a = self.step_summary(plain)
        b = self.step_summary(est) if lanton else None
        c = self.step_summary(after) if lanton and after != plain and not self.same_collectives(plain, after) else None
        amort = self.cycle_mean((a["time_s"]["total"], (b or a)["time_s"]["total"], (c or a)["time_s"]["total"]))
        n_params = sum(s.numel for s in self.specs)
        seq = seq_len or self.model.max_seq_len
        return {
            "model": self.model_name, "model_config": asdict(self.model), "params": n_params,
            "hidden_matrices": sum(len(s.blocks) for s in self.specs if s.geometry is Geometry.HIDDEN),
            "ns_flops_total": sum(ns_cost(s, self.optim.ns_steps) for s in self.specs) if self.optim.uses_ns else 0,
            "layout": asdict(self.layout) | {"world": self.layout.world, "dp": self.layout.dp},
            "optim": asdict(self.optim), "hardware": asdict(self.hw),
            "strategy_validated_by": self.strategy.validated_by if self.layout.tp * self.layout.pp == 1 else None,
            "padding": [st.layout.padding if st.layout else 0 for st in self.stages],
            "layout_stats": self.layout_summary(), "memory": self.memory_summary(),
            "ns_split": self.split_summary() if self.optim.uses_ns else None,
            "step": a, "estimation_step": b, "after_estimation_step": c,
            "amortized_step_s": amort, "fwd_bwd_s": self.fwd_bwd_seconds(global_batch, seq), "tokens_per_step": global_batch * seq,
        }

    def fwd_bwd_seconds(self, global_batch: int = 1024, seq_len: int | None = None) -> float:
        """``6·N·tokens / world`` FLOPs at ``matmul_tflops·mfu`` (module doc): a yardstick only."""
        n_params = sum(s.numel for s in self.specs)
        tokens = global_batch * (seq_len or self.model.max_seq_len)
        return 6 * n_params * tokens / self.layout.world / (self.hw.matmul_tflops * 1e12 * self.hw.mfu)

    def estimation_overhead(self, ks: Iterable[int] = (1, 5, 10, 20)) -> list[dict[str, Any]]:
        """LANTON's extra time over D-Muon per step, amortised over k, for each ``k``: estimation
        step extra (estimator, variance all-reduce, Option II's second reduce-scatter, TP
        gathers) and the LANTON-vs-D-Muon difference of plain steps (the ``norm`` all-reduce)."""
        rows = []
        dm = StepPlanner(self.model, self.layout, replace(self.optim, algorithm="dmuon"), self.hw, self.specs)
        dm_t = dm.step_summary(1)["time_s"]["total"]
        for k in ks:
            p = StepPlanner(self.model, self.layout, replace(self.optim, algorithm="lanton", estimate_every=k), self.hw, self.specs)
            plain, est, after = p.representative_steps()
            t_plain = p.step_summary(plain)["time_s"]["total"] if k > 1 else None
            t_est = p.step_summary(est)["time_s"]["total"]
            if k == 1:
                t_after = t_est
            elif p.same_collectives(plain, after):
                t_after = t_plain
            else:
                t_after = p.step_summary(after)["time_s"]["total"]
            mean = p.cycle_mean((t_plain if t_plain is not None else t_est, t_est, t_after))
            rows.append({"k": k, "dmuon_step_s": dm_t, "lanton_plain_step_s": t_plain, "lanton_estimation_step_s": t_est,
                         "lanton_after_estimation_step_s": t_after,
                         "lanton_mean_step_s": mean, "extra_s_per_step": mean - dm_t,
                         "extra_vs_dmuon": (mean - dm_t) / dm_t if dm_t else math.inf})
        return rows


@lru_cache(maxsize=64)
def _build_stages(specs: tuple[ParamSpec, ...], n_layers: int, L: ParallelLayout, ns_steps: int, bucket_numel: int) -> list[StagePlan]:
    """Stages with ownership and layout; cached, as they do not depend on the algorithm or k."""
    out = []
    for i, full in enumerate(stage_specs(list(specs), n_layers, L.pp) if L.pp > 1 else [list(specs)]):
        local = [local_spec(s, L.tp) for s in full]
        if L.strategy == "ddp":
            ns_ranks = L.tp if L.tp_mode == "owner" else 1
            ownership = plan_ownership(full, ns_ranks, ns_steps, balance_numel=False)
            dp_plan = OwnershipPlan(1, {n: 0 for n in ownership.owner}, (sum(ownership.flops),), (0,))
        else:
            dp_plan = plan_ownership(local, L.dp, ns_steps)   # the engine's plan, on TP-local shapes
            ns_ranks = L.dp * L.tp if (L.tp > 1 and L.tp_mode == "owner") else L.dp
            ownership = dp_plan if L.tp == 1 else _tp_plan(full, dp_plan, L.dp, L.tp if L.tp_mode == "owner" else 1, ns_steps)
        layout = None
        if L.strategy in ("zero1", "zero2", "zero3"):
            layout = build_layout(engine_order(local), None if L.zero_layout == "plain" else dp_plan, L.dp, bucket_numel)
        out.append(StagePlan(i, full, local, ownership, dp_plan, layout, ns_ranks))
    return out


def _tp_plan(full: list[ParamSpec], dp_plan: OwnershipPlan, dp: int, tp: int, ns_steps: int) -> OwnershipPlan:
    """Where each whole matrix's Newton–Schulz runs with TP: the matrices DP rank d owns are
    planned over its ``tp`` TP ranks (``plan_ownership``, as the Megatron adapter's
    ``TensorParallelExchange`` does); rank index ``q = d·tp + t``. ``tp=1`` (duplicated mode):
    every TP rank of d runs all of d's matrices, costed at their full shapes."""
    owner: dict[str, int] = {}
    flops, numel = [0] * (dp * tp), [0] * (dp * tp)
    hidden = [s for s in full if s.geometry is Geometry.HIDDEN]
    for d in range(dp):
        sub = plan_ownership([s for s in hidden if dp_plan.owner[s.name] == d], tp, ns_steps, balance_numel=False)
        for n, t in sub.owner.items():
            owner[n] = d * tp + t
        for t in range(tp):
            flops[d * tp + t], numel[d * tp + t] = sub.flops[t], sub.numel[t]
    return OwnershipPlan(dp * tp, owner, tuple(flops), tuple(numel))

