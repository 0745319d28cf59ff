"""The stacks of the contract test (``tests/test_contract.py``): one small object per backend.

A :class:`Stack` says how one backend trains the contract's model on one rank: ``build`` returns
a :class:`Runner` (model + optimizer through the backend's public builder) that trains global
steps ``[start, stop)`` on this rank's share of the batch, returns the whole logical parameters
(the same on every rank), and saves / loads the backend's own checkpoint. :func:`contract_job`
drives every run of one stack in one spawned job (process start-up dominates on 2 cores).

Every stack's set-up lives in its ``_build_*`` function here and nowhere else; only public entry
points are used (``build_sharded_optimizer``, ``LANTONFSDP2``, ``integrations.deepspeed.initialize``,
``lanton_oss``, ``build_megatron_optimizer``, the checkpoint functions).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from engine_cases import GLOBAL_BATCH, backward_step, batches, loss_fn, make_model, reference_run, rows
from lanton_dist.config import OptimConfig
from lanton_dist.groups import classify_parameters

STEPS = 10
SAVE_AT = 4  # the resume case saves after this many steps (a deferred variance is in flight then)


@dataclass(frozen=True)
class Run:
    """One optimizer configuration every stack trains for :data:`STEPS` steps.

    ``overlap``: the backend's overlapped (deferred) variance all-reduce, whose factors apply one
    step late: compared with the reference run with ``delay_lr_factor=True``. ``halves_of``
    (one-process Megatron reference only): Option II's halves as that many data-parallel
    replicas cut them (each replica halves its own rows)."""

    name: str
    estimate_every: int = 3
    option: str = "I"
    overlap: bool = False
    halves_of: int = 1

    @property
    def key(self) -> str:
        return (f"{self.name}-{self.option}-k{self.estimate_every}" + ("-overlap" if self.overlap else "")
                + (f"-halves{self.halves_of}" if self.halves_of > 1 else ""))

    def optim(self) -> OptimConfig:
        return OptimConfig(name=self.name, option=self.option, estimate_every=self.estimate_every,
                           nuclear_estimator="exact")


ALGORITHMS = ("lanton", "scion", "dmuon", "adamw")
RUNS = (Run("lanton"), Run("lanton", estimate_every=1, overlap=True), Run("scion"), Run("dmuon"), Run("adamw"))
OPTION_TWO = Run("lanton", estimate_every=2, option="II", overlap=True)
# Resumed runs: each saves at SAVE_AT, a fresh model and optimizer (built in the same job: no second
# spawn) load it and train to STEPS; the result must equal the uninterrupted run bit for bit.
RESUMED = (Run("lanton", estimate_every=1, overlap=True), Run("dmuon"))


def meter_records(meter) -> list[tuple]:
    """A :class:`~lanton_dist.engine.meter.CommMeter`'s records as picklable tuples (``None``: none)."""
    return [] if meter is None else [(r.step, r.op, r.phase, r.group, r.group_size, r.numel, r.elem_size,
                                      r.sent_bytes) for r in meter.records]


class Runner:
    """One model + optimizer of a stack on this rank (see module doc)."""

    optimizer: object

    def train(self, start: int, stop: int) -> None:
        raise NotImplementedError

    def params(self) -> dict[str, torch.Tensor]:
        """Whole logical parameters by name, the same on every rank."""
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Checkpoint into the (existing, shared) directory ``path``; collective."""
        raise NotImplementedError

    def load(self, path: str) -> None:
        raise NotImplementedError

    def logical_matrices(self) -> int:
        """Logical matrices Newton–Schulz orthogonalises per step in this rank's model."""
        return hidden_matrices()

    @property
    def adapter(self) -> str:
        """The class that runs the algorithm's arithmetic on this stack."""
        return type(self.optimizer).__name__

    def traffic(self) -> list[tuple]:
        """``(step, op, phase, group, group size, numel, element size, sent bytes)`` of every
        collective the optimizer's meter recorded (empty for an unmetered one-process optimizer)."""
        return meter_records(getattr(self.optimizer, "meter", None))


