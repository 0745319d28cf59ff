"""Parameters that miss a gradient (spec: "Rules for parameters that miss a step") behave the
same on every backend as in the single-process reference.

The model is the tiny LLaMA plus a side branch (a hidden ``side.weight`` and a vector ``gain``)
whose loss term is used

* ``some_steps`` — on every other step only, on every rank;
* ``all_steps`` — never (the branch must not change anything: no weight decay, no anchor);
* ``some_ranks`` — on rank 0 only, every step (reduced with the other ranks' zeros).

LANTON runs with Option I, k = 1 (every step estimates, so a missed step must stop the tracker
from comparing with an older gradient) and weight decay. Each backend's job runs all three
situations in one spawn; the reference simulates the ranks' mean gradient.
"""
from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run
from engine_cases import TINY, batches, make_model, max_rel_err, rows
from lanton_dist.config import OptimConfig
from lanton_dist.factory import build_optimizer

pytestmark = pytest.mark.slow
SITUATIONS = ("some_steps", "all_steps", "some_ranks")
STEPS = 4
TOL = 5e-5  # fp32, as the other fp32 backend comparisons


def _cfg(name: str = "lanton") -> OptimConfig:
    return OptimConfig(name=name, estimate_every=1, option="I", nuclear_estimator="exact", weight_decay=0.1)


