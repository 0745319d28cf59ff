"""Gradient clipping (``optim.clip_grad_norm``, :mod:`lanton_dist.clipping`): every optimizer and
every backend clips the step's gradient to global L2 norm c exactly as
``torch.nn.utils.clip_grad_norm_`` would, before momentum or AdamW moments read it.

The single-process references define it (checked against torch's own clip); each sharded stack
is compared with them with clipping active on every step (the tiny model's gradient norm is
~0.4, c = 0.05): the ZeRO engine and FSDP2 at world 3 (LANTON Option I and II, D-Muon, AdamW),
DeepSpeed ZeRO-1 at world 2 (its config's ``gradient_clipping`` mapped onto ours), fairscale at
world 3, Megatron at TP = 2 (TP-replicated norm gains counted once), and the training loop on the
``none``, ``zero`` and ``ddp`` backends. Clipping adds no collective and no host read to a step.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable

import pytest
import torch

from distributed import run
from engine_cases import backward_step, batches, halves, loss_fn, make_model, max_rel_err, rows
from host_reads import counting_host_reads
from lanton_dist.backends import Backend
from lanton_dist.config import OptimConfig
from lanton_dist.dmuon import DMuon
from lanton_dist.factory import build_optimizer, param_groups
from lanton_dist.lanton import LANTON

CLIP = 0.05  # below every step's gradient norm (asserted): clipping acts on every step
STEPS = 4
TOL = 1e-6  # fp64 stacks (engine, FSDP2, fairscale)
FP32_TOL = 5e-5  # DeepSpeed (fp32 master partitions) and Megatron
# AdamW's g/√v turns the model's own ~1e-7 rounding differences between 3 ranks and one process
# into larger update changes where gradients are near zero (tests/test_engine.py, FP32_TOLERANCE).
ADAMW_TOL = 1e-4
CASES = {"lanton-I": ("lanton", "I"), "lanton-II": ("lanton", "II"), "dmuon": ("dmuon", "I"), "adamw": ("adamw", "I")}
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(case: str = "lanton-I", clip: float = CLIP) -> OptimConfig:
    name, option = CASES[case]
    return OptimConfig(name=name, option=option, estimate_every=2, nuclear_estimator="exact", weight_decay=0.1,
                       clip_grad_norm=clip)


class _Loop:
    """An optimizer seen through a :class:`Backend` as ``train_step`` drives it: ``step()`` is
    ``clip_gradients()`` (a torch optimizer is clipped by the backend) then the step; it also
    records each step's global gradient norm before clipping (both halves on Option II steps)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.norms = backend, []

    def __getattr__(self, name: str):
        return getattr(self.backend.optimizer, name)

    def step(self) -> None:
        opt = self.backend.optimizer
        grads = [p.grad + opt.state[p]["half_grad"] if "half_grad" in opt.state.get(p, {}) else p.grad
                 for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        self.norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        self.backend.clip_gradients()
        self.backend.step()


@functools.cache
def reference(case: str, world: int = 1, dtype: torch.dtype = torch.float64, clip: float = CLIP):
    """Single process on the global batches (Option II halves as ``world`` ranks split them):
    ``(parameters, pre-clip norm of each step)``."""
    cfg = _cfg(case, clip)
    model = make_model(dtype)
    loop = _Loop(Backend(model, build_optimizer(model, cfg), torch.device("cpu"), clip_grad_norm=cfg.clip_grad_norm))
    for x in batches(STEPS):
        a, b = halves(x, world)
        backward_step(model, loop, torch.cat([a, b]))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, loop.norms


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _count_host_reads(fn: Callable[[], object]) -> dict[str, int]:
    """Calls of the tensor → host conversions while ``fn`` runs."""
    with counting_host_reads() as counts:
        fn()
    return dict(counts)


# ---------------------------------------------------------------------------------------- the rule, one process
@pytest.mark.parametrize("case", list(CASES))
def test_a_threshold_below_the_norm_changes_the_step_and_one_above_it_changes_nothing(case):
    off, norms = reference(case, clip=0.0)
    assert min(norms) > CLIP
    clipped, _ = reference(case)
    assert max_rel_err(clipped, off) > 1e-3, "clipping at c < ‖G‖ must change the run"
    above, _ = reference(case, clip=1e9)
    for n in off:
        assert torch.equal(above[n], off[n]), n


@pytest.mark.parametrize("name", ["lanton", "scion", "dmuon"])
def test_the_references_clip_exactly_as_torch_clip_grad_norm_before_the_step(name):
    """LANTON (Option I: its stored G_{t−1} is the clipped one), Scion and D-Muon with c equal
    the unclipped optimizer stepped after ``torch.nn.utils.clip_grad_norm_(params, c)``."""
    runs = []
    for own in (True, False):
        model = make_model(torch.float64)
        cfg = OptimConfig(name=name, estimate_every=2, nuclear_estimator="exact", weight_decay=0.1,
                          clip_grad_norm=CLIP if own else 0.0)
        opt = build_optimizer(model, cfg)
        for x in batches(STEPS):
            loss_fn(model, x).backward()
            if not own:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append(_params(model))
    assert max_rel_err(runs[0], runs[1]) <= 1e-10  # fp64; the norms' summation order differs


def test_option_two_clips_both_halves_by_the_coefficient_of_their_sum():
    """Option II: G = g_A + g_B and D = 2(g_A − g_B) are both scaled by min(1, c/(‖G‖ + 1e-6))."""
    runs = []
    for own in (True, False):
        model = make_model(torch.float64)
        opt = build_optimizer(model, OptimConfig(name="lanton", option="II", estimate_every=2, nuclear_estimator="exact",
                                                 clip_grad_norm=CLIP if own else 0.0))
        for x in batches(STEPS):
            two = opt.needs_two_half_batches()
            h = x.shape[0] // 2
            if two:
                (0.5 * loss_fn(model, x[:h])).backward()
                opt.stash_half_gradient()
                (0.5 * loss_fn(model, x[h:])).backward()
            else:
                loss_fn(model, x).backward()
            if not own:
                parts = [(p.grad, opt.state[p]["half_grad"] if two else torch.zeros_like(p)) for p in model.parameters()]
                coef = min(1.0, CLIP / (float(torch.nn.utils.get_total_norm([a + b for a, b in parts])) + 1e-6))
                for a, b in parts:
                    a.mul_(coef)
                    b.mul_(coef)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append(_params(model))
    assert max_rel_err(runs[0], runs[1]) <= 1e-10  # fp64; the norms' summation order differs


@pytest.mark.parametrize("name", ["lanton", "dmuon"])
def test_a_non_finite_gradient_norm_skips_the_step_in_the_reference(name):
    """Finite gradients whose Σ G² overflows: skipped with clipping on, stepped with it off."""
    for clip, skipped in ((CLIP, 1), (0.0, 0)):
        model = make_model(torch.float32)
        opt = build_optimizer(model, OptimConfig(name=name, clip_grad_norm=clip))
        loss_fn(model, batches(1)[0]).backward()
        model.lm_head.weight.grad.mul_(1e30)
        before = _params(model)
        opt.step()
        assert opt.skipped_steps == skipped
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) == bool(skipped)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_optimizers_refuse_a_negative_or_non_finite_threshold(bad):
    groups = param_groups(make_model(), OptimConfig())
    for cls in (LANTON, DMuon):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            cls(groups, clip_grad_norm=bad)