@dataclass(frozen=True)
class Stack:
    """A backend as the contract sees it.

    ``build(rank, world, run, dtype)`` → :class:`Runner`; ``session(rank, world)`` wraps the whole job
    (process-wide set-up such as Megatron's parallel state); ``requires``: the module the stack
    needs (skip when absent); ``option_two``: the backend runs LANTON's Option II (else it refuses
    it, which its own test file checks); ``resume``: run the :data:`RESUMED` cases; ``replicas``:
    the data-parallel replicas that halve Option II's batch (Megatron; the plain stacks: world);
    ``extra``: more runs (the Megatron reference's Option II as 2 replicas halve the batch)."""

    name: str
    world: int
    dtype: torch.dtype
    build: Callable[[int, int, Run, torch.dtype], Runner]
    requires: str | None = None
    option_two: bool = False
    resume: bool = True
    session: Callable[[int, int], contextlib.AbstractContextManager] = field(default=lambda rank, world: contextlib.nullcontext())
    timeout_s: float = 300.0
    replicas: int = 1
    extra: tuple[Run, ...] = ()

    def runs(self) -> tuple[Run, ...]:
        return RUNS + ((OPTION_TWO,) if self.option_two else ()) + self.extra


@contextlib.contextmanager
def count_newton_schulz() -> Iterator[list[int]]:
    """Patch ``lanton_dist.lmo.newton_schulz`` to record how many matrices each call orthogonalises."""
    import lanton_dist.lmo as lmo

    calls: list[int] = []
    real = lmo.newton_schulz

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0] if x.ndim == 3 else 1)
        return real(x, *args, **kwargs)

    lmo.newton_schulz = counting
    try:
        yield calls
    finally:
        lmo.newton_schulz = real


def contract_job(rank: int, world: int, name: str, tmp: str) -> dict:
    """Every run of the stack called ``name`` on this rank: ``{"runs": {key: params}, "ns": {key: matrices
    orthogonalised here}, "optimizer": {key: class name}, "traffic": {key: Runner.traffic()},
    "resumed": {key: params}, "matrices": logical matrices of this rank's model}``."""
    stack = STACKS[name]
    out: dict = {"runs": {}, "ns": {}, "optimizer": {}, "traffic": {}, "resumed": {}}
    with stack.session(rank, world):
        for run in stack.runs():
            with count_newton_schulz() as calls:
                runner = stack.build(rank, world, run, stack.dtype)
                runner.train(0, STEPS)
            out["runs"][run.key], out["ns"][run.key] = runner.params(), sum(calls)
            out["optimizer"][run.key] = runner.adapter
            out["traffic"][run.key] = runner.traffic()
            out["matrices"] = runner.logical_matrices()
        for run in RESUMED if stack.resume else ():
            path = os.path.join(tmp, stack.name, run.key)
            os.makedirs(path, exist_ok=True)
            first = stack.build(rank, world, run, stack.dtype)
            first.train(0, SAVE_AT)
            first.save(path)
            resumed = stack.build(rank, world, run, stack.dtype)
            resumed.load(path)
            resumed.train(SAVE_AT, STEPS)
            out["resumed"][run.key] = resumed.params()
    return out


def hidden_matrices() -> int:
    """Logical matrices Newton–Schulz orthogonalises per step in the contract's LLaMA."""
    return sum(len(s.blocks) for s in classify_parameters(make_model()).values() if s.geometry.value == "hidden")


def reference(run: Run, world: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Single-process parameters after :data:`STEPS` steps of ``run`` on the global batches."""
    return reference_run(run.optim(), STEPS, world, dtype, delay=run.overlap)


# ---------------------------------------------------------------------------------- plain-model stacks
class _LocalBatches(Runner):
    """A replicated-model stack: ``forward_backward(x)`` on this rank's rows, then its own step."""

    def __init__(self, rank: int, world: int, model, optimizer) -> None:
        self.rank, self.world, self.model, self.optimizer = rank, world, model, optimizer

    def train(self, start: int, stop: int) -> None:
        for x in batches(STEPS)[start:stop]:
            self.step(rows(x, self.rank, self.world))

    def step(self, x: torch.Tensor) -> None:
        backward_step(self.model, self.optimizer, x)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


class _Engine(_LocalBatches):
    def save(self, path: str) -> None:
        from lanton_dist.engine import checkpoint

        checkpoint.save(self.optimizer, path, self.model)

    def load(self, path: str) -> None:
        from lanton_dist.engine import checkpoint

        checkpoint.load(self.optimizer, path, self.model)


def _build_engine(rank: int, world: int, run: Run, dtype: torch.dtype) -> Runner:
    from lanton_dist.engine import build_sharded_optimizer

    model = make_model(dtype)
    return _Engine(rank, world, model, build_sharded_optimizer(model, run.optim(), overlap=run.overlap))


class _FSDP2(_LocalBatches):
    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().clone() for n, p in self.model.named_parameters()}

    def save(self, path: str) -> None:
        self.optimizer.save(path, self.model)

    def load(self, path: str) -> None:
        self.optimizer.load(path, self.model)


