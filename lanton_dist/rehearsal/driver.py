"""The per-rank driver: build the real optimizer as one rank of a fake world, step it, measure.

:func:`run_rank` runs in its own process (:mod:`.worker`; one default process group per
process) as rank ``spec.rank`` of ``spec.world``: it loads the run config exactly as training
does, builds the model on ``meta`` (:mod:`.fakeworld`), builds the optimizer the way the
training backend does (:mod:`.stacks`, per ``parallel.backend``), and runs ``spec.steps``
steps, each with gradients from the stack's ``backward`` (values are not modelled).

It returns, JSON-able (:class:`RankResult`): construction seconds; optimizer host
milliseconds per step (``opt.step()`` wall time: on meta no kernel runs, so this is the
host-side work of the step); bytes held by kind (:meth:`.stacks.Stack.held`, plus the
peaks: Option I's previous gradient, Option II's half buffer, the early owner steps); every metered
collective per step (step 0 = construction) as the meter's record fields; the count of
skip-vote host reads the seam answered per step; and digests of the objects given to
``all_gather_object``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lanton_dist.config import RunConfig, load_run_config
from lanton_dist.engine.meter import CommMeter, CommRecord
from lanton_dist.rehearsal.fakeworld import gathered_objects, init_fake_world, meta_skip_vote, nccl_all_to_all
from lanton_dist.rehearsal.stacks import reachable_bytes, stack_for


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
    position: list[int] = field(default_factory=lambda: [0, 0, 0])   # (pipeline stage, DP rank, TP rank)

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


def run_rank(spec: RankSpec) -> RankResult:
    """Rehearse rank ``spec.rank`` of ``spec.world`` in this process (module doc). Initialises
    the default process group: call once per process."""
    if spec.steps < 3:
        raise ValueError(f"rehearse: at least 3 steps are needed (plain, estimation, after), got {spec.steps}")
    cfg = rehearsal_config(spec)
    stack = stack_for(cfg)
    init_fake_world(spec.rank, spec.world)
    model = stack.make_model(cfg)
    meter = _StepMeter()
    with gathered_objects(lambda: stack.peers) as objects, meta_skip_vote() as votes, nccl_all_to_all():
        started = time.perf_counter()
        opt = stack.build(cfg, model, meter)
        construction_s = time.perf_counter() - started
        step_ms, reads, mem = [], [], {"early_peak_extra": 0, "prev_grad": 0, "buffers_peak_extra": 0}
        before = reachable_bytes(opt.core, set(), set())
        for _ in range(spec.steps):
            halves = opt.needs_two_half_batches()
            if halves:
                stack.backward(model)
                opt.stash_half_gradient()
            stack.backward(model)
            grads = stack.grad_storages(model, opt)
            mem["early_peak_extra"] = max(mem["early_peak_extra"], reachable_bytes(opt.core, set(), set()) - before)
            # Option II's stashed half buffer, held until the step (the one transient buffer)
            pre = reachable_bytes(opt, {id(opt.core)}, set(stack.param_storages(model, opt)) | set(grads)) if halves else 0
            n = len(votes.reads)
            t0 = time.perf_counter()
            opt.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
            reads.append(len(votes.reads) - n)
            held = stack.held(opt, model, grads)
            mem["buffers_peak_extra"] = max(mem["buffers_peak_extra"], pre - held["buffers"] if halves else 0)
            mem["prev_grad"] = max(mem["prev_grad"], held.pop("prev_grad"))
            for k, v in held.items():   # the most held after any step (steady kinds hold the same after each)
                mem[k] = max(mem.get(k, 0), v)
            opt.zero_grad(set_to_none=True)
            before = reachable_bytes(opt.core, set(), set())
    records = [meter.steps.get(s, []) for s in range(spec.steps + 1)]
    return RankResult(spec.rank, spec.world, construction_s, step_ms, mem, records, reads, list(objects),
                      list(stack.position(spec.world)))
