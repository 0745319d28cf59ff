"""LLaMA on Megatron-core, and what LANTON needs to know about Megatron's parameters.

Three pieces:

* :func:`transformer_config` / :func:`build_gpt_model` — a Megatron-core ``GPTModel`` for our
  :class:`~lanton_dist.config.ModelConfig`: RMSNorm, SwiGLU (``gated_linear_unit`` + SiLU),
  RoPE (``rope_theta``, non-interleaved halves as in LLaMA), no biases, untied output layer,
  GQA through ``num_query_groups``. It uses Megatron's *local* layer spec
  (``get_gpt_layer_local_spec``: ``ColumnParallelLinear``/``RowParallelLinear``,
  ``torch.nn.RMSNorm``, ``DotProductAttention``), so it needs neither Transformer Engine nor
  Apex. Parameters are fp32 (the optimizer updates them directly); bf16 compute is done with
  ``torch.autocast`` by the training loop. Weights are initialised on the CPU
  (``use_cpu_initialization=True``): each TP rank draws the *full* master weight from the
  same seeded generator and keeps its slice, so the logical (TP-gathered) model does not
  depend on the TP size.
* :func:`initialize_model_parallel` — Megatron's parallel state (TP, PP; DP is the rest) from a
  :class:`~lanton_dist.config.RunConfig` once ``torch.distributed`` is initialised.
* :func:`logical_param_specs` — for every local Megatron parameter, the
  :class:`~lanton_dist.groups.ParamSpec` of the **full, TP-gathered** tensor (geometry,
  gathered shape, LANTON blocks) plus how it is sharded over TP. :func:`tp_gather` and
  :func:`tp_shard` convert between a rank's shard and that gathered layout;
  :func:`to_tp1_layout` / :func:`from_tp1_layout` convert between the gathered layout and the
  layout of a TP=1 model (they differ only for strided shards, i.e. SwiGLU's ``linear_fc1``).

Sharding of each parameter (``partition_dim``: the dim split across TP ranks):

====================================  =========  ================================================
parameter                             dim        gathered layout / LANTON blocks
====================================  =========  ================================================
``embedding.word_embeddings.weight``  0          vocab rows; embed_head (role ``embed``)
``output_layer.weight``               0          vocab rows; embed_head (role ``head``)
``*.linear_qkv.weight``               0          per query group ``[q_g; k_g; v_g]``; each TP rank
                                                 holds whole groups, so the gathered tensor *is*
                                                 the interleaved layout: ``qkv_blocks(...,
                                                 interleaved=True)`` → blocks ``q``, ``k``, ``v``
``*.linear_fc1.weight`` (SwiGLU)      0          stride 2: rank r holds ``[gate_r; up_r]``, so the
                                                 gathered tensor is ``[g0; u0; g1; u1; …]``; block
                                                 ``gate`` = rows of g0∪g1∪…, ``up`` = u0∪u1∪…
``*.linear_proj.weight``              1          RowParallel (input dim split); one block
``*.linear_fc2.weight``               1          RowParallel; one block
``*layernorm.weight``                 None       replicated RMSNorm gains; vector
====================================  =========  ================================================

Sequence parallelism is not available with the local spec (``torch.nn.RMSNorm`` refuses it);
use Transformer Engine's spec for that.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lanton_dist.config import ModelConfig, RunConfig
from lanton_dist.groups import Block, Geometry, ParamSpec, infer_geometry, qkv_blocks

try:  # megatron-core is an optional dependency of lanton_dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    HAVE_MEGATRON = True
except ImportError as _err:  # pragma: no cover - exercised only without megatron-core
    HAVE_MEGATRON = False
    _IMPORT_ERROR = _err

__all__ = [
    "MegatronParam", "check_parallel_layout", "initialize_model_parallel", "destroy_model_parallel",
    "transformer_config", "llama_layer_spec", "build_gpt_model", "causal_attention_mask", "logical_param_specs",
    "tp_gather", "tp_shard", "to_tp1_layout", "from_tp1_layout", "HAVE_MEGATRON",
]


def _require_megatron() -> None:
    if not HAVE_MEGATRON:
        raise ImportError(
            "megatron-core is not installed; install it with `pip install megatron-core==0.16.1` "
            f"(import failed: {_IMPORT_ERROR})"
        )


# ----------------------------------------------------------------------------- parallel state
def check_parallel_layout(cfg: RunConfig, world_size: int) -> int:
    """Validate TP/PP against the world size and the model shape; return the data-parallel size.

    Raises ``ValueError`` naming the offending numbers.
    """
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    m = cfg.model
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp}, pp={pp}")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            "data parallel size = world / (tp*pp) must be an integer"
        )
    problems = []
    if m.dim % m.n_heads:
        problems.append(f"model.dim {m.dim} not divisible by model.n_heads {m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        problems.append(f"model.n_heads {m.n_heads} not divisible by model.n_kv_heads {m.n_kv_heads}")
    for what, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                        ("model.ffn_dim", m.ffn_dim), ("model.vocab_size", m.vocab_size)):
        if value % tp:
            problems.append(f"{what} {value} not divisible by parallel.tp {tp}")
    if m.n_layers % pp:
        problems.append(f"model.n_layers {m.n_layers} not divisible by parallel.pp {pp}")
    if cfg.data.seq_len > m.max_seq_len:
        problems.append(f"data.seq_len {cfg.data.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    if problems:
        raise ValueError("invalid Megatron layout: " + "; ".join(problems))
    return world_size // (tp * pp)


def initialize_model_parallel(cfg: RunConfig, seed: int | None = None) -> int:
    """Create Megatron's TP/PP/DP groups from ``cfg.parallel`` and seed its RNG tracker.

    ``torch.distributed`` must already be initialised (NCCL on GPU, gloo on CPU). On a machine
    without CUDA, Megatron-core additionally needs the CPU/CI-only shim
    (:mod:`lanton_dist.integrations.megatron_cpu`; ``train.device cpu`` installs it). Returns the
    data-parallel size. ``seed`` defaults to ``cfg.train.seed``; every rank must pass the same.
    """
    _require_megatron()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize torch.distributed (init_process_group) before initialize_model_parallel")
    dp = check_parallel_layout(cfg, dist.get_world_size())
    _require_device_support()
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=max(1, int(round(cfg.parallel.timeout_s / 60))),
    )
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dp


def destroy_model_parallel() -> None:
    _require_megatron()
    parallel_state.destroy_model_parallel()


def _require_device_support() -> None:
    if torch.cuda.is_available():
        return
    try:
        device = torch.cuda.current_device()
    except Exception:  # noqa: BLE001 - torch raises AssertionError/RuntimeError on CPU builds
        device = None
    if not isinstance(device, torch.device) or device.type != "cpu":
        raise RuntimeError(
            "Megatron-core needs CUDA. On a CPU-only machine (CI, tests) install the CPU shim "
            "first: `from lanton_dist.integrations import megatron_cpu; megatron_cpu.install()`, or run "
            "launch/train.py with --parallel.backend megatron --train.device cpu"
        )


# ----------------------------------------------------------------------------- model
def transformer_config(cfg: RunConfig, *, pipeline_dtype: torch.dtype = torch.float32) -> "TransformerConfig":
    """Megatron ``TransformerConfig`` for the LLaMA architecture in ``cfg.model``.

    fp32 parameters and no Megatron mixed precision (``bf16=False``): bf16 compute comes from
    ``torch.autocast`` in the training loop, and stage outputs stay fp32 (residual stream),
    hence ``pipeline_dtype`` fp32. Dropout is off (LLaMA pretraining). The output projections
    (``linear_proj``, ``linear_fc2``) use Megatron's default scaled init
    (std / √(2·n_layers)); everything else N(0, ``init_std``); norms start at 1.
    """
    _require_megatron()
    m: ModelConfig = cfg.model
    return TransformerConfig(
        num_layers=m.n_layers,
        hidden_size=m.dim,
        num_attention_heads=m.n_heads,
        num_query_groups=m.n_kv_heads,
        kv_channels=m.dim // m.n_heads,
        ffn_hidden_size=m.ffn_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        sequence_parallel=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=pipeline_dtype,
        bf16=False,
        fp16=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def llama_layer_spec():
    """Megatron's local (non-Transformer-Engine) GPT layer spec with RMSNorm."""
    _require_megatron()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    cfg: RunConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> "GPTModel":
    """The LLaMA ``GPTModel`` (this rank's pipeline stage and TP shard), on the CPU.

    Call :func:`initialize_model_parallel` first. ``pre_process``/``post_process`` default to
    whether this rank is the first/last pipeline stage. Move it to the GPU with ``.cuda()``.
    """
    _require_megatron()
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call initialize_model_parallel(cfg) before build_gpt_model")
    if parallel_state.get_tensor_model_parallel_world_size() != cfg.parallel.tp or \
            parallel_state.get_pipeline_model_parallel_world_size() != cfg.parallel.pp:
        raise ValueError(
            f"Megatron parallel state has tp={parallel_state.get_tensor_model_parallel_world_size()}, "
            f"pp={parallel_state.get_pipeline_model_parallel_world_size()} but the config asks for "
            f"tp={cfg.parallel.tp}, pp={cfg.parallel.pp}"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    m = cfg.model
    return GPTModel(
        config=transformer_config(cfg),
        transformer_layer_spec=llama_layer_spec(),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta,
        vp_stage=vp_stage,
    )


def causal_attention_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[1, 1, s, s]`` bool mask, True above the diagonal (masked), as Megatron's local
    ``DotProductAttention`` expects. Pass it explicitly: Megatron's default mask (used when
    ``attention_mask`` is None) is hard-wired to ``device="cuda"``."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