def test_a_backend_refuses_an_optimizer_that_clips_at_another_threshold():
    model = make_model()
    opt = build_optimizer(model, OptimConfig(clip_grad_norm=0.0))
    with pytest.raises(ValueError, match="clip_grad_norm is 1.0"):
        Backend(model, opt, torch.device("cpu"), clip_grad_norm=1.0)
    assert Backend(model, opt, torch.device("cpu"), clip_grad_norm=0.0).clip_grad_norm == 0.0


@pytest.mark.parametrize("name", ["lanton", "dmuon"])
def test_clipping_adds_no_host_read_to_a_reference_step(name):
    counts = []
    for clip in (0.0, CLIP):
        model = make_model()
        opt = build_optimizer(model, OptimConfig(name=name, estimate_every=2, clip_grad_norm=clip))
        for x in batches(2):
            loss_fn(model, x).backward()
            counts.append(_count_host_reads(opt.step))
            opt.zero_grad(set_to_none=True)
    assert counts[:2] == counts[2:]


# ---------------------------------------------------------------------------------------- sharded stacks
def _run_and_norms(opt, model, rank, world, norm: Callable[[], float]) -> tuple[dict, list[float]]:
    norms = []
    for x in batches(STEPS):
        backward_step(model, opt, rows(x, rank, world))
        norms.append(norm())
    return _params(model), norms


