"""The per-rank driver: build the real optimizer as one rank of a fake world, step it, measure.

:func:`run_rank` runs in its own process (:mod:`.worker`; one default process group per
process) as rank ``spec.rank`` of ``spec.world``: it loads the run config exactly as training
does, builds the model on ``meta`` (:mod:`.fakeworld`), builds the optimizer the way the
training backend does (``zero``: :func:`lanton_dist.engine.build_sharded_optimizer` with
``overlap_grad_reduce=True``, as :func:`lanton_dist.backends.setup_distributed_backend`), and runs
``spec.steps`` steps. A step's gradients come from ``Σ p.sum()`` over the parameters: one
backward on meta that fires every gradient hook (bucket launches, early owner steps) in the
model's reverse order; values are not modelled.

It returns, JSON-able (:class:`RankResult`): construction seconds; optimizer host
milliseconds per step (``opt.step()`` wall time: on meta no kernel runs, so this is the
host-side work of the step); bytes held by kind (:func:`held_bytes`); every metered
collective per step (step 0 = construction) as the meter's record fields; the count of
skip-vote host reads the seam answered per step; and digests of the objects given to
``all_gather_object``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from lanton_dist.config import RunConfig, load_run_config
from lanton_dist.engine.meter import CommMeter, CommRecord
from lanton_dist.rehearsal.fakeworld import gathered_objects, init_fake_world, meta_model, meta_skip_vote

#: Stacks the driver can build (``parallel.backend`` values).
STACKS: tuple[str, ...] = ("zero",)


@dataclass(frozen=True)
class RankSpec:
    """What one rank process rehearses: the run config (path or None for the defaults) with
    ``overrides`` (``--section.key=value`` as on the training command line), the world and this
    rank, the number of optimizer steps (≥ 3) and ``model``: a planner preset
    (:data:`lanton_dist.plan.PRESETS`) replacing the config's ``model:`` section, or None."""

    config: str | None
    overrides: tuple[str, ...]
    world: int
    rank: int
    steps: int = 3
    model: str | None = None


@dataclass
class RankResult:
    """One rank's measurements (module doc). ``collectives[s]``: the records of step ``s`` as
    ``[op, phase, group, group_size, numel, elem_size, tensor_bytes, sent_bytes]``."""

    rank: int
    world: int
    construction_s: float
    step_ms: list[float]
    memory: dict[str, int]
    collectives: list[list[list[Any]]]
    skip_vote_reads: list[int]
    object_digests: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rehearsal_config(spec: RankSpec) -> RunConfig:
    """The run config as training would load it, with the rehearsal's two adjustments:
    ``estimate_every`` capped at 2 (so 3 steps hold a plain step, an estimation step and the
    step after it; records do not otherwise depend on k) and ``nuclear_estimator: auto``
    resolved as on a GPU (``ns``; on a meta/CPU device ``auto`` would pick ``exact``); the
    ``model`` preset, if given."""
    cfg = load_run_config(spec.config, list(spec.overrides))
    if spec.model is not None:
        from lanton_dist.plan import PRESETS

        if spec.model not in PRESETS:
            raise ValueError(f"unknown model preset {spec.model!r}; choose one of {sorted(PRESETS)}")
        cfg.model = replace(PRESETS[spec.model])
    cfg.optim.estimate_every = min(cfg.optim.estimate_every, 2)
    if cfg.optim.nuclear_estimator == "auto":
        cfg.optim.nuclear_estimator = "ns"
    return cfg


