"""Analytic model of one optimizer step of LANTON, Scion, D-Muon and AdamW on LLaMA models.

For a model (a preset, a ``configs/*.yaml`` model section or custom dims) and a parallel
layout (nodes × GPUs per node, tensor parallel ``tp``, pipeline parallel ``pp``, data
parallel ``dp = world / (tp·pp)``, and a data-parallel *strategy*), :class:`StepPlanner`
predicts, per rank and per step:

* every collective the step issues — op, phase, group, element count and the bytes this rank
  sends (:class:`Collective`, the planner's twin of :class:`~lanton_dist.engine.meter.CommRecord`,
  using the meter's own :func:`~lanton_dist.engine.meter.sent_bytes`);
* Newton–Schulz FLOPs (the LMO of the hidden matrices this rank owns) and, on estimation
  steps, the nuclear-norm estimator's FLOPs;
* optimizer-state memory;
* the time these imply on given hardware (:class:`Hardware`).

The plan is *not* re-implemented: owners come from
:func:`lanton_dist.engine.ownership.plan_ownership` and the bucket layout (segments, padding)
from :func:`lanton_dist.engine.layout.build_layout`, called with exactly the arguments the
engine uses. The model's parameters come from :func:`llama_specs`, which reproduces
:func:`lanton_dist.groups.classify_parameters` of :class:`lanton_dist.model.Transformer`
(names, order, shapes, geometry) without building the model (a 70B model need not fit).

Strategies (:data:`STRATEGIES`; ``validated_by`` says what each model was checked against)
------------------------------------------------------------------------------------------
``zero1`` / ``zero2``  :class:`~lanton_dist.engine.ShardedLANTON` (owner-aligned ZeRO): per step
    one reduce-scatter per bucket (``grad_reduce``), the scalar all-reduces ``finite`` (1
    element), ``variance`` (2L elements, estimation steps), ``norm`` (one element per vector
    parameter, LANTON/Scion), Option II's ``grad_reduce_half`` (estimation steps), one
    all-gather per bucket (``param_gather``). ZeRO-1 and ZeRO-2 move the same bytes (they differ
    in gradient memory only). **Validated**: equal, integer for integer, to the engine's
    :class:`~lanton_dist.engine.meter.CommMeter` at world sizes 2–4 (``tests/test_plan.py``).
``zero3``  owner-aligned ZeRO-3 (modelled, not validated): as ``zero2`` but parameters stay
    sharded; the all-gather runs before forward and again before backward
    (``param_gather_fwd``/``param_gather_bwd``) instead of after the step.
``fsdp2``  FSDP2 + :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2`: parameters sharded on
    dim 0 in ``⌈d0/dp⌉``-row chunks (``torch.chunk`` rule). The optimizer's traffic — the
    bucketed all-to-alls of hidden matrices to their owners (``lmo_gather``: each rank sends its
    rows of every matrix another rank owns) and back (``lmo_scatter``: each owner sends every
    rank its rows of the result), on estimation steps the all-to-all of gradient differences
    (``variance_gather``), and the scalars, with the variance all-reduce deferred to the next
    step (``defer_variance``) — is **validated**: the same multiset of collectives per rank and
    step as the adapter's meter, world 3 (``tests/test_plan.py``). FSDP2's own collectives
    (``fsdp_*`` phases; not metered) are modelled: one unit per transformer block plus the root
    (embedding, final norm, head), an all-gather per unit before forward and before backward
    (the root only before forward), a reduce-scatter per unit, all padded to ``⌈d0/dp⌉·dp`` rows.
``deepspeed`` / ``deepspeed3``  DeepSpeed ZeRO-1/2 and ZeRO-3 +
    :class:`~lanton_dist.integrations.deepspeed.LANTONDeepSpeed`: the same piece exchange
    (:func:`piece_exchange_collectives`) over DeepSpeed's partitions (:func:`deepspeed_ranges`:
    ZeRO-1/2 flat groups padded to ``2·dp`` and cut in ``dp``; ZeRO-3 ``⌈numel/dp⌉`` per
    parameter) in DeepSpeed's fp32 master dtype. **Validated**: partitions equal those the adapter
    reads from DeepSpeed, and collectives and NS FLOPs equal its meter and the counted calls, ZeRO-2
    and ZeRO-3 at world 3 (``tests/test_plan.py``). DeepSpeed's own collectives (``ds_*``) are
    modelled: ZeRO-1/2 a reduce-scatter and an all-gather of each padded flat group, ZeRO-3 per
    parameter a gather before forward and backward and a reduce-scatter.
``ddp``  replicated optimizer (modelled, not validated): one all-reduce per DDP bucket (whole
    tensors, reverse order, ``bucket_mb``) and every DP rank runs every Newton–Schulz and nuclear
    norm (the redundant scheme the spec measures at a third of a 1B model's fwd+bwd).

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
  one returns each TP rank its shard of the result (``lmo_scatter``); every estimation step adds
  ``variance_gather`` (empty when Option I has no previous gradient yet). Each matrix is
  orthogonalised once in the job.
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
``newton_schulz_flops(m, n, 5, refine)`` at the NS rate (3 refinement steps on GPU, as
:mod:`lanton_dist.nuclear`), ``rsvd`` ``(2 + 4q)·m·n·r + (q+1)·4·l·r²`` FLOPs at the fp32 rate,
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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from lanton_dist.config import ModelConfig, check_model_config, from_dict, load_yaml
from lanton_dist.engine.layout import Layout, build_layout
from lanton_dist.engine.meter import sent_bytes
from lanton_dist.engine.ownership import OwnershipPlan, ns_cost, plan_ownership
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.newton_schulz import DEFAULT_STEPS, newton_schulz_flops

ALGORITHMS: tuple[str, ...] = ("lanton", "scion", "dmuon", "adamw")
STRATEGIES: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "deepspeed", "deepspeed3")
TP_MODES: tuple[str, ...] = ("owner", "duplicated")
ESTIMATORS: tuple[str, ...] = ("ns", "exact", "rsvd")
SCALAR_PHASES = frozenset({"finite", "norm", "variance"})

#: Model presets (LLaMA-1/2 shapes; "llama-1b" is TinyLlama-1.1B, as ``configs/llama-1b.yaml``).
PRESETS: dict[str, ModelConfig] = {
    "llama-1b": ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
    "llama-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
    "llama-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, max_seq_len=4096),
    "llama-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, max_seq_len=4096),
}

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


# ============================================================================ inputs
@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links. Units: TFLOP/s (1e12 FLOP/s), GB/s (1e9 B/s), µs.

    Defaults: one H100 SXM as measured in the spec (bf16 matmul 733–777 TFLOP/s → 750; NS5 at
    74–81% of it → 0.75), NVLink 4 at 450 GB/s per direction, one 400 Gb/s NIC per GPU (50 GB/s),
    80% of nominal bandwidth reached by NCCL rings, HBM3 3350 GB/s. ``svd_tflops`` is the
    effective rate of fp32 ``svdvals`` (calibrated: the spec's ≈1.2 s for 4096×11008);
    ``fp32_tflops`` the rate of the small fp32 matmuls and QRs of ``rsvd``. Latencies are per
    hop (:meth:`Collective.latency_steps`). These are assumptions, not measurements, except
    where the spec's H100 table is quoted.
    """

    name: str = "h100"
    matmul_tflops: float = 750.0
    ns_efficiency: float = 0.75
    fp32_tflops: float = 50.0
    svd_tflops: float = 0.8
    hbm_gbps: float = 3350.0
    intra_gbps: float = 450.0
    inter_gbps: float = 50.0
    comm_efficiency: float = 0.8
    intra_latency_us: float = 2.0
    inter_latency_us: float = 5.0
    mfu: float = 0.45

    def __post_init__(self) -> None:
        for f in ("matmul_tflops", "ns_efficiency", "fp32_tflops", "svd_tflops", "hbm_gbps", "intra_gbps",
                  "inter_gbps", "comm_efficiency", "mfu"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware.{f} must be > 0, got {getattr(self, f)}")
        if self.ns_efficiency > 1 or self.comm_efficiency > 1 or self.mfu > 1:
            raise ValueError("ns_efficiency, comm_efficiency and mfu are fractions in (0, 1]")

    @property
    def ns_flops_per_s(self) -> float:
        return self.matmul_tflops * self.ns_efficiency * 1e12


#: Hardware presets. H200 is the H100's GH100 die with HBM3e: same matmul rate assumed.
HARDWARE: dict[str, Hardware] = {"h100": Hardware(), "h200": Hardware(name="h200", hbm_gbps=4800.0)}


@dataclass(frozen=True)
class ParallelLayout:
    """World = ``nodes × gpus_per_node`` ranks = ``tp × pp × dp``.

    ``strategy``: one of :data:`STRATEGIES`; ``tp_mode``: ``owner`` | ``duplicated`` (module doc);
    ``bucket_mb``: the engine's/DDP's bucket size in MiB (the engine uses
    ``int(bucket_mb·2²⁰ / element size)`` elements); ``zero_layout``: the engine's ``layout``
    argument, ``owner`` or ``plain`` (no owners: plain-ZeRO AdamW, a traffic baseline).
    """

    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    strategy: str = "zero2"
    tp_mode: str = "owner"
    bucket_mb: float = 25.0
    zero_layout: str = "owner"

    def __post_init__(self) -> None:
        for f in ("nodes", "gpus_per_node", "tp", "pp"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1, got {v!r}")
        if self.world % (self.tp * self.pp):
            raise ValueError(f"world size {self.world} (= {self.nodes} nodes × {self.gpus_per_node} GPUs) is not "
                             f"divisible by tp·pp = {self.tp}·{self.pp} = {self.tp * self.pp}")
        if self.strategy not in STRATEGY_MODELS:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {tuple(STRATEGY_MODELS)}")
        if self.tp_mode not in TP_MODES:
            raise ValueError(f"unknown tp_mode {self.tp_mode!r}; choose one of {TP_MODES}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if self.zero_layout not in ("owner", "plain"):
            raise ValueError(f"zero_layout must be 'owner' or 'plain', got {self.zero_layout!r}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def intra_node(self, group: str) -> bool:
        """Whether every ``group`` (``tp`` | ``dp`` | ``pp`` | ``world``) lies inside one node
        (Megatron order: TP ranks consecutive, DP groups span ``tp·dp`` consecutive ranks)."""
        span = {"tp": self.tp, "dp": self.tp * self.dp, "pp": self.world, "world": self.world}[group]
        if group == "pp" and self.pp == 1:
            return True
        return span <= self.gpus_per_node and self.gpus_per_node % span == 0

    def group_size(self, group: str) -> int:
        return {"tp": self.tp, "dp": self.dp, "pp": self.pp, "world": self.world}[group]


@dataclass(frozen=True)
class OptimSettings:
    """What the optimizer does per step.

    ``param_bytes``: element size of the parameters, hence of the engine's bucket buffers and
    optimizer states (4 = fp32 master weights); scalar reductions use max(4, param_bytes)
    (the engine's ``promote_types(dtype, float32)``). ``nuclear_estimator``: ``ns`` | ``exact`` |
    ``rsvd`` (``auto`` is ``ns`` on GPU). ``refine_steps``: cubic steps of the ``ns`` estimator
    (None: 3 on GPU, 6 on CPU, as :func:`lanton_dist.nuclear.nuclear_norm`). ``defer_variance``:
    adapters with an all-to-all exchange (FSDP2) issue an estimation step's variance all-reduce at
    the start of the next step (their ``overlap=True, defer_variance=True`` default); the ZeRO
    engine never defers it.
    """

    algorithm: str = "lanton"
    estimate_every: int = 10
    option: str = "I"
    nuclear_estimator: str = "ns"
    ns_steps: int = DEFAULT_STEPS
    refine_steps: int | None = None
    rsvd_rank: int = 16
    rsvd_power_iters: int = 2
    skip_nonfinite: bool = True
    param_bytes: int = 4
    device: str = "cuda"
    defer_variance: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if not isinstance(self.estimate_every, int) or self.estimate_every < 1:
            raise ValueError(f"estimate_every must be an integer >= 1, got {self.estimate_every!r}")
        if self.option not in ("I", "II"):
            raise ValueError(f"option must be 'I' or 'II', got {self.option!r}")
        if self.nuclear_estimator not in ESTIMATORS:
            raise ValueError(f"unknown nuclear_estimator {self.nuclear_estimator!r}; choose one of {ESTIMATORS}")
        if self.param_bytes not in (2, 4, 8):
            raise ValueError(f"param_bytes must be 2, 4 or 8, got {self.param_bytes}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")

    @property
    def scalar_bytes(self) -> int:
        return 8 if self.param_bytes >= 8 else 4

    @property
    def refine(self) -> int:
        return self.refine_steps if self.refine_steps is not None else (3 if self.device == "cuda" else 6)

    def estimates(self, step: int) -> bool:
        """Whether ``step`` (1-based) is an estimation step (LANTON only)."""
        return self.algorithm == "lanton" and step >= 1 and step % self.estimate_every == 0

    def estimator_runs(self, step: int) -> bool:
        """Whether the nuclear norms are computed at ``step``: Option I has no previous gradient at t = 1."""
        return self.estimates(step) and (self.option == "II" or step >= 2)

    @property
    def uses_ns(self) -> bool:
        return self.algorithm != "adamw"


# ============================================================================ model
def resolve_model(model: str | ModelConfig) -> tuple[str, ModelConfig]:
    """``(name, config)`` of a preset name (:data:`PRESETS`), a YAML run config path (its
    ``model:`` section) or a :class:`ModelConfig`."""
    if isinstance(model, ModelConfig):
        return "custom", model
    if model in PRESETS:
        return model, PRESETS[model]
    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"model config {path} does not exist")
        data = load_yaml(path)
        if "model" not in data:
            raise ValueError(f"{path} has no 'model:' section")
        return path.stem, from_dict(ModelConfig, data["model"], "model")
    raise ValueError(f"unknown model {model!r}: use one of {sorted(PRESETS)}, a configs/*.yaml path, or custom dims")


def llama_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """ParamSpecs of :class:`lanton_dist.model.Transformer` for ``cfg``, in ``named_parameters``
    order, as :func:`lanton_dist.groups.classify_parameters` gives them (shapes ``(d_out, d_in)``)."""
    check_model_config(cfg)
    d, hd = cfg.dim, cfg.dim // cfg.n_heads
    specs = [ParamSpec("tok_embeddings.weight", Geometry.EMBED_HEAD, (cfg.vocab_size, d), "embed")]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        specs += [
            ParamSpec(p + "attention_norm.weight", Geometry.VECTOR, (d,)),
            ParamSpec(p + "attention.wq.weight", Geometry.HIDDEN, (cfg.n_heads * hd, d)),
            ParamSpec(p + "attention.wk.weight", Geometry.HIDDEN, (cfg.n_kv_heads * hd, d)),
            ParamSpec(p + "attention.wv.weight", Geometry.HIDDEN, (cfg.n_kv_heads * hd, d)),
            ParamSpec(p + "attention.wo.weight", Geometry.HIDDEN, (d, cfg.n_heads * hd)),
            ParamSpec(p + "ffn_norm.weight", Geometry.VECTOR, (d,)),
            ParamSpec(p + "feed_forward.w_gate.weight", Geometry.HIDDEN, (cfg.ffn_dim, d)),
            ParamSpec(p + "feed_forward.w_up.weight", Geometry.HIDDEN, (cfg.ffn_dim, d)),
            ParamSpec(p + "feed_forward.w_down.weight", Geometry.HIDDEN, (d, cfg.ffn_dim)),
        ]
    specs += [ParamSpec("norm.weight", Geometry.VECTOR, (d,)),
              ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (cfg.vocab_size, d), "head")]
    return specs


#: Megatron TP split of each of our parameters: dim split (0 = rows, 1 = columns) or None.
def tp_split_dim(name: str) -> int | None:
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w_gate.weight", "w_up.weight")):
        return 0
    if name.endswith(("wo.weight", "w_down.weight")):
        return 1
    if name in ("tok_embeddings.weight", "lm_head.weight"):
        return 0
    return None


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise if ``cfg`` cannot be split over ``tp`` ranks (Megatron's constraints)."""
    problems = [f"{what} {v} not divisible by tp {tp}" for what, v in
                (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim), ("vocab_size", cfg.vocab_size))
                if v % tp]
    if problems:
        raise ValueError(f"tensor parallel size {tp} does not fit the model: " + "; ".join(problems))


def local_spec(spec: ParamSpec, tp: int) -> ParamSpec:
    """The spec of one TP rank's shard of ``spec`` (same name, shape divided along the split dim)."""
    dim = tp_split_dim(spec.name)
    if tp == 1 or dim is None:
        return spec
    shape = list(spec.shape)
    if shape[dim] % tp:
        raise ValueError(f"{spec.name}: dim {dim} of shape {spec.shape} not divisible by tp {tp}")
    shape[dim] //= tp
    return ParamSpec(spec.name, spec.geometry, tuple(shape), spec.role)


def engine_order(specs: list[ParamSpec]) -> list[ParamSpec]:
    """``specs`` in the order the engine sees them: :func:`lanton_dist.factory.param_groups` makes
    one param group per geometry (hidden, embed_head, vector), model order inside each."""
    rank = {g: i for i, g in enumerate(Geometry)}
    return sorted(specs, key=lambda s: rank[s.geometry])


def stage_specs(specs: list[ParamSpec], n_layers: int, pp: int) -> list[list[ParamSpec]]:
    """Split model-ordered ``specs`` into ``pp`` pipeline stages of ``n_layers/pp`` blocks
    (embedding on the first stage, final norm and head on the last)."""
    if n_layers % pp:
        raise ValueError(f"n_layers {n_layers} is not divisible by pp {pp}")
    per = n_layers // pp
    stages: list[list[ParamSpec]] = [[] for _ in range(pp)]
    for s in specs:
        if s.name.startswith("layers."):
            stages[int(s.name.split(".")[1]) // per].append(s)
        elif s.name == "tok_embeddings.weight":
            stages[0].append(s)
        else:
            stages[-1].append(s)
    return stages


# ============================================================================ predictions
@dataclass(frozen=True)
class Collective:
    """One predicted collective on one rank; ``sent_bytes``/``tensor_bytes`` as the meter's
    :class:`~lanton_dist.engine.meter.CommRecord` (integers). ``self_numel``: all-to-all only."""

    op: str
    phase: str
    group: str
    group_size: int
    numel: int
    elem_size: int
    self_numel: int = 0

    @property
    def tensor_bytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def sent_bytes(self) -> int:
        return sent_bytes(self.op, self.numel, self.elem_size, self.group_size, self.self_numel)

    def key(self) -> tuple[str, str, int, int, int, int, int]:
        """The fields a meter record is compared on (group names are roles here, not names)."""
        return (self.op, self.phase, self.group_size, self.numel, self.elem_size, self.tensor_bytes, self.sent_bytes)

    def latency_steps(self) -> int:
        """Latency-bound hops: ``W−1`` for ring reduce-scatter/all-gather/all-to-all; for
        all-reduce the smaller of the ring's ``2(W−1)`` and a tree's ``2⌈log₂W⌉`` (NCCL picks
        trees for small messages such as the scalar phases)."""
        w = self.group_size
        if w == 1:
            return 0
        if self.op == "all_reduce":
            return min(2 * (w - 1), 2 * math.ceil(math.log2(w)))
        return w - 1


def engine_collectives(layout: Layout, step: int, optim: OptimSettings, n_layers: int, n_vector: int, *,
                       group: str = "dp", scalar_group: tuple[str, int] | None = None,
                       norm_group: tuple[str, int] | None = None, gather_phases: tuple[str, ...] = ("param_gather",)) -> list[Collective]:
    """The collectives :class:`~lanton_dist.engine.ShardedLANTON` issues at ``step`` (0: the
    ``init_sync`` all-gather of construction), in issue order.

    Args:
        layout: the engine's layout (``build_layout(specs, plan, world, bucket_numel)``).
        n_layers: logical layers L of the whole model (Σ blocks); the variance vector is 2L.
        n_vector: vector-geometry parameters of the whole model (the ``norm`` vector length).
        scalar_group / norm_group: ``(name, size)`` of the group of the scalar all-reduces
            (default: the DP group, as in the engine).
        gather_phases: phases of the parameter all-gather (``zero3`` gathers twice).
    """
    W, E, A = layout.world, optim.param_bytes, optim.scalar_bytes
    sg = scalar_group or (group, W)
    ng = norm_group or sg

    def per_bucket(op: str, phase: str) -> list[Collective]:
        return [Collective(op, phase, group, W, b.segment * W, E) for b in layout.buckets]

    if step == 0:
        return per_bucket("all_gather", "init_sync")
    out = per_bucket("reduce_scatter", "grad_reduce")
    if optim.estimates(step) and optim.option == "II":
        out += per_bucket("reduce_scatter", "grad_reduce_half")
    if optim.skip_nonfinite:
        out.append(Collective("all_reduce", "finite", sg[0], sg[1], 1, A))
    if optim.estimates(step):
        out.append(Collective("all_reduce", "variance", sg[0], sg[1], 2 * n_layers, A))
    if optim.algorithm in ("lanton", "scion") and n_vector:
        out.append(Collective("all_reduce", "norm", ng[0], ng[1], n_vector, A))
    for phase in gather_phases:
        out += per_bucket("all_gather", phase)
    return out


def estimator_flops(m: int, n: int, optim: OptimSettings) -> int:
    """FLOPs of one nuclear-norm estimate of an ``m × n`` matrix (module doc, "Time model"); for
    ``ns`` exactly the Newton–Schulz kernel's (5 quintic + ``refine`` cubic steps, as
    :func:`lanton_dist.nuclear.nuclear_norm` calls it; the final ⟨D, polar⟩ is not counted)."""
    s, l = min(m, n), max(m, n)
    if optim.nuclear_estimator == "ns":
        return newton_schulz_flops(m, n, DEFAULT_STEPS, optim.refine)
    if optim.nuclear_estimator == "rsvd":
        r, q = min(optim.rsvd_rank, s), optim.rsvd_power_iters
        return (2 + 4 * q) * m * n * r + (q + 1) * 4 * l * r * r + 4 * n * r * r
    return 4 * l * s * s + 8 * s**3


def estimator_seconds(flops: int, optim: OptimSettings, hw: Hardware) -> float:
    rate = {"ns": hw.ns_flops_per_s, "rsvd": hw.fp32_tflops * 1e12, "exact": hw.svd_tflops * 1e12}[optim.nuclear_estimator]
    return flops / rate


def block_estimator_flops(spec: ParamSpec, optim: OptimSettings) -> int:
    return sum(estimator_flops(b.d_out, spec.d_in, optim) for b in spec.blocks)


def ddp_buckets(specs: list[ParamSpec], bucket_numel: int) -> list[int]:
    """Element counts of DDP's gradient buckets: whole tensors in reverse order, each bucket
    closed once it reaches ``bucket_numel`` (DDP's small first bucket is ignored)."""
    buckets, cur = [], 0
    for s in reversed(specs):
        cur += s.numel
        if cur >= bucket_numel:
            buckets.append(cur)
            cur = 0
    if cur:
        buckets.append(cur)
    return buckets


def fsdp_rows(d0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 ``torch.chunk`` shard: chunks of ⌈d0/W⌉, the last ones short or empty."""
    c = math.ceil(d0 / world)
    return max(0, min(d0, (rank + 1) * c) - rank * c)


@dataclass
class RankStep:
    """Everything one rank does in one step: ``collectives`` (issue order), NS FLOPs of the LMO
    (``ns_flops``), estimator FLOPs (``estimator_flops``), elements updated per geometry."""

    stage: int
    dp_rank: int
    tp_rank: int
    step: int
    collectives: list[Collective]
    ns_flops: int
    estimator_flops: int
    owned: dict[str, int]

    def bytes_by_phase(self, key: str = "sent_bytes") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for c in self.collectives:
            out[c.phase] += getattr(c, key)
        return dict(out)


@dataclass
class StagePlan:
    """One pipeline stage: full specs, TP-local specs, the ownership and DP layout."""

    index: int
    specs: list[ParamSpec]
    local: list[ParamSpec]
    ownership: OwnershipPlan          # over the NS ranks (dp·tp in owner mode, dp otherwise)
    dp_plan: OwnershipPlan            # the DP owner of each hidden matrix (what the layout uses)
    layout: Layout | None             # engine layout (zero1/2/3); None otherwise
    ns_ranks: int                     # ranks the NS work is split over (per stage)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)   # derived figures (layout-only)

    def memo(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    @cached_property
    def hidden(self) -> list[ParamSpec]:
        return [s for s in self.specs if s.geometry is Geometry.HIDDEN]


@dataclass(frozen=True)
class StrategyModel:
    """How one data-parallel strategy moves data. ``validated_by`` names what its predictions
    were checked against (None: a model only). Register more with :func:`register_strategy`."""

    name: str
    collectives: Callable[["StepPlanner", StagePlan, int, int, int], list[Collective]]
    owned: Callable[["StepPlanner", StagePlan, int, int], dict[str, int]]
    validated_by: str | None = None
    description: str = ""


STRATEGY_MODELS: dict[str, StrategyModel] = {}


def register_strategy(model: StrategyModel) -> StrategyModel:
    """Add (or replace) a strategy model, e.g. one for an adapter in ``lanton_dist.integrations``.

    A model is two functions of ``(planner, stage, dp_rank, tp_rank[, step])``: the collectives
    one rank issues at a step (:class:`Collective`, in issue order; step 0 = construction) and the
    elements it updates per geometry. An adapter built on
    :class:`~lanton_dist.integrations.exchange.PieceOptimizer` (a DeepSpeed one, say) needs only
    its framework's own collectives plus :func:`piece_exchange_collectives` with its piece sizes;
    validate it as ``tests/test_plan.py`` does FSDP2 (meter records vs predictions per step)."""
    STRATEGY_MODELS[model.name] = model
    return model


class StepPlanner:
    """Predictions for one (model, layout, optimizer, hardware). See the module doc.

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
        owned = st.memo(("owned", self.layout.strategy, d, t), lambda: self.strategy.owned(self, st, d, t))
        return RankStep(stage, d, t, step, colls, ns, est, owned)

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
        ``variance_gather`` every estimation step, empty when Option I has no previous gradient)."""
        L, E = self.layout, self.optim.param_bytes
        T = L.tp
        mine_dp = st.memo(("tp_mine", d), lambda: [s for s in st.hidden if L.strategy == "ddp" or st.dp_plan.owner[s.name] == d])
        out: list[Collective] = []
        estimating = self.optim.estimates(step)
        if L.tp_mode == "owner":
            def sums() -> tuple[int, int, int]:
                base = 0 if L.strategy == "ddp" else d * T
                mine = [s for s in mine_dp if st.ownership.owner[s.name] - base == t]
                return (sum(s.numel // T for s in mine_dp),      # my shards of every matrix my DP rank owns
                        sum(s.numel // T for s in mine),         # ... of those I run Newton–Schulz for
                        sum(s.numel for s in mine))              # the results I send back (whole matrices)

            send, self_part, owned_full = st.memo(("tp_sums", d, t), sums)
            if estimating:
                ran = self.optim.estimator_runs(step)
                out.append(Collective("all_to_all", "variance_gather", "tp", T, send if ran else 0, E, self_part if ran else 0))
            out.append(Collective("all_to_all", "lmo_gather", "tp", T, send, E, self_part))
            out.append(Collective("all_to_all", "lmo_scatter", "tp", T, owned_full, E, self_part))
        else:
            for phase in (["variance_gather"] if self.optim.estimator_runs(step) else []) + ["lmo_gather"]:
                out += [Collective("all_gather", phase, "tp", T, s.numel, E) for s in mine_dp]
        return out

    def ranks(self) -> Iterable[tuple[int, int, int]]:
        for s in range(self.layout.pp):
            for d in range(self.layout.dp):
                for t in range(self.layout.tp):
                    yield s, d, t

    # ------------------------------------------------------------------ time and memory
    def collective_seconds(self, c: Collective) -> float:
        intra = self.layout.intra_node(c.group)
        bw = (self.hw.intra_gbps if intra else self.hw.inter_gbps) * 1e9 * self.hw.comm_efficiency
        lat = (self.hw.intra_latency_us if intra else self.hw.inter_latency_us) * 1e-6
        return c.latency_steps() * lat + c.sent_bytes / bw

    def state_bytes(self, owned: dict[str, int], stage: StagePlan) -> tuple[int, int]:
        """(steady optimizer-state bytes, peak extra) of a rank owning ``owned`` elements per
        geometry. Peak extra: Option I keeps the previous gradient on the step before each
        estimation; Option II holds a stashed half-batch gradient of the local model."""
        a, E = self.optim.algorithm, self.optim.param_bytes
        steady = sum(n * STATE_TENSORS[a][g] * E for g, n in owned.items())
        if a in ("lanton", "scion"):
            steady += 2 * self.n_layers_total * self.optim.scalar_bytes      # H and rate factors (replicated)
        extra = 0
        if a == "lanton":
            extra = sum(owned.values()) * E if self.optim.option == "I" else sum(s.numel for s in stage.local) * E
        return steady, extra

    def step_summary(self, step: int) -> dict[str, Any]:
        """Per-step figures over all ranks: bytes per phase (max over ranks), collective counts,
        NS/estimator FLOPs (max and mean), state memory (max), times (worst rank), and every
        collective of the rank with the longest communication time (``worst_rank``)."""
        opt, hw = self.optim, self.hw
        phase_bytes: dict[str, int] = defaultdict(int)
        phase_time: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        ns, est, state, peak, comm_t, elem_t = [], [], 0, 0, 0.0, 0.0
        worst: tuple[float, RankStep | None] = (-1.0, None)
        for s, d, t in self.ranks():
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
            ns.append(rs.ns_flops)
            est.append(rs.estimator_flops)
            sb, pk = self.state_bytes(rs.owned, st)
            state, peak = max(state, sb), max(peak, pk)
            acc = ELEMENTWISE_ACCESSES[opt.algorithm]
            elem_t = max(elem_t, sum(n * acc[g] * opt.param_bytes for g, n in rs.owned.items()) / (hw.hbm_gbps * 1e9))
        ns_t = max(ns) / hw.ns_flops_per_s
        est_t = estimator_seconds(max(est), opt, hw)
        tensor = {p: v for p, v in phase_bytes.items() if p not in SCALAR_PHASES}
        return {
            "step": step, "estimation": opt.estimates(step),
            "bytes_per_phase": dict(phase_bytes), "collectives_per_phase": dict(counts),
            "tensor_bytes": sum(tensor.values()), "scalar_bytes": sum(v for p, v in phase_bytes.items() if p in SCALAR_PHASES),
            "ns_flops_max": max(ns), "ns_flops_mean": sum(ns) / len(ns),
            "ns_imbalance": (max(ns) / (sum(ns) / len(ns))) if sum(ns) else 1.0,
            "estimator_flops_max": max(est),
            "state_bytes_max": state, "state_peak_extra_bytes_max": peak,
            "worst_rank": None if worst[1] is None else {
                "stage": worst[1].stage, "dp_rank": worst[1].dp_rank, "tp_rank": worst[1].tp_rank,
                "collectives": [asdict(c) | {"sent_bytes": c.sent_bytes, "seconds": self.collective_seconds(c)}
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
        """Whether steps ``a`` and ``b`` issue the same collectives and FLOPs on every rank."""
        for s, d, t in self.ranks():
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
            ownership = plan_ownership(full, ns_ranks, ns_steps)
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
        sub = plan_ownership([s for s in hidden if dp_plan.owner[s.name] == d], tp, ns_steps)
        for n, t in sub.owner.items():
            owner[n] = d * tp + t
        for t in range(tp):
            flops[d * tp + t], numel[d * tp + t] = sub.flops[t], sub.numel[t]
    return OwnershipPlan(dp * tp, owner, tuple(flops), tuple(numel))


# ============================================================================ strategy models
def _scalar_groups(p: StepPlanner) -> tuple[tuple[str, int], tuple[str, int]]:
    """Groups of (finite/variance, norm): the DP group, or the world when TP or PP hold other
    parts of the model (the engine's ``scalar_world=True``, as the Megatron adapter runs it)."""
    L = p.layout
    if L.tp * L.pp == 1:
        return ("dp", L.dp), ("dp", L.dp)
    return ("world", L.world), ("world", L.world)


def _stage_vectors(p: StepPlanner, st: StagePlan) -> int:
    """Length of the ``norm`` vector: every vector parameter of the job (the core's layer list
    spans all pipeline stages)."""
    return p.n_vector_total


def _engine_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    sg, ng = _scalar_groups(p)
    gathers = ("param_gather_fwd", "param_gather_bwd") if p.layout.strategy == "zero3" else ("param_gather",)
    return engine_collectives(st.layout, step, p.optim, p.n_layers_total, _stage_vectors(p, st),
                              scalar_group=sg, norm_group=ng, gather_phases=gathers)


def _engine_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    geo = {s.name: s.geometry.value for s in st.local}
    out: dict[str, int] = defaultdict(int)
    for b in st.layout.buckets:
        for pc in b.on_rank(d):
            out[geo[pc.name]] += pc.numel
    return dict(out)


def _ddp_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    if step == 0:
        return []
    E, W = p.optim.param_bytes, p.layout.dp
    return [Collective("all_reduce", "grad_reduce", "dp", W, n, E) for n in ddp_buckets(st.local, p.bucket_numel)]


def _ddp_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in st.local:
        out[s.geometry.value] += s.numel
    return dict(out)


def _fsdp_units(st: StagePlan) -> list[list[ParamSpec]]:
    units: dict[str, list[ParamSpec]] = {}
    for s in st.local:
        key = ".".join(s.name.split(".")[:2]) if s.name.startswith("layers.") else "root"
        units.setdefault(key, []).append(s)
    return list(units.values())


def exchange_buckets(hidden: list[ParamSpec], bucket_bytes: int, elem: int) -> list[list[ParamSpec]]:
    """Buckets of :class:`~lanton_dist.integrations.exchange.AllToAllExchange`: hidden matrices in
    canonical order, a new bucket whenever the next whole matrix would exceed ``bucket_bytes``."""
    groups: list[list[ParamSpec]] = [[]]
    size = 0
    for s in hidden:
        b = s.numel * elem
        if groups[-1] and size + b > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += b
    return [g for g in groups if g]


def piece_exchange_collectives(p: StepPlanner, st: StagePlan, d: int, step: int,
                               piece_numel: Callable[[ParamSpec, int], int], elem: int | None = None) -> list[Collective]:
    """What a :class:`~lanton_dist.integrations.exchange.PieceOptimizer` adapter meters on DP rank
    ``d`` at ``step``: the scalars and the bucketed all-to-alls of hidden pieces to their owners
    and back. ``piece_numel(spec, rank)``: elements of ``spec`` on ``rank`` in the framework's
    sharding (FSDP2: dim-0 rows; DeepSpeed: its flat partitions). ``elem``: bytes per element of
    the pieces (default ``param_bytes``; DeepSpeed's fp32 master partitions: 4). Buckets
    (:func:`exchange_buckets`) whose matrices lie whole on their owners issue nothing."""
    W, o = p.layout.dp, p.optim
    E = elem or o.param_bytes
    sg, ng = _scalar_groups(p)
    A = 8 if E >= 8 else 4
    out: list[Collective] = []
    if o.skip_nonfinite:
        out.append(Collective("all_reduce", "finite", sg[0], sg[1], 1, A))
    variance = Collective("all_reduce", "variance", sg[0], sg[1], 2 * p.n_layers_total, A)
    if o.defer_variance and o.estimates(step - 1):
        out.append(variance)
    owner = st.dp_plan.owner
    buckets = st.memo(("exchange_buckets", p.layout.bucket_mb, E),
                      lambda: exchange_buckets([s for s in engine_order(st.local) if s.geometry is Geometry.HIDDEN],
                                               int(p.layout.bucket_mb * 2**20), E))
    # a bucket whose pieces all sit on their owners already moves nothing: no collective
    buckets = [b for b in buckets if any(piece_numel(s, r) for s in b for r in range(W) if r != owner[s.name])]

    def gathers(phase: str) -> list[Collective]:
        return [Collective("all_to_all", phase, "dp", W, sum(piece_numel(s, d) for s in b), E,
                           sum(piece_numel(s, d) for s in b if owner[s.name] == d)) for b in buckets]

    def scatters(phase: str) -> list[Collective]:
        return [Collective("all_to_all", phase, "dp", W, sum(s.numel for s in b if owner[s.name] == d), E,
                           sum(piece_numel(s, d) for s in b if owner[s.name] == d)) for b in buckets]

    if o.estimates(step):
        if o.estimator_runs(step):
            out += gathers("variance_gather")
        if not o.defer_variance:
            out.append(variance)
    if o.uses_ns and buckets:
        out += gathers("lmo_gather") + scatters("lmo_scatter")
    if o.algorithm in ("lanton", "scion") and p.n_vector_total:
        out.append(Collective("all_reduce", "norm", ng[0], ng[1], p.n_vector_total, A))
    return out


def _fsdp_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    """FSDP2 + :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2`: FSDP2's own all-gathers and
    reduce-scatters (``fsdp_*`` phases: modelled, not metered), then
    :func:`piece_exchange_collectives` with dim-0 row shards (what the adapter's meter records)."""
    if step == 0:
        return []
    W, E, o = p.layout.dp, p.optim.param_bytes, p.optim
    units = _fsdp_units(st)

    def padded(unit: list[ParamSpec]) -> int:
        return sum(math.ceil(s.shape[0] / W) * W * (s.numel // s.shape[0]) for s in unit)

    out = [Collective("all_gather", "fsdp_param_gather_fwd", "dp", W, padded(u), E) for u in units]
    out += [Collective("all_gather", "fsdp_param_gather_bwd", "dp", W, padded(u), E) for u in units
            if not any(s.name in ("tok_embeddings.weight", "lm_head.weight") for s in u)]
    out += [Collective("reduce_scatter", "fsdp_grad_reduce", "dp", W, padded(u), E) for u in reversed(units)]
    if o.estimates(step) and o.option == "II":
        out += [Collective("reduce_scatter", "fsdp_grad_reduce_half", "dp", W, padded(u), E) for u in reversed(units)]
    return out + piece_exchange_collectives(p, st, d, step, lambda s, r: fsdp_rows(s.shape[0], W, r) * (s.numel // s.shape[0]))


def _fsdp_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    W = p.layout.dp
    out: dict[str, int] = defaultdict(int)
    for s in st.local:
        out[s.geometry.value] += fsdp_rows(s.shape[0], W, d) * (s.numel // s.shape[0])
    return dict(out)


def deepspeed_ranges(local: list[ParamSpec], dp: int, stage: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """Each parameter's flat range on every DP rank under DeepSpeed ZeRO (``stage`` 1/2: one flat
    buffer per param group — the engine-ordered geometry groups — padded to a multiple of
    ``2·dp`` (``nccl_start_alignment_factor``) and cut into ``dp`` equal partitions, no
    ``parameter_alignment``, no round-robin; stage 3: every parameter cut into ``⌈numel/dp⌉``
    partitions). Uses :mod:`lanton_dist.integrations.exchange`'s range helpers."""
    from lanton_dist.integrations.exchange import flat_partition_ranges, padded_partition_ranges

    if stage == 3:
        return {s.name: padded_partition_ranges(s.numel, math.ceil(s.numel / dp), dp) for s in local}
    out = {}
    for geometry in Geometry:
        group = [s for s in engine_order(local) if s.geometry is geometry]
        total = sum(s.numel for s in group)
        partition = math.ceil(total / (2 * dp)) * 2 * dp // dp
        offset = 0
        for s in group:
            out[s.name] = flat_partition_ranges(offset, s.numel, partition, dp)
            offset += s.numel
    return out


def _ds_stage(p: StepPlanner) -> int:
    return 3 if p.layout.strategy == "deepspeed3" else 2


def _ds_piece(p: StepPlanner, st: StagePlan) -> Callable[[ParamSpec, int], int]:
    ranges = st.memo(("ds_ranges", _ds_stage(p)), lambda: deepspeed_ranges(st.local, p.layout.dp, _ds_stage(p)))
    return lambda s, r: ranges[s.name][r][1] - ranges[s.name][r][0]


def _ds_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    """DeepSpeed ZeRO + :class:`~lanton_dist.integrations.deepspeed.LANTONDeepSpeed`: DeepSpeed's own
    collectives (``ds_*``: modelled, not metered — ZeRO-1/2: a reduce-scatter and an all-gather of
    each padded flat group; ZeRO-3: per parameter, gathers before forward and backward and a
    reduce-scatter), then :func:`piece_exchange_collectives` with DeepSpeed's partitions. DeepSpeed's
    fp32 master partitions make the exchange 4-byte whatever ``param_bytes`` says."""
    if step == 0:
        return []
    W, E = p.layout.dp, 4
    piece = _ds_piece(p, st)
    if _ds_stage(p) == 3:
        padded = [math.ceil(s.numel / W) * W for s in st.local]
        out = [Collective("all_gather", "ds_param_gather_fwd", "dp", W, n, E) for n in padded]
        out += [Collective("all_gather", "ds_param_gather_bwd", "dp", W, n, E) for n in padded]
        out += [Collective("reduce_scatter", "ds_grad_reduce", "dp", W, n, E) for n in reversed(padded)]
    else:
        flats = [sum(piece(s, r) for r in range(W) for s in st.local if s.geometry is g) for g in Geometry]
        flats = [math.ceil(n / (2 * W)) * 2 * W for n in flats if n]
        out = [Collective("reduce_scatter", "ds_grad_reduce", "dp", W, n, E) for n in flats]
        out += [Collective("all_gather", "ds_param_gather", "dp", W, n, E) for n in flats]
    return out + piece_exchange_collectives(p, st, d, step, piece, elem=E)


def _ds_owned(p: StepPlanner, st: StagePlan, d: int, t: int) -> dict[str, int]:
    piece = _ds_piece(p, st)
    out: dict[str, int] = defaultdict(int)
    for s in st.local:
        out[s.geometry.value] += piece(s, d)
    return dict(out)


def _ddp_scalar_colls(p: StepPlanner, st: StagePlan, d: int, t: int, step: int) -> list[Collective]:
    # DDP's replicated optimizer needs no scalar reductions over DP (every rank holds everything);
    # with PP the variance still spans the stages: one world all-reduce of 2L (for the group max).
    out = _ddp_colls(p, st, d, t, step)
    if p.layout.pp > 1 and p.optim.estimates(step):
        out.append(Collective("all_reduce", "variance", "world", p.layout.world, 2 * p.n_layers_total, p.optim.scalar_bytes))
    return out


register_strategy(StrategyModel("zero1", _engine_colls, _engine_owned, "ShardedLANTON + CommMeter, world 2-4 (tests/test_plan.py)",
                                "owner-aligned ZeRO-1 (ShardedLANTON); gradients stay whole until the step"))
register_strategy(StrategyModel("zero2", _engine_colls, _engine_owned, "ShardedLANTON + CommMeter, world 2-4 (tests/test_plan.py)",
                                "owner-aligned ZeRO-2 (ShardedLANTON)"))
register_strategy(StrategyModel("zero3", _engine_colls, _engine_owned, None,
                                "owner-aligned ZeRO-3: parameter all-gather before forward and backward"))
register_strategy(StrategyModel("fsdp2", _fsdp_colls, _fsdp_owned,
                                "LANTONFSDP2 + CommMeter, world 3, optimizer collectives (tests/test_plan.py); "
                                "FSDP2's own fsdp_* all-gathers/reduce-scatters are modelled",
                                "FSDP2 dim-0 shards; bucketed all-to-all of hidden matrices to owners and back"))
register_strategy(StrategyModel("deepspeed", _ds_colls, _ds_owned,
                                "LANTONDeepSpeed (ZeRO-2) + CommMeter, world 3, optimizer collectives and partitions "
                                "(tests/test_plan.py); DeepSpeed's own ds_* collectives are modelled",
                                "DeepSpeed ZeRO-1/2 flat partitions; bucketed all-to-all of hidden pieces to owners and back"))
register_strategy(StrategyModel("deepspeed3", _ds_colls, _ds_owned,
                                "LANTONDeepSpeed (ZeRO-3) + CommMeter, world 3, optimizer collectives and partitions "
                                "(tests/test_plan.py); DeepSpeed's own ds_* collectives are modelled",
                                "DeepSpeed ZeRO-3 per-parameter partitions; bucketed all-to-all to owners and back"))
register_strategy(StrategyModel("ddp", _ddp_scalar_colls, _ddp_owned, None,
                                "DDP all-reduce; replicated optimizer, redundant Newton-Schulz"))


# ============================================================================ text output
def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def plan_table(model: str | ModelConfig, layout: ParallelLayout, optim: OptimSettings, hw: Hardware | None = None,
               algorithms: Iterable[str] = ALGORITHMS, ks: Iterable[int] = (1, 5, 10, 20),
               global_batch: int = 1024, seq_len: int | None = None, growth_models: Iterable[str] = tuple(PRESETS),
               name: str | None = None) -> tuple[str, dict[str, Any]]:
    """The ``lanton-dist plan`` report: ``(text, json-able dict)`` for ``algorithms`` on one model
    and layout, plus the estimation-overhead table over ``growth_models`` × ``ks``."""
    hw = hw or Hardware()
    plans = {a: StepPlanner(model, layout, replace(optim, algorithm=a), hw, name=name) for a in algorithms}
    summaries = {a: p.summary(global_batch, seq_len) for a, p in plans.items()}
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
            "strategy_description": strat.description}
    return "\n".join(lines), data


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
