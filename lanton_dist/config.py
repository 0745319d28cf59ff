"""Run configuration: dataclasses, strict YAML loading, ``--section.key value`` overrides and
the checks the training entry runs before anything is built.

Unknown keys (in YAML or on the command line) are errors that list the valid keys; values
are converted to the field's declared type. One :class:`RunConfig` drives
``launch/train.py`` (every ``parallel.backend``, Megatron included); every section is a plain
dataclass so library users can build them in code. Every problem with a config — malformed YAML, an
unknown key, a bad value (:func:`check_run_config`), a resume that does not match its
checkpoint (:func:`check_resume`) — is a :class:`ConfigError` whose message names the key;
the entry prints it as one ``config error: …`` line and exits with status 2. Torch-free.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lanton_dist.names import ALGORITHMS, ALPHA_MODES

T = TypeVar("T")

#: ``optim.name`` values (:func:`lanton_dist.factory.build_optimizer`).
OPTIMIZERS: tuple[str, ...] = ALGORITHMS  # optim.name


#: Command-line spellings of YAML's null for an optional key (``--optim.lr.head null``).
NULLS: tuple[str, ...] = ("null", "Null", "NULL", "~", "none", "None")


class ConfigError(ValueError):
    """A run config the training entry refuses before building anything; the message names the key."""


@dataclass
class GroupValues:
    """One value per geometry group."""

    hidden: float
    embed_head: float
    vector: float

    def get(self, geometry: str) -> float:
        return float(getattr(self, geometry))


@dataclass
class RateValues(GroupValues):
    """Base learning rates: one per geometry group, and ``head``, the LM head's own rate
    (``None``: the embed_head rate, the head then shares the embedding's param group). The
    head keeps the embed_head geometry (sign LMO, dual norm, rate-factor anchor group); only
    its base rate differs, and schedules scale it like every other."""

    head: float | None = None


@dataclass
class OptimConfig:
    """Optimizer choice and hyper-parameters (see :class:`lanton_dist.lanton.LANTON`).

    ``name``: ``lanton`` | ``scion`` (LANTON with ``noise_adaptive=False``) | ``dmuon`` | ``adamw``.
    ``lr`` is per geometry group; for dmuon the embed_head/vector rates are AdamW rates, for
    adamw all three are. ``overrides`` maps fnmatch patterns of parameter names to a geometry.
    ``clip_grad_norm``: clip the global L2 norm of each step's gradient to this value, as
    ``torch.nn.utils.clip_grad_norm_`` (0: off; see :mod:`lanton_dist.engine.core`).
    ``lr.head``: the LM head's own base rate (``None``: the embed_head rate; :class:`RateValues`).
    ``alpha_mode``: ``fixed`` (``alpha`` as given) | ``auto`` (each geometry group's α from its
    own first noise estimate: the median √H of its estimated layers; :mod:`lanton_dist.noise`).
    ``bias_correction``: the rate factors read H/(1 − β₂ⁿ), n the layer's number of estimates.
    ``ns_split_tolerance``: ``parallel.backend zero`` only — split the Newton–Schulz of the
    largest matrices over teams of ranks until each rank's NS FLOPs are within
    ``(1 + value)·mean`` (:mod:`lanton_dist.engine.splitns`); ``None`` (default): whole matrices.
    """

    name: str = "lanton"
    lr: RateValues = field(default_factory=lambda: RateValues(hidden=0.02, embed_head=0.002, vector=0.002))
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.9
    alpha: GroupValues = field(default_factory=lambda: GroupValues(hidden=1.0, embed_head=1.0, vector=1.0))
    nesterov: bool = False
    alpha_mode: str = "fixed"
    bias_correction: bool = False
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
    clip_grad_norm: float = 0.0
    ns_split_tolerance: float | None = None


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay to ``min_ratio``·lr over ``TrainConfig.steps``."""

    warmup_steps: int = 20
    min_ratio: float = 0.1


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively; unknown keys raise :class:`ConfigError`."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; valid keys: {sorted(fields)}")
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
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip() in NULLS):
            return None  # an optional key is unset by YAML's null, also on the command line
        return _convert(args[0], value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(item, v, where) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
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
            raise ConfigError(f"expected --section.key, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], overrides[i + 1]
            i += 2
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``path``; a syntax error is a one-line :class:`ConfigError`
    with the file, line and column."""
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"{where}: malformed YAML: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
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
    """Raise :class:`ConfigError` naming the offending field for an inconsistent config."""
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"model.dim {cfg.dim} is not divisible by model.n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"model.n_heads {cfg.n_heads} is not divisible by model.n_kv_heads {cfg.n_kv_heads}")
    if (cfg.dim // cfg.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {cfg.dim // cfg.n_heads} (the head dim) must be even for rotary embeddings")
    if not (math.isfinite(cfg.init_std) and cfg.init_std > 0):
        raise ConfigError(f"model.init_std must be > 0, got {cfg.init_std}")


#: ``data.source`` values (:mod:`lanton_dist.data`); ``megatron`` is another name for ``indexed``.
DATA_SOURCES: tuple[str, ...] = ("stdlib", "synthetic", "text", "jsonl", "indexed", "megatron")
#: ``data.sample_by`` values: what one document of a ``text`` source is (``auto``: a whole file
#: when the path names several, else the one file's paragraphs, or its lines without a blank line).
SAMPLE_BY: tuple[str, ...] = ("auto", "document", "paragraph", "line")


@dataclass
class DataConfig:
    """Where the tokens come from (:mod:`lanton_dist.data`).

    ``source``: ``stdlib`` (the Python standard library's own source, byte tokens),
    ``synthetic`` (seeded random tokens, for tests), ``text`` (UTF-8 text at ``path``: a file,
    a directory of ``.txt`` files or a glob), ``jsonl`` (one JSON object per line, the
    document under ``text_key``), or ``indexed`` (a Megatron ``.bin``/``.idx`` pair, ``path``
    its prefix; ``megatron`` is another name for the same source).
    ``tokenizer``: a HF ``tokenizer.json`` for ``text``/``jsonl`` (empty: byte tokens, vocab
    256); ``eod_token``: its end-of-document token (empty: the first known one it has).
    ``sample_by``: one ``text`` document is a whole file (``document``), a blank-line
    separated ``paragraph``, a ``line``, or (``auto``) a whole file when ``path`` names several and a
    paragraph of a single file (a line where it has no blank line). The last ``val_fraction`` of the documents (by
    count, in order) is the validation split for ``text``/``jsonl``/``indexed``, as Megatron
    splits; ``stdlib`` holds out files by a hash of their path.
    ``seed`` draws the training batches' windows and, unless ``val_seed`` is set, the
    validation windows (``val_seed``: the same validation set for every ``seed``)."""

    source: str = "stdlib"
    path: str = ""
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0
    val_seed: int | None = None
    text_key: str = "text"
    tokenizer: str = ""
    eod_token: str = ""
    sample_by: str = "auto"


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
    keep_checkpoints: int = 2  # complete checkpoints kept in out_dir/checkpoints (the newest ones)
    loss_spike_factor: float = 5.0  # a finite loss above this × the running median is a bad step; 0: off
    loss_spike_window: int = 50  # how many recent good steps' losses that median is over
    resume: bool = False
    stop_after: int = 0  # stop (checkpointed) after this many steps, as if preempted; 0: train.steps
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast on GPU)
    max_consecutive_skips: int = 5  # stop (exit 3) after this many skipped/non-finite steps in a row; 0: never
    activation_checkpointing: bool = False  # recompute each transformer block in backward (not megatron)
    compile: bool = False  # torch.compile every transformer block (not megatron)
    compile_backend: str = "inductor"  # the torch.compile backend of train.compile (inductor | aot_eager | eager | ...)


#: ``parallel.backend`` values, every one run by launch/train.py (:mod:`lanton_dist.trainer`).
TRAINER_BACKENDS: tuple[str, ...] = ("none", "zero", "ddp", "fsdp2", "deepspeed", "megatron")


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
class LoggingConfig:
    """What a run reports besides the progress line and ``metrics.jsonl``
    (:mod:`lanton_dist.training_log`). ``tensorboard``: also write TensorBoard scalars to
    ``<out_dir>/tensorboard`` (needs the ``tensorboard`` extra). ``peak_tflops``: one device's
    peak dense FLOP/s (in TFLOP/s) for the MFU estimate; 0 looks the GPU up by name."""

    tensorboard: bool = False
    peak_tflops: float = 0.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML at ``path`` (or the defaults) with CLI ``overrides`` applied; strict about keys."""
    data = load_yaml(path) if path else {}
    return from_dict(RunConfig, apply_overrides(data, overrides or []))


# ============================================================================ checks before training
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("fp32", "bf16")


def _number(key: str, value: float, *, low: float = 0.0, high: float | None = None, open_high: bool = True,
            positive: bool = False) -> None:
    """``value`` must be finite, ``>= low`` (``> low`` when ``positive``) and below ``high``."""
    bad = not math.isfinite(value) or value < low or (positive and value <= low)
    if high is not None:
        bad = bad or value > high or (open_high and value >= high)
    if bad:
        lo = f"> {low}" if positive else f">= {low}"
        rng = f"in [{low}, {high})" if high is not None and open_high else (
            f"in [{low}, {high}]" if high is not None else f"a finite number {lo}")
        raise ConfigError(f"{key} must be {rng}, got {value!r}")


def _check_optim(o: OptimConfig) -> None:
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
    for geometry in ("hidden", "embed_head", "vector"):
        _number(f"optim.lr.{geometry}", o.lr.get(geometry))
        _number(f"optim.alpha.{geometry}", o.alpha.get(geometry))
    if getattr(o.lr, "head", None) is not None:  # a plain GroupValues has no head rate
        _number("optim.lr.head", o.lr.head)
    _number("optim.weight_decay", o.weight_decay)
    # every algorithm's momentum coefficients, whichever runs: a bad value is a typo either way
    for key in ("beta1", "beta2", "momentum"):
        _number(f"optim.{key}", getattr(o, key), high=1.0)
    if len(o.adam_betas) != 2:
        raise ConfigError(f"optim.adam_betas must be two numbers [beta1, beta2], got {o.adam_betas!r}")
    for i, beta in enumerate(o.adam_betas):
        _number(f"optim.adam_betas[{i}]", beta, high=1.0)
    _number("optim.adam_eps", o.adam_eps, positive=True)
    _number("optim.clip_grad_norm", o.clip_grad_norm)
    if o.estimate_every < 1:
        raise ConfigError(f"optim.estimate_every must be >= 1, got {o.estimate_every}")
    if o.ns_steps < 1:
        raise ConfigError(f"optim.ns_steps must be >= 1, got {o.ns_steps}")
    if o.alpha_mode not in ALPHA_MODES:
        raise ConfigError(f"optim.alpha_mode must be one of {ALPHA_MODES}, got {o.alpha_mode!r}")
    if o.option not in ("I", "II"):
        raise ConfigError(f"optim.option must be 'I' or 'II', got {o.option!r}")
    if o.ns_split_tolerance is not None:
        _number("optim.ns_split_tolerance", o.ns_split_tolerance)
        if o.name == "adamw":
            raise ConfigError("optim.ns_split_tolerance splits the hidden matrices' Newton–Schulz: optim.name adamw runs none")


def _check_train(t: TrainConfig) -> None:
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if t.global_batch < 1:
        raise ConfigError(f"train.global_batch must be >= 1, got {t.global_batch}")
    for name in ("micro_batch", "eval_every", "eval_batches", "checkpoint_every", "stop_after", "max_consecutive_skips"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("log_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.stop_after > t.steps:
        raise ConfigError(f"train.stop_after ({t.stop_after}) cannot exceed train.steps ({t.steps})")
    _number("train.loss_spike_factor", t.loss_spike_factor)
    if 0 < t.loss_spike_factor <= 1:
        raise ConfigError(f"train.loss_spike_factor must be 0 (off) or > 1, got {t.loss_spike_factor}")
    if t.loss_spike_window < 1:
        raise ConfigError(f"train.loss_spike_window must be >= 1, got {t.loss_spike_window}")
    if t.dtype not in DTYPES:
        raise ConfigError(f"train.dtype must be one of {DTYPES}, got {t.dtype!r}")
    if t.device not in DEVICES:
        raise ConfigError(f"train.device must be one of {DEVICES}, got {t.device!r}")
    if t.device == "cuda":
        import torch  # only here: the rest of the checks stay torch-free

        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but this machine has no usable CUDA device (torch.cuda.is_available() "
                              f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda}): set train.device "
                              "auto or cpu")


def _check_data(d: DataConfig, model: ModelConfig) -> None:
    if d.seq_len < 1:
        raise ConfigError(f"data.seq_len must be >= 1, got {d.seq_len}")
    if d.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len {d.seq_len} exceeds model.max_seq_len {model.max_seq_len}")
    if d.source in ("indexed", "megatron"):
        _number("data.val_fraction", d.val_fraction, high=1.0)
        if not d.path:
            raise ConfigError(f"data.path is required for data.source {d.source}: the prefix of an indexed dataset "
                              "(<path>.bin / <path>.idx)")
        missing = [d.path + ext for ext in (".bin", ".idx") if not os.path.exists(d.path + ext)]
        if missing:
            raise ConfigError(f"data.path {d.path!r}: {' and '.join(missing)} does not exist "
                              "(give the prefix of the indexed dataset, without extension)")
        return
    if not (math.isfinite(d.val_fraction) and 0.0 < d.val_fraction < 1.0):
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction!r}")
    if d.source in ("text", "jsonl"):
        if not d.path:
            raise ConfigError(f"data.path is required for data.source {d.source}: a file, a directory or a glob")
        if not (os.path.exists(d.path) or glob.glob(d.path)):
            raise ConfigError(f"data.path {d.path!r} does not exist and matches no file")
        if d.sample_by not in SAMPLE_BY:
            raise ConfigError(f"data.sample_by must be one of {SAMPLE_BY}, got {d.sample_by!r}")
        if d.source == "jsonl" and d.sample_by not in ("auto", "document"):
            raise ConfigError(f"data.sample_by {d.sample_by!r} is for text files; a JSONL line is one document")
        if d.tokenizer and not os.path.isfile(d.tokenizer):
            raise ConfigError(f"data.tokenizer {d.tokenizer!r} does not exist (a Hugging Face tokenizer.json; empty: byte tokens)")
        if d.tokenizer and importlib.util.find_spec("tokenizers") is None:
            raise ConfigError(f"data.tokenizer {d.tokenizer}: reading a tokenizer.json needs the 'tokenizers' package "
                              "(pip install 'lanton_dist[data]'); leave data.tokenizer empty for byte tokens")
    elif d.path:
        raise ConfigError(f"data.path is not read by data.source {d.source!r} (built-in corpus)")


def _check_parallel(cfg: RunConfig, data_parallel: int) -> None:
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    if p.backend not in TRAINER_BACKENDS:
        raise ConfigError(f"parallel.backend must be one of {TRAINER_BACKENDS}, got {p.backend!r}")
    for name in ("tp", "pp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    _number("parallel.bucket_mb", p.bucket_mb, positive=True)
    _number("parallel.timeout_s", p.timeout_s, positive=True)
    if not t.compile_backend:
        raise ConfigError("train.compile_backend must name a torch.compile backend (e.g. inductor), got ''")
    for key in ("activation_checkpointing", "compile"):
        if getattr(t, key) and p.backend == "megatron":
            raise ConfigError(f"train.{key} applies to lanton_dist's Transformer; parallel.backend megatron builds "
                              "Megatron-core's GPTModel: set it false")
    if o.ns_split_tolerance is not None and p.backend != "zero":
        raise ConfigError(f"optim.ns_split_tolerance is implemented by the zero engine only, not parallel.backend {p.backend!r}")
    if p.backend == "deepspeed":
        if p.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3 for the deepspeed backend, got {p.zero_stage}")
        if o.name == "lanton" and o.option == "II":
            raise ConfigError("optim.option II needs the two half-batch gradients separately, but DeepSpeed "
                              "accumulates micro-batch gradients internally: use optim.option I with parallel.backend deepspeed")
    if t.global_batch % data_parallel:
        raise ConfigError(f"train.global_batch {t.global_batch} is not divisible by the data-parallel size {data_parallel}")
    rows = t.global_batch // data_parallel
    halves = 2 if o.name == "lanton" and o.option == "II" else 1
    if rows % halves:
        raise ConfigError(f"optim.option II splits each rank's batch in two halves, but train.global_batch "
                          f"{t.global_batch} / {data_parallel} ranks = {rows} rows (odd): use an even per-rank batch")
    if t.micro_batch and (rows // halves) % min(t.micro_batch, rows // halves):
        what = "half-batch" if halves == 2 else "per-rank batch"
        raise ConfigError(f"train.micro_batch {t.micro_batch} does not divide the {rows // halves} rows of each {what}")


def check_run_config(cfg: RunConfig, data_parallel: int = 1) -> None:
    """Raise :class:`ConfigError`, naming the key, for a config no entry can train: numbers
    out of range (non-finite or negative rates and weight decay, momentum coefficients outside
    ``[0, 1)`` for every algorithm), an Option II batch that does not split in two on each of
    the ``data_parallel`` ranks, a missing Megatron ``data.path``, ``logging.tensorboard``
    without the package, ``train.device cuda`` without a GPU, a missing ``data.tokenizer``. Cheap
    and torch-free (but for ``train.device cuda``): the loop calls it before building a model or
    a process group."""
    check_model_config(cfg.model)
    _check_train(cfg.train)
    _check_data(cfg.data, cfg.model)
    _check_optim(cfg.optim)
    if cfg.schedule.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps must be >= 0, got {cfg.schedule.warmup_steps}")
    _number("schedule.min_ratio", cfg.schedule.min_ratio, high=1.0, open_high=False)
    _number("logging.peak_tflops", cfg.logging.peak_tflops, high=None)
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard is true but the tensorboard package is not installed: "
                          "pip install 'lanton-dist[tensorboard]' (or set logging.tensorboard false)")
    _check_parallel(cfg, data_parallel)


# ============================================================================ resume compatibility
#: Entries a resumed run must share with the checkpoint it continues (its state depends on them).
RESUME_MUST_MATCH: tuple[str, ...] = (
    "model", "data", "optim", "train.global_batch", "train.seed", "parallel.backend", "parallel.tp", "parallel.pp",
)
#: Entries a resumed run may change, with a warning: a longer run or a new schedule from the
#: checkpoint's step on (as Megatron's ``--train-iters`` / ``--lr-decay-iters`` on resume).
RESUME_MAY_CHANGE: tuple[str, ...] = ("train.steps", "schedule")


def _dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return "<absent>"
        d = d[part]
    return d


def _unused_sample_by_ignored(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (:func:`to_dict` form) with the default ``data.sample_by`` where its source does not
    read it (every source but ``text``; checkpoints from before ``auto`` store ``document``)."""
    data = cfg.get("data", {})
    return cfg if data.get("source") == "text" else {**cfg, "data": {**data, "sample_by": DataConfig.sample_by}}


def check_resume(saved: dict[str, Any], current: dict[str, Any], where: str) -> list[str]:
    """Compare the config stored with checkpoint ``where`` (``saved``) with this run's
    (``current``, both :func:`to_dict` form). Raise :class:`ConfigError` listing every
    :data:`RESUME_MUST_MATCH` entry that differs; return one warning per
    :data:`RESUME_MAY_CHANGE` entry that does. Keys added after the checkpoint was written
    take their defaults there (a checkpoint that predates a key ran with its default).
    ``data.sample_by`` is compared for ``text`` sources only, the one source that reads it."""
    saved = _unused_sample_by_ignored(_merge(to_dict(RunConfig()), saved))
    current = _unused_sample_by_ignored(current)

    def diff(keys: tuple[str, ...]) -> list[str]:
        return [f"{k}: checkpoint {_dotted(saved, k)!r}, now {_dotted(current, k)!r}"
                for k in keys if _dotted(saved, k) != _dotted(current, k)]

    errors = diff(RESUME_MUST_MATCH)
    if errors:
        raise ConfigError(f"cannot resume from {where}: the run config differs from the checkpoint's in "
                          + "; ".join(errors) + " (start a new train.out_dir, or resume with the checkpoint's values)")
    return [f"resume from {where} with a changed {d} (allowed: the schedule from the checkpoint's step on follows it)"
            for d in diff(RESUME_MAY_CHANGE)]