# ----------------------------------------------------------------------------- parameter specs
@dataclass(frozen=True)
class MegatronParam:
    """How one local Megatron parameter relates to its full logical tensor.

    ``name``: the local name (``model.named_parameters()``). ``spec``: the ParamSpec of the
    full TP-gathered tensor; ``spec.name`` is the pipeline-independent global name (layer
    indices are global layer numbers, so it is the same under any PP split) and its blocks are
    row ranges of the gathered layout. ``partition_dim``: the dim split over TP (None:
    replicated). ``stride``: Megatron's ``partition_stride`` (2 for SwiGLU ``linear_fc1``).
    """

    name: str
    spec: ParamSpec
    partition_dim: int | None
    tp_size: int
    stride: int = 1
    local_shape: tuple[int, ...] = ()

    @property
    def global_name(self) -> str:
        return self.spec.name

    @property
    def is_sharded(self) -> bool:
        return self.partition_dim is not None and self.tp_size > 1


_LAYER_RE = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def _global_name(local_name: str, model: nn.Module) -> str:
    match = _LAYER_RE.match(local_name)
    if not match:
        return local_name
    prefix, idx, rest = match.groups()
    module = model.get_submodule(prefix.rstrip(".") + f".{idx}")
    layer_number = getattr(module, "layer_number", None)  # Megatron: 1-based, global
    if layer_number is None:
        raise ValueError(f"{local_name}: transformer layer has no layer_number")
    return f"{prefix}{layer_number - 1}{rest}"


