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
STEPS = 6
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


def _train(rank, world, situation, forward, backward, step, participate=False):
    for t, x in enumerate(batches(STEPS)):
        mine = rows(x, rank, world)
        backward(forward(mine, *_side_input(situation, t, rank, mine, participate)))
        step()


# ---------------------------------------------------------------------------------------- jobs
def _engine_job(rank, world):
    from lanton_dist.engine import build_sharded_optimizer

    out = {}
    for situation in SITUATIONS:
        for name in ("lanton", "dmuon", "adamw") if situation == "some_steps" else ("lanton",):
            model = SideBranch()
            opt = build_sharded_optimizer(model, _cfg(name), overlap=False)

            def step(opt=opt):
                opt.step()
                opt.zero_grad(set_to_none=True)

            _train(rank, world, situation, model, lambda loss: loss.backward(), step)
            out[(situation, name)] = _params(model)
    return out


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
        out[situation] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return out


def _deepspeed_job(rank, world, stage):
    """DeepSpeed ZeRO's bucketed gradient reductions follow each rank's autograd hooks: when
    ranks use different parameters its collectives mismatch and the job dies (gloo: "Received
    data size doesn't match expected size"), on every stage. So in ``some_ranks`` the other
    ranks run the term weighted 0, as DeepSpeed requires: the result is the DDP convention's."""
    from lanton_dist.integrations.deepspeed import initialize

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    config = {"train_micro_batch_size_per_gpu": 24 // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
    out = {}
    for situation in SITUATIONS:
        engine, _ = initialize(SideBranch(), _cfg(), config, overlap=False, bucket_mb=0.005)
        _train(rank, world, situation, engine, engine.backward, engine.step, participate=True)
        if stage == 3:
            import deepspeed

            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                out[situation] = _params(engine.module)
        else:
            out[situation] = _params(engine.module)
    return out


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
        out[situation] = _params(model)
    return out


@functools.cache
def _results(backend: str) -> list[dict]:
    if backend == "engine":
        return run(_engine_job, 3)
    if backend == "fsdp2":
        return run(_fsdp2_job, 3)
    if backend.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        return run(_deepspeed_job, 2, int(backend[-1]), timeout_s=120)
    if backend == "fairscale":
        pytest.importorskip("fairscale")
        return run(_fairscale_job, 3)
    raise ValueError(backend)


WORLD = {"engine": 3, "fsdp2": 3, "deepspeed1": 2, "deepspeed2": 2, "deepspeed3": 2, "fairscale": 3}


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
    results = _results(backend)
    key = (situation, "lanton") if backend == "engine" else situation
    ref = reference(situation, WORLD[backend])
    for r, res in enumerate(results):
        err = max_rel_err(res[key], ref)
        assert err <= TOL, f"{backend} rank {r} {situation}: rel err {err:.2e}"
    if situation == "all_steps":
        start = SideBranch()
        for r, res in enumerate(results):
            assert torch.equal(res[key]["side.weight"], start.side.weight) and torch.equal(res[key]["gain"], start.gain), \
                f"{backend} rank {r}: a parameter without gradients changed"


@pytest.mark.parametrize("name", ["dmuon", "adamw"])
def test_engine_skips_parameters_without_gradients_for_every_algorithm(name):
    """D-Muon / AdamW on the engine: no momentum decay, weight decay or update on missed steps."""
    ref = reference("some_steps", 3, name)
    for r, res in enumerate(_results("engine")):
        err = max_rel_err(res[("some_steps", name)], ref)
        assert err <= TOL, f"rank {r}: rel err {err:.2e}"
