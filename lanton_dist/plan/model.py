"""The model side of the plan: a preset, YAML or :class:`ModelConfig` resolved to the parameter
list of :class:`lanton_dist.model.Transformer` (without building it: a 70B model need not fit),
and how Megatron's tensor and pipeline parallelism cut that list."""
from __future__ import annotations

from pathlib import Path

from lanton_dist.config import ModelConfig, check_model_config, from_dict, load_yaml
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.plan.inputs import PRESETS


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

