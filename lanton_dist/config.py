"""Run configuration: dataclasses, strict YAML loading and ``--section.key value`` overrides.

Unknown keys (in YAML or on the command line) are errors that list the valid keys; values
are converted to the field's declared type. One :class:`RunConfig` drives
``launch/train.py``; every section is a plain dataclass so library users can build them in
code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclass
class GroupValues:
    """One value per geometry group."""

    hidden: float
    embed_head: float
    vector: float

    def get(self, geometry: str) -> float:
        return float(getattr(self, geometry))


@dataclass
class OptimConfig:
    """Optimizer choice and hyper-parameters (see :class:`lanton_dist.lanton.LANTON`).

    ``name``: ``lanton`` | ``scion`` (LANTON with ``noise_adaptive=False``) | ``dmuon`` | ``adamw``.
    ``lr`` is per geometry group; for dmuon the embed_head/vector rates are AdamW rates, for
    adamw all three are. ``overrides`` maps fnmatch patterns of parameter names to a geometry.
    """

    name: str = "lanton"
    lr: GroupValues = field(default_factory=lambda: GroupValues(hidden=0.02, embed_head=0.002, vector=0.002))
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.9
    alpha: GroupValues = field(default_factory=lambda: GroupValues(hidden=1.0, embed_head=1.0, vector=1.0))
    nesterov: bool = False
    estimate_every: int = 10
    option: str = "I"
    ratio_anchor: str = "max"
    delay_lr_factor: bool = False
    nuclear_estimator: str = "auto"
    wd_lr: str = "group"
    scale_mode: str = "spectral"
    sign_scale: str = "scion"
    ns_steps: int = 5
    momentum: float = 0.95
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay to ``min_ratio``·lr over ``TrainConfig.steps``."""

    warmup_steps: int = 20
    min_ratio: float = 0.1


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively; unknown keys raise ``ValueError``."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _merge(dataclasses.asdict(default), value)
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``base``, recursively for nested mappings (so a partial section keeps defaults)."""
    out = dict(base)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _convert(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(item, v, where) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{where}: expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``["--optim.lr.hidden", "0.03", "--train.steps=50", ...]`` to a nested dict."""
    data = _deepcopy(data)
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --section.key, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ValueError(f"{arg} needs a value")
            key, value = arg[2:], overrides[i + 1]
            i += 2
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{key}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


@dataclass
class ModelConfig:
    """LLaMA-style decoder: RMSNorm, SwiGLU, RoPE, GQA, untied LM head, no biases."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 352
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming the offending field for an inconsistent config."""
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"model.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"model.dim {cfg.dim} is not divisible by model.n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"model.n_heads {cfg.n_heads} is not divisible by model.n_kv_heads {cfg.n_kv_heads}")
    if (cfg.dim // cfg.n_heads) % 2:
        raise ValueError(f"head dim {cfg.dim // cfg.n_heads} must be even for rotary embeddings")
    if not cfg.init_std > 0:
        raise ValueError(f"model.init_std must be > 0, got {cfg.init_std}")


#: ``data.source`` values (:mod:`lanton_dist.data`); ``megatron`` is another name for ``indexed``.
DATA_SOURCES: tuple[str, ...] = ("stdlib", "synthetic", "text", "jsonl", "indexed", "megatron")
#: ``data.sample_by`` values: what one document of a ``text`` source is.
SAMPLE_BY: tuple[str, ...] = ("document", "paragraph", "line")


@dataclass
class DataConfig:
    """Where the tokens come from (:mod:`lanton_dist.data`).

    ``source``: ``stdlib`` (the Python standard library's own source, byte tokens),
    ``synthetic`` (seeded random tokens, for tests), ``text`` (UTF-8 text at ``path``: a file,
    a directory of ``.txt`` files or a glob), ``jsonl`` (one JSON object per line, the
    document under ``text_key``), or ``indexed`` (a Megatron ``.bin``/``.idx`` pair, ``path``
    its prefix; ``megatron`` is the same source under the name launch/pretrain_llama.py uses).
    ``tokenizer``: a HF ``tokenizer.json`` for ``text``/``jsonl`` (empty: byte tokens, vocab
    256); ``eod_token``: its end-of-document token (empty: the first known one it has).
    ``sample_by``: one ``text`` document is a whole file (``document``), a blank-line
    separated ``paragraph``, or a ``line``. The last ``val_fraction`` of the documents (by
    count, in order) is the validation split for ``text``/``jsonl``/``indexed``, as Megatron
    splits; ``stdlib`` holds out files by a hash of their path."""

    source: str = "stdlib"
    path: str = ""
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0
    text_key: str = "text"
    tokenizer: str = ""
    eod_token: str = ""
    sample_by: str = "document"


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16
    micro_batch: int = 0  # 0: the whole per-rank batch in one micro-batch
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    out_dir: str = "runs/tiny"
    checkpoint_every: int = 0  # 0: only at the end of the run
    resume: bool = False
    stop_after: int = 0  # stop (checkpointed) after this many steps, as if preempted; 0: train.steps
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast on GPU)


# ``parallel.backend`` values run by launch/train.py (lanton_dist.trainer); ``megatron`` runs in
# launch/pretrain_llama.py.
TRAINER_BACKENDS: tuple[str, ...] = ("none", "zero", "ddp", "fsdp2", "deepspeed")


@dataclass
class ParallelConfig:
    """``backend``: ``none`` | ``ddp`` | ``zero`` (the lanton_dist engine) | ``fsdp2`` | ``deepspeed`` | ``megatron``.
    ``tp``/``pp``: Megatron tensor/pipeline sizes (data parallel = world / (tp·pp)).
    ``overlap``: consume the variance all-reduce one step late (see ``delay_lr_factor``)."""

    backend: str = "none"
    tp: int = 1
    pp: int = 1
    bucket_mb: float = 25.0
    overlap: bool = True
    zero_stage: int = 1
    timeout_s: float = 120.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML at ``path`` (or the defaults) with CLI ``overrides`` applied; strict about keys."""
    data = load_yaml(path) if path else {}
    return from_dict(RunConfig, apply_overrides(data, overrides or []))