def _engine_job(rank, world):
    from lanton_dist.engine import build_sharded_optimizer

    out = {}
    for case in CASES:
        model = make_model(torch.float64)
        opt = build_sharded_optimizer(model, _cfg(case), overlap=False)
        out[case] = _run_and_norms(opt, model, rank, world, lambda opt=opt: float(opt.core.grad_norm))
    # the same step with and without clipping: host reads and collectives
    for clip in (0.0, CLIP):
        model = make_model(torch.float64)
        opt = build_sharded_optimizer(model, _cfg(clip=clip), overlap=False)
        reads = []
        for x in batches(3):
            loss_fn(model, rows(x, rank, world)).backward()
            reads.append(_count_host_reads(opt.step))
            opt.zero_grad(set_to_none=True)
        out[("reads", clip)] = reads
        out[("collectives", clip)] = [(r.step, r.op, r.phase, r.numel) for r in opt.meter.records]
    # finite gradients whose Σ G² overflows fp64: every rank skips
    for clip in (0.0, CLIP):
        model = make_model(torch.float64)
        opt = build_sharded_optimizer(model, _cfg(clip=clip), overlap=False)
        loss_fn(model, rows(batches(1)[0], rank, world)).backward()
        if rank == 0:
            model.lm_head.weight.grad.mul_(1e200)
        before = _params(model)
        opt.step()
        out[("overflow", clip)] = (opt.skipped_steps, all(torch.equal(before[n], p) for n, p in model.named_parameters()))
    return out


def _fsdp2_job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lanton_dist.backends import FSDP2Backend
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    def shard(model):
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def full(model):
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    out = {}
    for case in CASES:
        model = shard(make_model(torch.float64))
        opt = LANTONFSDP2(model, _cfg(case), overlap=False)
        backend = FSDP2Backend(model, opt, torch.device("cpu"), rank, world, clip_grad_norm=CLIP)
        _, norms = _run_and_norms(opt, model, rank, world, lambda backend=backend: float(backend.grad_norm(False)))
        out[case] = full(model), norms
    # torch's AdamW on FSDP2 (DTensor gradients): the backend clips with the global norm
    model = shard(make_model(torch.float64))
    backend = FSDP2Backend(model, build_optimizer(model, _cfg("adamw")), torch.device("cpu"), rank, world,
                           clip_grad_norm=CLIP)
    loop = _Loop(backend)
    _, norms = _run_and_norms(loop, model, rank, world, lambda: float(backend.grad_norm(False)))
    out["torch-adamw"] = full(model), norms
    return out