class SideBranch(nn.Module):
    """``Transformer`` (``body``) + a loss term through ``side`` and ``gain`` on ``side_x``."""

    def __init__(self, frozen_side: bool = False) -> None:
        super().__init__()
        self.body = make_model()
        g = torch.Generator().manual_seed(7)
        self.side = nn.Linear(TINY.dim, TINY.dim, bias=False)
        with torch.no_grad():
            self.side.weight.copy_(0.2 * torch.randn(TINY.dim, TINY.dim, generator=g))
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(TINY.dim, generator=g))
        if frozen_side:
            self.side.weight.requires_grad_(False)
            self.gain.requires_grad_(False)

    def forward(self, x: torch.Tensor, side_x: torch.Tensor | None = None, side_weight: float = 1.0) -> torch.Tensor:
        loss = F.cross_entropy(self.body(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        if side_x is not None:
            h = self.body.tok_embeddings(side_x[:, :-1]).mean(1)
            loss = loss + side_weight * (self.side(h) * self.gain).square().mean()
        return loss


def _side_input(situation: str, t: int, rank: int, x_local: torch.Tensor,
                participate: bool = False) -> tuple[torch.Tensor | None, float]:
    """What rank ``rank`` feeds the side branch at step ``t`` (0-based), and its weight.
    ``participate``: ranks without the term in ``some_ranks`` still run it, weighted 0 (what
    DeepSpeed needs, see the DeepSpeed job)."""
    if situation == "some_steps":
        return (x_local if t % 2 == 0 else None), 1.0
    if situation == "some_ranks":
        return (x_local, 1.0) if rank == 0 else ((x_local, 0.0) if participate else (None, 1.0))
    return None, 1.0


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@functools.cache
def reference(situation: str, world: int, name: str = "lanton", frozen_side: bool = False) -> dict[str, torch.Tensor]:
    """Single process on the global batch; the side term is the ranks' mean (rank 0 only in
    ``some_ranks``: its rows, weighted 1/world)."""
    model = SideBranch(frozen_side)
    opt = build_optimizer(model, _cfg(name))
    for t, x in enumerate(batches(STEPS)):
        if situation == "some_ranks":
            loss = model(x, rows(x, 0, world), 1.0 / world)
        else:
            loss = model(x, *_side_input(situation, t, 0, x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _params(model)


# Option II: the side term in one half-batch only (``first`` / ``second``), or in the second
# weighted 0 (``first_zero``: the same gradients with the missing half present as exact zeros).
HALF_CASES = ("first", "second", "first_zero")


def _option_two_cfg() -> OptimConfig:
    return OptimConfig(name="lanton", estimate_every=1, option="II", nuclear_estimator="exact", weight_decay=0.1)


def _option_two_step(model, opt, a: torch.Tensor, b: torch.Tensor, case: str) -> None:
    """One Option II step from half-batches ``a`` and ``b`` (each loss weighted 1/2), the side
    term in the half ``case`` names."""
    assert opt.needs_two_half_batches()
    (0.5 * model(a, a if case.startswith("first") else None)).backward()
    opt.stash_half_gradient()
    side = (b, 0.0) if case == "first_zero" else ((b, 1.0) if case == "second" else (None, 1.0))
    (0.5 * model(b, *side)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@functools.cache
def reference_option_two(case: str, world: int) -> dict[str, torch.Tensor]:
    """The reference on the global half-batches (every rank's first / second half of its rows)."""
    model = SideBranch()
    opt = build_optimizer(model, _option_two_cfg())
    for x in batches(STEPS):
        parts = [rows(x, r, world) for r in range(world)]
        h = parts[0].shape[0] // 2
        _option_two_step(model, opt, torch.cat([p[:h] for p in parts]), torch.cat([p[h:] for p in parts]), case)
    return _params(model)


def _train(rank, world, situation, forward, backward, step, participate=False):
    for t, x in enumerate(batches(STEPS)):
        mine = rows(x, rank, world)
        backward(forward(mine, *_side_input(situation, t, rank, mine, participate)))
        step()


# ---------------------------------------------------------------------------------------- jobs
def _engine_job(rank, world, tmp):
    from lanton_dist.engine import build_sharded_optimizer

    out = {"checkpoint": _engine_checkpoint_roundtrip(tmp)}
    for case in ("first", "second"):
        model = SideBranch()
        opt = build_sharded_optimizer(model, _option_two_cfg(), overlap=False)
        for x in batches(STEPS):
            mine = rows(x, rank, world)
            h = mine.shape[0] // 2
            _option_two_step(model, opt, mine[:h], mine[h:], case)
        out[("engine", f"option2-{case}")] = _params(model)
    for situation in SITUATIONS:
        for name in ("lanton", "dmuon", "adamw") if situation == "some_steps" else ("lanton",):
            model = SideBranch()
            opt = build_sharded_optimizer(model, _cfg(name), overlap=False)

            def step(opt=opt):
                opt.step()
                opt.zero_grad(set_to_none=True)

            _train(rank, world, situation, model, lambda loss: loss.backward(), step)
            out[("engine" if name == "lanton" else f"engine-{name}", situation)] = _params(model)
    return out


def _engine_checkpoint_roundtrip(tmp: str) -> dict[str, bool]:
    """Train ``some_steps`` (side never estimated), save with and without the E mask (an
    older checkpoint), load both into fresh engines: E restored / rebuilt as H > 0."""
    import torch.distributed.checkpoint as dcp

    from lanton_dist.engine import build_sharded_optimizer, checkpoint

    model = SideBranch()
    opt = build_sharded_optimizer(model, _cfg(), overlap=False)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    _train(torch.distributed.get_rank(), torch.distributed.get_world_size(), "some_steps", model,
           lambda loss: loss.backward(), step)
    new, old = os.path.join(tmp, "new"), os.path.join(tmp, "old")
    checkpoint.save(opt, new)
    sd = checkpoint.core_state_dict(opt.core, opt.pieces)
    del sd["meta/E"]
    dcp.save(sd, checkpoint_id=old)
    fresh = [build_sharded_optimizer(SideBranch(), _cfg(), overlap=False) for _ in range(2)]
    checkpoint.load(fresh[0], new)
    checkpoint.load_core_state(fresh[1].core, fresh[1].pieces, old)
    E = opt.core.E
    return {"some_unestimated": bool((~E).any()) and bool(E.any()),
            "restored": torch.equal(fresh[0].core.E, E),
            "old_fallback": torch.equal(fresh[1].core.E, fresh[1].core.H > 0) and torch.equal(fresh[1].core.E, E)}


def _fsdp2_job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for situation in SITUATIONS:
        model = SideBranch()
        for layer in model.body.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # FSDP2 needs this when ranks use different parameters; it zero-fills the gradients of
        # unused ones (even where no rank used them), which the adapter must see through.
        model.set_reduce_scatter_unused_params(True)
        opt = LANTONFSDP2(model, _cfg(), overlap=False)

        def step(opt=opt):
            opt.step()
            opt.zero_grad(set_to_none=True)

        _train(rank, world, situation, model, lambda loss: loss.backward(), step)
        out[("fsdp2", situation)] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return out


def _deepspeed_job(rank, world):
    """DeepSpeed ZeRO's bucketed gradient reductions follow each rank's autograd hooks: when
    ranks use different parameters its collectives mismatch and the job dies (gloo: "Received
    data size doesn't match expected size"), on every stage. So in ``some_ranks`` the other
    ranks run the term weighted 0, as DeepSpeed requires: the result is the DDP convention's."""
    from lanton_dist.integrations.deepspeed import initialize

    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    out = {"passthrough": _deepspeed_passthrough(world)}
    for stage in (1, 2, 3):
        config = {"train_micro_batch_size_per_gpu": 24 // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
        for situation in SITUATIONS:
            engine, _ = initialize(SideBranch(), _cfg(), config, overlap=False, bucket_mb=0.005)
            _train(rank, world, situation, engine, engine.backward, engine.step, participate=True)
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
                out[(f"deepspeed{stage}", situation)] = _params(engine.module)
    return out


def _deepspeed_passthrough(world: int) -> dict[str, bool]:
    """``integrations.deepspeed.initialize`` hands DeepSpeed's own arguments to it."""
    from lanton_dist.integrations.deepspeed import initialize

    made = []

    def scheduler(opt):
        made.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
        return made[-1]

    config = {"train_micro_batch_size_per_gpu": 24 // world, "zero_optimization": {"stage": 1},
              "steps_per_print": 10**9, "gradient_clipping": 0.0}
    data = torch.utils.data.TensorDataset(torch.zeros(48, 3))
    engine, _ = initialize(SideBranch(), _cfg(), config, lr_scheduler=scheduler, training_data=data)
    return {"lr_scheduler": bool(made) and engine.lr_scheduler is made[0],
            "training_data": engine.training_dataloader is not None and len(engine.training_dataloader) == 2}


def _fairscale_job(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    from lanton_dist.integrations.fairscale import lanton_oss

    out = {}
    for situation in SITUATIONS:
        model = SideBranch()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        opt = lanton_oss(model, _cfg(), overlap=False)

        def step(opt=opt):
            opt.step()
            opt.zero_grad(set_to_none=True)

        _train(rank, world, situation, ddp, lambda loss: loss.backward(), step)
        out[("fairscale", situation)] = _params(model)
    return out


class _DropGrads:
    """Megatron: the optimizer seen through a step that first clears ``.grad`` of the
    parameters named in ``DROPPED`` where ``situation`` says this (DP) rank has no gradient —
    what an unused parameter looks like to the engine (Megatron's modules use every parameter).
    ``rank0_share`` (the single-process reference of ``some_ranks``): replaces their gradient
    by DP rank 0's share of the DP = 2 mean instead."""

    DROPPED = ("layers.0.mlp.linear_fc2.weight", "final_layernorm.weight")

    def __init__(self, opt, model, situation: str, rank: int = 0, rank0_share=None) -> None:
        self.opt, self.model, self.situation, self.rank, self.t = opt, model, situation, rank, 0
        self.rank0_share = rank0_share

    def step(self) -> None:
        dropped = [(n, p) for n, p in self.model.named_parameters() if n.endswith(self.DROPPED)]
        if self.rank0_share is not None:
            share = self.rank0_share(self.t)
            for n, p in dropped:
                p.grad = share[n]
        elif _side_input(self.situation, self.t, self.rank, torch.empty(0))[0] is None:
            for _, p in dropped:
                p.grad = None
        self.t += 1
        self.opt.step()


def _megatron_rank0_share(model, cfg):
    """``t ↦`` the DROPPED parameters' gradients from DP rank 0's rows of step t, as they
    enter a DP = 2 mean (× 1/2); every other gradient is kept."""
    from test_megatron_lanton import forward_backward, megatron_backend

    backend = megatron_backend(cfg, model, None)

    def share(t: int) -> dict[str, torch.Tensor]:
        kept = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        forward_backward(backend, cfg, t, (0, 2))
        out = {n: 0.5 * p.grad for n, p in model.named_parameters() if n.endswith(_DropGrads.DROPPED)}
        for n, p in model.named_parameters():
            p.grad = kept[n]
        return out

    return share


def _megatron_job(rank, world):
    """World 2: TP = 2 for some_steps / all_steps, then DP = 2 for some_ranks (the gradient on
    DP rank 0 only). World 1: the reference optimizer, one process."""
    from test_megatron_lanton import OPTIM, _logical_params, _train as megatron_train, canonical_init
    from test_megatron_model import tiny_cfg

    from lanton_dist.integrations import megatron_cpu
    from lanton_dist.integrations import megatron_model as mm
    from lanton_dist.integrations.megatron import build_megatron_optimizer
    from lanton_dist.megatron_backend import make_optimizer

    megatron_cpu.install()
    out = {}
    try:
        for situation in SITUATIONS:
            tp = 1 if situation == "some_ranks" else world
            cfg = tiny_cfg(parallel__tp=tp, **{**OPTIM, "optim__estimate_every": 1, "optim__weight_decay": 0.1})
            mm.initialize_model_parallel(cfg)
            model = mm.build_gpt_model(cfg)
            canonical_init(model, cfg)
            if world == 1:
                share = _megatron_rank0_share(model, cfg) if situation == "some_ranks" else None
                opt = _DropGrads(make_optimizer(model, cfg), model, situation, rank0_share=share)
            else:
                from megatron.core import parallel_state as ps

                opt = _DropGrads(build_megatron_optimizer(model, cfg), model, situation, ps.get_data_parallel_rank())
            megatron_train(cfg, STEPS, opt=opt, model=model)
            out[("megatron", situation)] = _logical_params(model, cfg)
            mm.destroy_model_parallel()
    finally:
        megatron_cpu.uninstall()
    return out


@functools.cache
def _results(backend: str) -> list[dict]:
    if backend == "engine":
        with tempfile.TemporaryDirectory() as tmp:
            return run(_engine_job, 3, tmp)
    if backend == "fsdp2":
        return run(_fsdp2_job, 3)
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
        return run(_deepspeed_job, 2, timeout_s=120)
    if backend == "fairscale":
        pytest.importorskip("fairscale")
        return run(_fairscale_job, 3)
    if backend == "megatron":
        pytest.importorskip("megatron.core")
        return run(_megatron_job, 2, timeout_s=120)
    if backend == "megatron_reference":
        return run(_megatron_job, 1, timeout_s=120)
    raise ValueError(backend)


WORLD = {"engine": 3, "fsdp2": 3, "deepspeed1": 2, "deepspeed2": 2, "deepspeed3": 2, "fairscale": 3}
SPAWN = {b: "deepspeed" if b.startswith("deepspeed") else b for b in WORLD}  # one job per spawn


# ---------------------------------------------------------------------------------------- specification
def test_a_parameter_that_never_gets_a_gradient_changes_nothing_in_the_reference():
    """The side branch untouched, and every other parameter exactly as without it (no weight
    decay on it, and its H = 0 does not pin the hidden group's anchor)."""
    got = reference("all_steps", 1)
    without = reference("all_steps", 1, frozen_side=True)
    for n, v in without.items():
        assert torch.equal(got[n], v), n


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("backend", list(WORLD))
def test_backend_equals_the_reference_when_a_parameter_misses_gradients(backend, situation):
    results = _results(SPAWN[backend])
    key = (backend, situation)
    ref = reference(situation, WORLD[backend])
    for r, res in enumerate(results):
        err = max_rel_err(res[key], ref)
        assert err <= TOL, f"{backend} rank {r} {situation}: rel err {err:.2e}"
    if situation == "all_steps":
        start = SideBranch()
        for r, res in enumerate(results):
            assert torch.equal(res[key]["side.weight"], start.side.weight) and torch.equal(res[key]["gain"], start.gain), \
                f"{backend} rank {r}: a parameter without gradients changed"


@pytest.mark.parametrize("case", ["first", "second"])
def test_option_two_reference_counts_a_gradient_missing_in_one_half_batch_as_zeros(case):
    """The side branch has a gradient in one half-batch only: it is stepped (not dropped, no
    error), exactly as when the other half's gradient is present and zero."""
    got = reference_option_two(case, 3)
    start = SideBranch()
    assert not torch.equal(got["side.weight"], start.side.weight) and not torch.equal(got["gain"], start.gain)
    if case == "first":
        zero = reference_option_two("first_zero", 3)
        assert max_rel_err(got, zero) <= 1e-6
    mirrored = reference_option_two("second" if case == "first" else "first", 3)
    assert not torch.equal(got["side.weight"], mirrored["side.weight"])  # the halves are told apart


@pytest.mark.parametrize("case", ["first", "second"])
def test_option_two_engine_equals_the_reference_when_a_gradient_is_in_one_half_batch_only(case):
    ref = reference_option_two(case, 3)
    for r, res in enumerate(_results("engine")):
        err = max_rel_err(res[("engine", f"option2-{case}")], ref)
        assert err <= TOL, f"rank {r} {case}: rel err {err:.2e}"


def test_deepspeed_initialize_passes_deepspeeds_own_arguments_through():
    for r, res in enumerate(_results("deepspeed")):
        assert res["passthrough"] == {"lr_scheduler": True, "training_data": True}, f"rank {r}"


def test_engine_checkpoints_keep_the_estimated_mask_and_old_ones_fall_back_to_H_positive():
    for r, res in enumerate(_results("engine")):
        assert res["checkpoint"] == {"some_unestimated": True, "restored": True, "old_fallback": True}, f"rank {r}"


@pytest.mark.parametrize("name", ["dmuon", "adamw"])
def test_engine_skips_parameters_without_gradients_for_every_algorithm(name):
    """D-Muon / AdamW on the engine: no momentum decay, weight decay or update on missed steps."""
    ref = reference("some_steps", 3, name)
    for r, res in enumerate(_results("engine")):
        err = max_rel_err(res[(f"engine-{name}", "some_steps")], ref)
        assert err <= TOL, f"rank {r}: rel err {err:.2e}"


@pytest.mark.parametrize("situation", SITUATIONS)
def test_megatron_equals_the_reference_when_parameters_miss_gradients(situation):
    """A TP-sharded hidden matrix and a TP-replicated norm gain without gradients: TP = 2
    (some / all steps) and DP = 2 (some ranks) equal one process with the reference optimizer."""
    ref = _results("megatron_reference")[0][("megatron", situation)]
    for r, res in enumerate(_results("megatron")):
        got = res[("megatron", situation)]
        assert set(got) == set(ref)
        err = max(((got[n].double() - ref[n].double()).norm() / ref[n].double().norm()).item() for n in ref)
        assert err <= 1e-5, f"rank {r}: rel err {err:.2e}"
