"""What the planner is asked about: model presets, hardware rates, the parallel layout and the
optimizer settings of one step (frozen dataclasses, validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass

from lanton_dist.config import ModelConfig
from lanton_dist.engine.split_plan import SPLIT_TOLERANCE, check_tolerance
from lanton_dist.names import ALGORITHMS, ESTIMATORS, OPTIONS, ZERO_LAYOUTS
from lanton_dist.newton_schulz import DEFAULT_STEPS, ESTIMATE_REFINE_STEPS
from lanton_dist.plan.predictions import STRATEGY_MODELS

TP_MODES: tuple[str, ...] = ("owner", "duplicated")

#: Model presets (LLaMA-1/2 shapes; "llama-1b" is TinyLlama-1.1B, as ``configs/llama-1b.yaml``).
PRESETS: dict[str, ModelConfig] = {
    "llama-1b": ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
    "llama-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
    "llama-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, max_seq_len=4096),
    "llama-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, max_seq_len=4096),
}


@dataclass(frozen=True)
class Hardware:
    """Rates of one GPU and its links. Units: TFLOP/s (1e12 FLOP/s), GB/s (1e9 B/s), µs.

    Defaults: one H100 SXM as measured in the spec (bf16 matmul 733–777 TFLOP/s → 750; NS5 at
    74–81% of it → 0.75), NVLink 4 at 450 GB/s per direction, one 400 Gb/s NIC per GPU (50 GB/s),
    80% of nominal bandwidth reached by NCCL rings, HBM3 3350 GB/s. ``svd_tflops`` is the
    effective rate of fp32 ``svdvals`` (calibrated: the spec's ≈1.2 s for 4096×11008);
    ``fp32_tflops`` the rate of the small fp32 matmuls and QRs of ``rsvd``. Latencies are per
    hop (:meth:`Collective.latency_steps`). These are assumptions, not measurements, except
    where the spec's H100 table is quoted. ``memory_gib``: device memory the fit check compares
    per-rank bytes with (H100 SXM 80 GiB; H200 about 140 GiB as the driver reports it).
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
    memory_gib: float = 80.0

    def __post_init__(self) -> None:
        for f in ("matmul_tflops", "ns_efficiency", "fp32_tflops", "svd_tflops", "hbm_gbps", "intra_gbps",
                  "inter_gbps", "comm_efficiency", "mfu", "memory_gib"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware.{f} must be > 0, got {getattr(self, f)}")
        if self.ns_efficiency > 1 or self.comm_efficiency > 1 or self.mfu > 1:
            raise ValueError("ns_efficiency, comm_efficiency and mfu are fractions in (0, 1]")

    @property
    def ns_flops_per_s(self) -> float:
        return self.matmul_tflops * self.ns_efficiency * 1e12

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


#: Hardware presets. H200 is the H100's GH100 die with HBM3e: same matmul rate assumed.
HARDWARE: dict[str, Hardware] = {"h100": Hardware(), "h200": Hardware(name="h200", hbm_gbps=4800.0, memory_gib=140.0)}


@dataclass(frozen=True)
class ParallelLayout:
    """World = ``nodes × gpus_per_node`` ranks = ``tp × pp × dp``.

    ``strategy``: a registered :data:`~lanton_dist.plan.predictions.STRATEGY_MODELS` name;
    ``tp_mode``: ``owner`` | ``duplicated`` (:mod:`lanton_dist.plan`);
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
        if self.zero_layout not in ZERO_LAYOUTS:
            raise ValueError(f"zero_layout must be one of {ZERO_LAYOUTS}, got {self.zero_layout!r}")

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
    after its Polar Express steps (None: :data:`~lanton_dist.newton_schulz.ESTIMATE_REFINE_STEPS`,
    as :data:`lanton_dist.nuclear.NS_ESTIMATE`). ``defer_variance``: adapters with an all-to-all
    exchange (FSDP2) issue an estimation step's variance all-reduce at the start of the next step
    (their ``overlap=True, defer_variance=True`` default). The ZeRO engine does so on ``cuda``
    only, where the owners' nuclear norms run on a side stream (:mod:`lanton_dist.engine.streams`);
    the planner books its all-reduce at the estimation step (the same bytes, one step earlier).
    ``ns_split_tolerance``: the split Newton–Schulz the plan reports (the engine's
    ``optim.ns_split_tolerance``; :func:`~lanton_dist.engine.split_plan.plan_split`).
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
    ns_split_tolerance: float = SPLIT_TOLERANCE

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if not isinstance(self.estimate_every, int) or self.estimate_every < 1:
            raise ValueError(f"estimate_every must be an integer >= 1, got {self.estimate_every!r}")
        if self.option not in OPTIONS:
            raise ValueError(f"option must be one of {OPTIONS}, got {self.option!r}")
        if self.nuclear_estimator not in ESTIMATORS:
            raise ValueError(f"unknown nuclear_estimator {self.nuclear_estimator!r}; choose one of {ESTIMATORS}")
        if self.param_bytes not in (2, 4, 8):
            raise ValueError(f"param_bytes must be 2, 4 or 8, got {self.param_bytes}")
        check_tolerance(self.ns_split_tolerance)
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")

    @property
    def scalar_bytes(self) -> int:
        return 8 if self.param_bytes >= 8 else 4

    @property
    def ns_bytes(self) -> int:
        """Element size of Newton–Schulz's compute dtype, in which split NS sends its blocks and
        Gram matrices (:func:`lanton_dist.newton_schulz.default_ns_dtype`: bf16 on cuda, the
        parameters' dtype on cpu)."""
        return 2 if self.device == "cuda" else self.param_bytes

    @property
    def refine(self) -> int:
        return self.refine_steps if self.refine_steps is not None else ESTIMATE_REFINE_STEPS

    def estimates(self, step: int) -> bool:
        """Whether ``step`` (1-based) is an estimation step (LANTON only)."""
        return self.algorithm == "lanton" and step >= 1 and step % self.estimate_every == 0

    def estimator_runs(self, step: int) -> bool:
        """Whether the nuclear norms are computed at ``step``: Option I has no previous gradient at t = 1."""
        return self.estimates(step) and (self.option == "II" or step >= 2)

    @property
    def uses_ns(self) -> bool:
        return self.algorithm != "adamw"