def _deepspeed_job(rank, world):
    from lanton_dist.integrations.deepspeed import initialize

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    out = {}
    for case in ("lanton-I", "adamw"):
        config = {"train_micro_batch_size_per_gpu": 24 // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 1}, "steps_per_print": 10**9, "gradient_clipping": CLIP}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, opt = initialize(make_model(), _cfg(case, clip=0.0), config, overlap=False, bucket_mb=0.005)
        norms = []
        for x in batches(STEPS):
            engine.backward(loss_fn(engine, rows(x, rank, world)))
            engine.step()
            norms.append(float(opt.core.grad_norm))
        out[case] = (_params(engine.module), norms, opt.clip_grad_norm, engine.optimizer.clip_grad,
                     [str(w.message) for w in caught if "gradient_clipping" in str(w.message)])
    try:
        initialize(make_model(), _cfg(clip=1.0), {"train_micro_batch_size_per_gpu": 24 // world,
                                                  "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP})
    except ValueError as exc:
        out["conflict"] = str(exc)
    engine, opt = initialize(make_model(), _cfg(clip=0.0), {"train_micro_batch_size_per_gpu": 24 // world,
                                                            "zero_optimization": {"stage": 1}})
    out["absent"] = (opt.clip_grad_norm, engine.optimizer.clip_grad)
    return out


def _fairscale_job(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    from lanton_dist.integrations.fairscale import lanton_oss

    model = make_model(torch.float64)
    ddp = DistributedDataParallel(model)
    opt = lanton_oss(model, _cfg(), overlap=False)
    norms = []
    for x in batches(STEPS):
        loss_fn(ddp, rows(x, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        norms.append(float(opt.optim.core.grad_norm))  # OSS wraps this rank's LANTONOSSShard
    return _params(model), norms


class _MegatronNorms:
    """A Megatron run's optimizer, recording each step's pre-clip global gradient norm: measured
    from ``p.grad`` before the step in one process, the core's ``grad_norm`` when sharded."""

    def __init__(self, opt, model, sharded: bool) -> None:
        self.opt, self.model, self.sharded, self.norms = opt, model, sharded, []

    def step(self) -> None:
        if not self.sharded:
            self.norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters()])))
        self.opt.step()
        if self.sharded:
            self.norms.append(float(self.opt.core.grad_norm))


def _megatron_job(rank, world):
    """World 1: the reference optimizer in one process; world 2: TP = 2, where every rank holds a
    replica of the norm gains (weight 0 on TP rank 1: counted once in ‖G‖)."""
    from lanton_dist.integrations import megatron_cpu
    from test_megatron_lanton import OPTIM, _logical_params, _train, canonical_init
    from test_megatron_model import tiny_cfg

    from lanton_dist.integrations import megatron_model as mm
    from lanton_dist.integrations.megatron import build_megatron_optimizer
    from lanton_dist.megatron_backend import make_optimizer

    megatron_cpu.install()
    try:
        cfg = tiny_cfg(parallel__tp=world, **{**OPTIM, "optim__estimate_every": 2, "optim__clip_grad_norm": CLIP})
        mm.initialize_model_parallel(cfg)
        model = mm.build_gpt_model(cfg)
        canonical_init(model, cfg)
        if world == 1:
            opt = _MegatronNorms(make_optimizer(model, cfg), model, sharded=False)
        else:
            opt = _MegatronNorms(build_megatron_optimizer(model, cfg), model, sharded=True)
        _train(cfg, STEPS, opt=opt, model=model)
        return _logical_params(model, cfg), opt.norms
    finally:
        mm.destroy_model_parallel()
        megatron_cpu.uninstall()


NEEDS = {"fairscale": "fairscale", "deepspeed": "deepspeed", "megatron": "megatron", "megatron_reference": "megatron"}


def _installed(stack: str) -> bool:
    return stack not in NEEDS or importlib.util.find_spec(NEEDS[stack]) is not None


def _three_rank_job(rank, world):
    """The engine, FSDP2 and fairscale runs in one spawn (process start-up dominates on 2 cores)."""
    jobs = {"engine": _engine_job, "fsdp2": _fsdp2_job, "fairscale": _fairscale_job}
    return {stack: job(rank, world) for stack, job in jobs.items() if _installed(stack)}


@functools.cache
def _results(stack: str) -> list[dict]:
    if not _installed(stack):
        pytest.skip(f"{NEEDS[stack]} is not installed")
    if stack in ("engine", "fsdp2", "fairscale"):
        return [res[stack] for res in _three_ranks()]
    if stack in ("trainer", "deepspeed", "megatron"):
        return [res[stack] for res in _two_ranks()]
    if stack == "megatron_reference":
        return run(_megatron_job, 1, timeout_s=120)
    raise ValueError(stack)


@functools.cache
def _three_ranks() -> list[dict]:
    return run(_three_rank_job, 3, timeout_s=120)


def _two_rank_job(rank, world, out):
    """The training loop, DeepSpeed and Megatron (TP = 2) runs in one spawn."""
    res = {"trainer": _trainer_job(rank, world, out)}
    for stack, job in (("deepspeed", _deepspeed_job), ("megatron", _megatron_job)):
        if _installed(stack):
            res[stack] = job(rank, world)
    return res


@functools.cache
def _two_ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return run(_two_rank_job, 2, tmp, timeout_s=180)


def _assert_equals_reference(got: dict, norms: list[float], case: str, world: int, dtype: torch.dtype, tol: float,
                             what: str) -> None:
    ref, ref_norms = reference(case, world, dtype)
    assert min(ref_norms) > CLIP, "clipping must act on every step"
    err = max_rel_err(got, ref)
    assert err <= (max(tol, ADAMW_TOL) if case == "adamw" else tol), f"{what}: rel err {err:.2e}"
    assert norms == pytest.approx(ref_norms, rel=tol), f"{what}: pre-clip norms"


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["engine", "fsdp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_with_clipping_equals_the_reference_on_3_ranks(stack, case):
    for r, res in enumerate(_results(stack)):
        _assert_equals_reference(*res[case], case, 3, torch.float64, TOL, f"{stack} {case} rank {r}")


@pytest.mark.slow
def test_fsdp2_with_torch_adamw_clips_dtensor_gradients_by_the_global_norm():
    for r, res in enumerate(_results("fsdp2")):
        _assert_equals_reference(*res["torch-adamw"], "adamw", 3, torch.float64, TOL, f"rank {r}")


@pytest.mark.slow
def test_clipping_adds_no_collective_and_no_host_read_to_an_engine_step():
    """Σ G² rides in the existing ``finite`` all-reduce (one more scalar); the step's host reads
    are the same with and without clipping."""
    for res in _results("engine"):
        assert res[("reads", CLIP)] == res[("reads", 0.0)]
        off, on = res[("collectives", 0.0)], res[("collectives", CLIP)]
        assert [c[:3] for c in on] == [c[:3] for c in off]
        assert [b[3] - a[3] for a, b in zip(off, on)] == [1 if a[2] == "finite" else 0 for a in off]


@pytest.mark.slow
def test_a_non_finite_gradient_norm_skips_the_engine_step_on_every_rank():
    for res in _results("engine"):
        assert res[("overflow", CLIP)] == (1, True)
        assert res[("overflow", 0.0)] == (0, False)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lanton-I", "adamw"])
def test_deepspeed_gradient_clipping_is_mapped_onto_the_optimizer_and_equals_the_reference(case):
    """ZeRO-1, world 2: the config's ``gradient_clipping`` becomes the core's threshold (one
    warning), DeepSpeed's own clipping is 0, and the run equals the reference clipped at it."""
    for r, res in enumerate(_results("deepspeed")):
        params, norms, ours, theirs, notices = res[case]
        assert (ours, theirs, len(notices)) == (CLIP, 0.0, 1), f"rank {r}"
        _assert_equals_reference(params, norms, case, 2, torch.float32, FP32_TOL, f"deepspeed {case} rank {r}")


@pytest.mark.slow
def test_deepspeed_refuses_two_different_thresholds_and_never_clips_itself():
    for res in _results("deepspeed"):
        assert "differs from the optimizer config's clip_grad_norm 1.0" in res["conflict"]
        assert res["absent"] == (0.0, 0.0)  # DeepSpeed's own default would clip at 1.0


@pytest.mark.slow
def test_fairscale_with_clipping_equals_the_reference_on_3_ranks():
    for r, res in enumerate(_results("fairscale")):
        _assert_equals_reference(*res, "lanton-I", 3, torch.float64, TOL, f"fairscale rank {r}")


@pytest.mark.slow
def test_megatron_tp2_with_clipping_equals_the_reference_and_counts_replicated_norms_once():
    """TP = 2 (fused QKV / gate-up split, vocab-parallel embedding and head, TP-replicated norm
    gains) clipped at c equals one process with the reference optimizer, and its pre-clip norm
    is the single-process one: the replicated gains are not counted twice."""
    ref, ref_norms = _results("megatron_reference")[0]
    assert min(ref_norms) > CLIP
    for r, (got, norms) in enumerate(_results("megatron")):
        assert set(got) == set(ref)
        err = max(((got[n].double() - ref[n].double()).norm() / ref[n].double().norm()).item() for n in ref)
        assert err <= FP32_TOL, f"rank {r}: rel err {err:.2e}"
        assert norms == pytest.approx(ref_norms, rel=1e-6), f"rank {r}"


# ---------------------------------------------------------------------------------------- the training loop
TRAINER_ARGS = ("--train.steps", "4", "--train.eval_every", "0", "--train.log_every", "1", "--parallel.overlap", "false",
                "--optim.estimate_every", "2")


def _trainer_cfg(out, name: str, backend: str, clip: float):
    from test_train import small_cfg

    return small_cfg(out, *TRAINER_ARGS, "--optim.name", name, "--parallel.backend", backend,
                     "--optim.clip_grad_norm", str(clip))


def _logged(summary) -> list[tuple[float, float]]:
    from lanton_dist.trainer import read_metrics

    return [(r["loss"], r["grad_norm"]) for r in read_metrics(summary["metrics"]) if "loss" in r]


def _trainer_job(rank, world, out):
    """``parallel.backend: zero | ddp`` through :func:`lanton_dist.trainer.train` on this spawn's
    ranks, every run in the spawn's process group (kept open between the runs)."""
    from lanton_dist import backends
    from lanton_dist.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    backends.DistributedBackend.close = lambda self: None  # distributed.run closes the group at the end
    runs = [("zero", "lanton"), ("zero", "adamw"), ("ddp", "adamw")]
    return {run: _logged(train(_trainer_cfg(os.path.join(out, *run), run[1], run[0], CLIP), log=lambda _m: None))
            for run in runs}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lanton", "adamw"])
def test_the_loop_clips_alike_on_the_none_and_zero_backends_and_logs_the_pre_clip_norm(tmp_path, name):
    """LANTON (clipped in its step) and torch's AdamW (clipped by the backend, ``none``, and after
    DDP's all-reduce, ``ddp``) against the engine's own (``zero``, 2 ranks): the same losses and
    the same logged pre-clip norms; clipping changes the run, and the first step logs the
    unclipped gradient's norm."""
    from test_backends import reference_grad_norm

    from lanton_dist.trainer import train

    none = _logged(train(_trainer_cfg(tmp_path / "none", name, "none", CLIP), log=lambda _m: None))
    unclipped = _logged(train(_trainer_cfg(tmp_path / "off", name, "none", 0.0), log=lambda _m: None))
    assert min(norm for _, norm in none) > CLIP
    for backend in ("zero", "ddp") if name == "adamw" else ("zero",):
        got = _results("trainer")[0][(backend, name)]
        assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in none], rel=1e-4), backend
        assert [norm for _, norm in got] == pytest.approx([norm for _, norm in none], rel=1e-4), backend
    assert none[0] == unclipped[0] and none[0][1] == pytest.approx(reference_grad_norm(_trainer_cfg(tmp_path, name, "none", CLIP)),
                                                                   rel=1e-5)
    # step 1's update is nearly scale-invariant (normalised LMO; AdamW's first m/√v): the losses
    # part from step 3 on, once momentum mixes gradients clipped by different factors
    assert all(abs(a[0] - b[0]) > 1e-4 for a, b in zip(none[2:], unclipped[2:])), "clipping must change the run"