def _build_fsdp2(rank: int, world: int, run: Run, dtype: torch.dtype) -> Runner:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    mesh = init_device_mesh("cpu", (world,))
    model = make_model(dtype)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LANTONFSDP2(model, run.optim(), overlap=run.overlap, defer_variance=run.overlap, bucket_mb=0.005)
    return _FSDP2(rank, world, model, opt)


class _Fairscale(_LocalBatches):
    """OSS with torch DDP averaging the gradients; checkpoints are OSS's consolidated state dict.

    ``find_unused_parameters=True`` keeps DDP's gradient buckets as first built: by default DDP
    rebuilds them after its first iteration, so a resumed run's first step would all-reduce in
    other buckets than the uninterrupted run's and, on 3 ranks, sum in another order (1e-17 apart
    in fp64, 5e-6 after 6 fp32 steps — measured; on 2 ranks a + b is order-free)."""

    def __init__(self, rank: int, world: int, model, optimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(rank, world, model, optimizer)
        self.ddp = DistributedDataParallel(model, find_unused_parameters=True)

    @property
    def adapter(self) -> str:
        return type(self.optimizer.optim).__name__  # OSS wraps LANTON's shard optimizer

    def traffic(self) -> list[tuple]:
        return meter_records(self.optimizer.optim.meter)

    def step(self, x: torch.Tensor) -> None:
        loss_fn(self.ddp, x).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def save(self, path: str) -> None:
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        if self.rank == 0:
            torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}, os.path.join(path, "oss.pt"))
        torch.distributed.barrier()

    def load(self, path: str) -> None:
        sd = torch.load(os.path.join(path, "oss.pt"), weights_only=False)
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optim"])


def _build_fairscale(rank: int, world: int, run: Run, dtype: torch.dtype) -> Runner:
    from lanton_dist.integrations.fairscale import lanton_oss

    model = make_model(dtype)
    return _Fairscale(rank, world, model, lanton_oss(model, run.optim(), overlap=run.overlap))


class _DeepSpeed(Runner):
    """A DeepSpeed engine (ZeRO ``stage``) with the LANTON client optimizer; ``save_checkpoint``."""

    def __init__(self, rank: int, world: int, stage: int, engine, optimizer) -> None:
        self.rank, self.world, self.stage, self.engine, self.optimizer = rank, world, stage, engine, optimizer

    def train(self, start: int, stop: int) -> None:
        for x in batches(STEPS)[start:stop]:
            self.engine.backward(loss_fn(self.engine, rows(x, self.rank, self.world)))
            self.engine.step()

    def params(self) -> dict[str, torch.Tensor]:
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.stage == 3):
            return {n: p.detach().clone() for n, p in params.items()}

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="contract")

    def load(self, path: str) -> None:
        self.engine.load_checkpoint(path, tag="contract")


def _deepspeed_builder(stage: int) -> Callable[[int, int, Run, torch.dtype], Runner]:
    def build(rank: int, world: int, run: Run, dtype: torch.dtype) -> Runner:
        from lanton_dist.integrations.deepspeed import initialize

        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
        engine, opt = initialize(make_model(dtype), run.optim(), config, bucket_mb=0.005,
                                 overlap=run.overlap, defer_variance=run.overlap)
        return _DeepSpeed(rank, world, stage, engine, opt)

    return build


# ---------------------------------------------------------------------------------- Megatron
# Megatron's model, data and forward/backward come from tests/test_megatron_lanton.py (shared with
# tests/test_missing_gradients.py); its weights are a function of the global parameter name, so
# every TP × PP layout and the one-process reference start from the same logical model.
def megatron_cfg(run: Run, tp: int, pp: int, reference: bool = False):
    """The Megatron run config of ``run``; ``reference``: the one-process optimizer's config
    (``delay_lr_factor`` where the sharded run overlaps the variance)."""
    from test_megatron_lanton import OPTIM
    from test_megatron_model import tiny_cfg

    overrides = {**OPTIM, "optim__name": run.name, "optim__estimate_every": run.estimate_every,
                 "optim__option": run.option, "parallel__overlap": str(run.overlap and not reference).lower(),
                 "optim__delay_lr_factor": str(run.overlap and reference).lower()}
    return tiny_cfg(parallel__tp=tp, parallel__pp=pp, **overrides)