class _StepMeter(CommMeter):
    """A meter that also keeps this rehearsal's own per-step record lists (whatever the
    engine's meter keeps or forgets)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, list[list[Any]]] = {}

    def add(self, record: CommRecord) -> None:
        super().add(record)
        self.steps.setdefault(record.step, []).append(
            [record.op, record.phase, record.group, record.group_size, record.numel, record.elem_size,
             record.tensor_bytes, record.sent_bytes])


def _storage_bytes(tensors: Any) -> dict[int, int]:
    """``{storage id: bytes}`` of distinct storages (meta storages have no data pointer: the id
    of the storage object itself, shared by views)."""
    out = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            out[st._cdata] = st.nbytes()
    return out


def reachable_bytes(root: Any, skip: set[int], skip_storages: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through attributes, dicts
    and sequences of lanton_dist objects (objects in ``skip`` and storages in
    ``skip_storages`` left out)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        x = stack.pop()
        if id(x) in seen or id(x) in skip:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            storages.update({k: v for k, v in _storage_bytes([x]).items() if k not in skip_storages})
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type) and type(x).__module__.startswith(("lanton_dist", "collections")):
            stack += list(vars(x).values())
    return sum(storages.values())


def held_bytes(opt: Any, model: torch.nn.Module, grads: dict[int, int]) -> dict[str, int]:
    """Bytes one ZeRO-engine rank holds after a step: ``parameters`` (the parameter bucket
    buffer and own copies), ``gradients`` (``grads``, measured after backward, and the gradient
    buffer), ``buffers`` (any other storage the optimizer reaches, the core apart), ``state``
    (the core's per-piece state without ``prev_grad``, plus its trackers ``H``, ``F``) and
    ``prev_grad`` (Option I's previous gradient, held before estimation steps)."""
    params = _storage_bytes([*model.parameters(), opt.storage.param_buffer])
    grads = grads | _storage_bytes([opt.storage.grad_buffer])
    core = opt.core
    state = sum(t.untyped_storage().nbytes() for st in core.state.values() for k, t in st.items() if k != "prev_grad")
    prev = sum(t.untyped_storage().nbytes() for st in core.state.values() for k, t in st.items() if k == "prev_grad")
    return {"parameters": sum(params.values()), "gradients": sum(grads.values()),
            "buffers": reachable_bytes(opt, {id(core)}, set(params) | set(grads)),
            "state": state + core.H.untyped_storage().nbytes() + core.F.untyped_storage().nbytes(), "prev_grad": prev}


def _backward(model: torch.nn.Module) -> None:
    """One backward that gives every parameter a gradient (values not modelled)."""
    sum(p.sum() for p in model.parameters()).backward()


def _build(cfg: RunConfig, model: torch.nn.Module, meter: CommMeter) -> Any:
    if cfg.parallel.backend != "zero":
        raise ValueError(f"rehearse: parallel.backend {cfg.parallel.backend!r} is not rehearsed yet; "
                         f"choose one of {STACKS} (e.g. the override parallel.backend=zero)")
    from lanton_dist.engine import build_sharded_optimizer

    return build_sharded_optimizer(model, cfg.optim, bucket_mb=cfg.parallel.bucket_mb, overlap=cfg.parallel.overlap,
                                   meter=meter, overlap_grad_reduce=True)


def run_rank(spec: RankSpec) -> RankResult:
    """Rehearse rank ``spec.rank`` of ``spec.world`` in this process (module doc). Initialises
    the default process group: call once per process."""
    if spec.steps < 3:
        raise ValueError(f"rehearse: at least 3 steps are needed (plain, estimation, after), got {spec.steps}")
    cfg = rehearsal_config(spec)
    init_fake_world(spec.rank, spec.world)
    model = meta_model(cfg.model)
    meter = _StepMeter()
    with gathered_objects() as objects, meta_skip_vote() as votes:
        started = time.perf_counter()
        opt = _build(cfg, model, meter)
        construction_s = time.perf_counter() - started
        step_ms, reads, mem = [], [], {"early_peak_extra": 0, "prev_grad": 0, "buffers_peak_extra": 0}
        before = reachable_bytes(opt.core, set(), set())
        for _ in range(spec.steps):
            if opt.needs_two_half_batches():
                _backward(model)
                opt.stash_half_gradient()
            _backward(model)
            grads = _storage_bytes([p.grad for p in model.parameters()])
            mem["early_peak_extra"] = max(mem["early_peak_extra"], reachable_bytes(opt.core, set(), set()) - before)
            pre = reachable_bytes(opt, {id(opt.core)}, set(_storage_bytes([opt.storage.param_buffer])) | set(grads)
                                  | set(_storage_bytes([opt.storage.grad_buffer])))
            n = len(votes.reads)
            t0 = time.perf_counter()
            opt.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
            reads.append(len(votes.reads) - n)
            held = held_bytes(opt, model, grads)
            mem["buffers_peak_extra"] = max(mem["buffers_peak_extra"], pre - held["buffers"])
            mem["prev_grad"] = max(mem["prev_grad"], held.pop("prev_grad"))
            for k, v in held.items():
                if mem.setdefault(k, v) != v:
                    raise RuntimeError(f"rehearse: rank {spec.rank}: {k} changed between steps ({mem[k]} → {v} bytes)")
            opt.zero_grad(set_to_none=True)
            before = reachable_bytes(opt.core, set(), set())
    records = [meter.steps.get(s, []) for s in range(spec.steps + 1)]
    return RankResult(spec.rank, spec.world, construction_s, step_ms, mem, records, reads, list(objects))