def _tp_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tensor_model_parallel_size", None):
        return int(config.tensor_model_parallel_size)
    return parallel_state.get_tensor_model_parallel_world_size()


def logical_param_specs(model: nn.Module, cfg: RunConfig) -> dict[str, MegatronParam]:
    """Describe every trainable parameter of a Megatron LLaMA ``model`` (one pipeline stage).

    Keys are local parameter names. Geometry: ``cfg.optim.overrides`` (fnmatch on the global
    or local name) first; the vocab-parallel word embedding → embed_head/``embed``;
    ``output_layer`` → embed_head/``head``; 1-D → vector; 2-D → hidden. Fused blocks
    (``linear_qkv``: q/k/v; SwiGLU ``linear_fc1``: gate/up) are row ranges of the gathered
    layout (see the module docstring).
    """
    _require_megatron()
    m = cfg.model
    tp = _tp_size_of(model)
    head_dim = m.dim // m.n_heads
    owner = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    out: dict[str, MegatronParam] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = owner[name]
        gname = _global_name(name, model)
        local_shape = tuple(p.shape)
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        partition_dim = int(p.partition_dim) if sharded else None
        stride = int(getattr(p, "partition_stride", 1)) if sharded else 1
        _check_module_layout(name, module, partition_dim)
        full_shape = list(local_shape)
        if partition_dim is not None:
            full_shape[partition_dim] *= tp
        full_shape_t = tuple(full_shape)

        geometry, role = infer_geometry((gname, name), local_shape, cfg.optim.overrides,
                                        isinstance(module, VocabParallelEmbedding), _is_output(name))
        blocks: tuple[Block, ...] = ()
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if geometry is Geometry.HIDDEN:
            if leaf == "linear_qkv":
                if stride != 1 or partition_dim != 0:
                    raise ValueError(f"{name}: unexpected linear_qkv sharding dim={partition_dim} stride={stride}")
                expected = (m.n_heads + 2 * m.n_kv_heads) * head_dim
                if full_shape_t[0] != expected:
                    raise ValueError(f"{name}: gathered rows {full_shape_t[0]} != (heads + 2·kv_heads)·head_dim = {expected}")
                blocks = qkv_blocks(gname, m.n_heads, m.n_kv_heads, head_dim, interleaved=True)
            elif stride > 1:
                if partition_dim != 0:
                    raise ValueError(f"{name}: strided sharding along dim {partition_dim} is not supported")
                labels = ["gate", "up"] if leaf == "linear_fc1" and stride == 2 else [str(j) for j in range(stride)]
                blocks = _strided_blocks(gname, full_shape_t[0], tp, stride, labels)
        spec = ParamSpec(gname, geometry, full_shape_t, role, blocks)
        out[name] = MegatronParam(name, spec, partition_dim, tp, stride, local_shape)
    return out