class _Megatron(Runner):
    def __init__(self, model, optimizer, cfg, halves_of: int = 1) -> None:
        self.model, self.optimizer, self.cfg, self.halves_of = model, optimizer, cfg, halves_of

    def train(self, start: int, stop: int) -> None:
        from test_megatron_lanton import _train

        _train(self.cfg, stop, start=start, opt=self.optimizer, model=self.model, halves_of=self.halves_of)

    def params(self) -> dict[str, torch.Tensor]:
        from test_megatron_lanton import _logical_params

        return _logical_params(self.model, self.cfg)

    def save(self, path: str) -> None:
        from test_megatron_lanton import _model_tensors

        from lanton_dist.engine import checkpoint

        checkpoint.save(self.optimizer, path, extra=_model_tensors(self.model, self.cfg))

    def load(self, path: str) -> None:
        from test_megatron_lanton import _load_model_tensors, _model_tensors

        from lanton_dist.engine import checkpoint

        extra = _model_tensors(self.model, self.cfg)
        checkpoint.load(self.optimizer, path, extra=extra)
        _load_model_tensors(self.model, self.cfg, extra)
        self.optimizer.sync_from_model()

    def logical_matrices(self) -> int:
        from lanton_dist.groups import Geometry
        from lanton_dist.integrations import megatron_model as mm

        return sum(len(i.spec.blocks) for i in mm.logical_param_specs(self.model, self.cfg).values()
                   if i.spec.geometry is Geometry.HIDDEN)


def _megatron_builder(tp: int, pp: int) -> Callable[[int, int, Run, torch.dtype], Runner]:
    """TP × PP (DP = world / (TP·PP)); ``tp = pp = 1`` at world 1 is the one-process reference
    optimizer (``lanton_dist.build_optimizer`` on the logical ParamSpecs)."""

    def build(rank: int, world: int, run: Run, dtype: torch.dtype) -> Runner:
        from test_megatron_lanton import canonical_init

        from lanton_dist.integrations import megatron_model as mm
        from lanton_dist.integrations.megatron import build_megatron_optimizer
        from lanton_dist.megatron_backend import make_optimizer

        cfg = megatron_cfg(run, tp, pp, reference=world == 1)
        model = mm.build_gpt_model(cfg)
        canonical_init(model, cfg)
        opt = make_optimizer(model, cfg) if world == 1 else build_megatron_optimizer(model, cfg)
        return _Megatron(model, opt, cfg, run.halves_of)

    return build


def _megatron_session(tp: int, pp: int) -> Callable[[int, int], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def session(rank: int, world: int) -> Iterator[None]:
        from lanton_dist.integrations import megatron_cpu
        from lanton_dist.integrations import megatron_model as mm

        megatron_cpu.install()
        try:
            mm.initialize_model_parallel(megatron_cfg(Run("lanton"), tp, pp))
            yield
        finally:
            mm.destroy_model_parallel()
            megatron_cpu.uninstall()

    return session


def megatron_stack(name: str, world: int, tp: int, pp: int, resume: bool = True, extra: tuple[Run, ...] = ()) -> Stack:
    return Stack(name, world, torch.float32, _megatron_builder(tp, pp), requires="megatron.core", option_two=True,
                 resume=resume, session=_megatron_session(tp, pp), replicas=world // (tp * pp), extra=extra)


# ---------------------------------------------------------------------------------- the stacks
STACKS = {s.name: s for s in (
    Stack("engine", 3, torch.float64, _build_engine, option_two=True),
    Stack("fsdp2", 3, torch.float64, _build_fsdp2, option_two=True),
    Stack("fairscale", 3, torch.float64, _build_fairscale, requires="fairscale"),
    *(Stack(f"deepspeed{s}", 2, torch.float32, _deepspeed_builder(s), requires="deepspeed", timeout_s=600)
      for s in (1, 2, 3)),
    megatron_stack("megatron-tp2-dp2", 4, tp=2, pp=1),
    megatron_stack("megatron-tp2-pp2", 4, tp=2, pp=2),
    megatron_stack("megatron-reference", 1, tp=1, pp=1, resume=False, extra=(replace(OPTION_TWO, halves_of=2),)),
)}
CONTRACT_STACKS = tuple(n for n in STACKS if n != "megatron-reference")