def _check_module_layout(name: str, module: nn.Module, partition_dim: int | None) -> None:
    """Cross-check Megatron's parameter attributes against the module type."""
    expected = None
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
        expected = 0
    elif isinstance(module, RowParallelLinear):
        expected = 1 if name.endswith(".weight") else None  # RowParallel biases are replicated
    if expected != partition_dim:
        raise ValueError(f"{name}: {type(module).__name__} reports partition_dim={partition_dim}, expected {expected}")


def _is_output(name: str) -> bool:
    return name.rsplit(".", 1)[0].rsplit(".", 1)[-1] == "output_layer"


def _strided_blocks(name: str, rows: int, tp: int, stride: int, labels: list[str]) -> tuple[Block, ...]:
    """Blocks of a gathered tensor whose TP shards each stack ``stride`` sub-matrices.

    Rank r's shard is ``[m0_r; m1_r; …]`` (chunks of ``rows/(tp·stride)`` rows); the gathered
    tensor is the ranks' shards in order, so logical matrix j is rows
    ``∪_r [(r·stride + j)·c, (r·stride + j + 1)·c)``.
    """
    if rows % (tp * stride):
        raise ValueError(f"{name}: {rows} rows not divisible by tp·stride = {tp}·{stride}")
    c = rows // (tp * stride)
    return tuple(
        Block(f"{name}:{labels[j]}", tuple(((r * stride + j) * c, (r * stride + j + 1) * c) for r in range(tp)))
        for j in range(stride)
    )


# ----------------------------------------------------------------------------- gather / shard
def tp_gather(local: torch.Tensor, info: MegatronParam, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """All-gather this rank's shard (a parameter, gradient or state of ``info``'s layout) over
    the TP group into the full gathered layout. Replicated tensors are returned as they are.
    Collective: every rank of the TP group must call it."""
    if tuple(local.shape) != info.local_shape:
        raise ValueError(f"{info.name}: got a shard of shape {tuple(local.shape)}, expected {info.local_shape}")
    if not info.is_sharded:
        return local
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) != info.tp_size:
        raise ValueError(f"{info.name}: TP group has {dist.get_world_size(group)} ranks, spec says {info.tp_size}")
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(info.tp_size)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=info.partition_dim)


def tp_shard(full: torch.Tensor, info: MegatronParam, rank: int | None = None) -> torch.Tensor:
    """This rank's shard (a view) of a tensor in the full gathered layout; inverse of :func:`tp_gather`."""
    if tuple(full.shape) != info.spec.shape:
        raise ValueError(f"{info.name}: got a full tensor of shape {tuple(full.shape)}, expected {info.spec.shape}")
    if not info.is_sharded:
        return full
    if rank is None:
        rank = parallel_state.get_tensor_model_parallel_rank()
    if not 0 <= rank < info.tp_size:
        raise ValueError(f"{info.name}: TP rank {rank} outside 0..{info.tp_size - 1}")
    return full.chunk(info.tp_size, dim=info.partition_dim)[rank]


def to_tp1_layout(full: torch.Tensor, info: MegatronParam) -> torch.Tensor:
    """The gathered tensor in the row order a TP=1 model uses (``[gate; up]`` for fc1)."""
    if tuple(full.shape) != info.spec.shape:
        raise ValueError(f"{info.name}: expected shape {info.spec.shape}, got {tuple(full.shape)}")
    if info.stride == 1 or not info.is_sharded:
        return full
    return torch.cat([b.gather(full) for b in info.spec.blocks], dim=0)


def from_tp1_layout(tp1: torch.Tensor, info: MegatronParam) -> torch.Tensor:
    """Inverse of :func:`to_tp1_layout`."""
    if tuple(tp1.shape) != info.spec.shape:
        raise ValueError(f"{info.name}: expected shape {info.spec.shape}, got {tuple(tp1.shape)}")
    if info.stride == 1 or not info.is_sharded:
        return tp1
    out = torch.empty_like(tp1)
    offset = 0
    for b in info.spec.blocks:
        b.scatter_(out, tp1[offset: offset + b.d_out])
        offset += b.d_out
    return out


def describe(specs: dict[str, MegatronParam]) -> list[dict]:
    """Plain-dict view of :func:`logical_param_specs` (for logs and debugging)."""
    return [
        dict(name=i.name, global_name=i.global_name, geometry=i.spec.geometry.value, shape=list(i.spec.shape),
             local_shape=list(i.local_shape), partition_dim=i.partition_dim, stride=i.stride,
             blocks=[dataclasses.asdict(b) for b in i.spec.blocks])
        for i in specs.values()
    ]
