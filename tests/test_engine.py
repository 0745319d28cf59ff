"""Specification of the sharded engine (ShardedLANTON) on CPU gloo process groups.

Every algorithm against the reference on 3 ranks, Newton–Schulz once per matrix and bit-exact
resume are the contract every backend keeps: ``tests/test_contract.py``."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from distributed import run
from engine_cases import batches, make_model, max_rel_err, reference_run, rows, sharded_run, backward_step
from lanton_dist.config import OptimConfig
from lanton_dist.engine import build_sharded_optimizer, checkpoint, plan_ownership
from lanton_dist.groups import classify_parameters

pytestmark = pytest.mark.slow
STEPS = 20
VARIANTS = [  # (option, k, overlap)
    ("I", 1, False), ("I", 5, False), ("II", 1, False), ("II", 5, False),
    ("I", 1, True), ("I", 5, True), ("II", 5, True),
]


def _equivalence_worker(rank, world, dtype):
    out = {}
    for option, k, overlap in VARIANTS:
        cfg = OptimConfig(name="lanton", option=option, estimate_every=k, nuclear_estimator="exact")
        model = make_model(dtype)
        opt = build_sharded_optimizer(model, cfg, overlap=overlap)
        out[(option, k, overlap)] = sharded_run(rank, world, opt, model, STEPS)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_lanton_equals_reference_for_every_world_size_option_and_k(world):
    """20 steps, fp64: Option I/II, k = 1 and 5, overlap off (against the reference) and on
    (against the reference with delay_lr_factor=True). fp64 separates optimizer bugs from
    reduction-order noise; the residue (≤ 3e-7) is the model's fp32 RMSNorm upcast. World 3
    (uneven ownership) is the contract's (tests/test_contract.py: Option I k = 1, 3, Option II)."""
    results = run(_equivalence_worker, world, torch.float64)
    for option, k, overlap in VARIANTS:
        cfg = OptimConfig(name="lanton", option=option, estimate_every=k, nuclear_estimator="exact")
        ref = reference_run(cfg, STEPS, world, torch.float64, delay=overlap)
        for r, res in enumerate(results):
            err = max_rel_err(res[(option, k, overlap)], ref)
            assert err <= 1e-6, f"world {world} rank {r} option {option} k {k} overlap {overlap}: rel err {err:.2e}"


def _algorithm_worker(rank, world, name, dtype):
    cfg = OptimConfig(name=name, estimate_every=5, nuclear_estimator="exact")
    model = make_model(dtype)
    return sharded_run(rank, world, build_sharded_optimizer(model, cfg, overlap=False), model, STEPS)


def test_engine_adamw_at_world_1_equals_torch_adamw_exactly():
    """Same batches, no reduction: the engine's elementwise AdamW is torch.optim.AdamW's arithmetic
    (on 3 ranks it is within the contract's AdamW bound, tests/test_contract.py)."""
    ref = reference_run(OptimConfig(name="adamw", estimate_every=5, nuclear_estimator="exact"), STEPS, dtype=torch.float64)
    assert max_rel_err(run(_algorithm_worker, 1, "adamw", torch.float64)[0], ref) == 0.0


def _meter_worker(rank, world, name, option):
    cfg = OptimConfig(name=name, estimate_every=2, option=option, nuclear_estimator="exact")
    model = make_model()
    opt = build_sharded_optimizer(model, cfg)
    sharded_run(rank, world, opt, model, 4)
    meter = opt.meter
    return {s: (meter.tensor_bytes(s), meter.scalar_bytes(s), meter.by_phase(s)) for s in range(1, 5)}


@pytest.mark.parametrize("world", [2, 3])
def test_lanton_moves_exactly_adamw_tensor_bytes(world):
    lanton = run(_meter_worker, world, "lanton", "I")
    adamw = run(_meter_worker, world, "adamw", "I")
    for r in range(world):
        for step in range(1, 5):
            assert lanton[r][step][0] == adamw[r][step][0] > 0
            phases = set(lanton[r][step][2])
            assert phases - {"grad_reduce", "param_gather"} <= {"finite", "norm", "variance"}
            assert ("variance" in phases) == (step % 2 == 0)


def test_option_two_adds_one_gradient_reduce_scatter_on_estimation_steps_only():
    res = run(_meter_worker, 2, "lanton", "II")
    for step in range(1, 5):
        phases = res[0][step][2]
        if step % 2 == 0:
            assert phases["grad_reduce_half"] == phases["grad_reduce"]
        else:
            assert "grad_reduce_half" not in phases


def _kept_differences_worker(rank, world):
    cfg = OptimConfig(name="lanton", estimate_every=2, option="II", nuclear_estimator="exact")
    model = make_model()
    opt = build_sharded_optimizer(model, cfg)
    kept = []
    for step, x in enumerate(batches(4), start=1):
        backward_step(model, opt, rows(x, rank, world))
        kept.append(sum(pc.diff2 is not None for pc in opt.pieces))
    return kept


def test_option_two_keeps_no_half_batch_difference_after_its_estimation_step():
    """D = ∇_A − ∇_B is consumed by the step that estimates: no piece holds it through the next
    forward and backward (the planner counts no such buffer)."""
    for kept in run(_kept_differences_worker, 2):
        assert kept == [0, 0, 0, 0]


def test_ownership_balances_newton_schulz_flops_deterministically():
    specs = list(classify_parameters(make_model()).values())
    a, b = plan_ownership(specs, 3), plan_ownership(list(reversed(specs)), 3)
    assert a.owner == b.owner
    assert a.imbalance < 1.35
    assert set(a.owner) == {s.name for s in specs if s.geometry.value == "hidden"}


def _save_after_7(rank, world, path, dtype):
    cfg = OptimConfig(name="lanton", estimate_every=3, nuclear_estimator="exact")
    model = make_model(dtype)
    opt = build_sharded_optimizer(model, cfg)
    for x in batches(20)[:7]:
        backward_step(model, opt, rows(x, rank, world))
    checkpoint.save(opt, path, model)


def _uninterrupted(rank, world, dtype):
    cfg = OptimConfig(name="lanton", estimate_every=3, nuclear_estimator="exact")
    model = make_model(dtype)
    return sharded_run(rank, world, build_sharded_optimizer(model, cfg), model, 20)


def test_resharded_resume_4_to_2_to_3_matches_to_1e6():
    """Steps 1–7 on 4 ranks, 8–14 on 2, 15–20 on 3, against 20 steps on 3 ranks. In fp64, so
    the bound tests the checkpoint, not fp32 reduction order (which differs by world size)."""
    with tempfile.TemporaryDirectory() as tmp:
        p4, p2 = os.path.join(tmp, "w4"), os.path.join(tmp, "w2")
        run(_save_after_7, 4, p4, torch.float64)
        run(_reshard_worker, 2, p4, p2)
        resumed = run(_resume_from_14, 3, p2)
    full = run(_uninterrupted, 3, torch.float64)
    assert max_rel_err(resumed[0], full[0]) <= 1e-6


def _reshard_worker(rank, world, src, dst):
    cfg = OptimConfig(name="lanton", estimate_every=3, nuclear_estimator="exact")
    model = make_model(torch.float64)
    opt = build_sharded_optimizer(model, cfg)
    checkpoint.load(opt, src, model)
    for x in batches(20)[7:14]:
        backward_step(model, opt, rows(x, rank, world))
    checkpoint.save(opt, dst, model)


def _resume_from_14(rank, world, path):
    cfg = OptimConfig(name="lanton", estimate_every=3, nuclear_estimator="exact")
    model = make_model(torch.float64)
    opt = build_sharded_optimizer(model, cfg)
    checkpoint.load(opt, path, model)
    assert opt.t == 14
    for x in batches(20)[14:]:
        backward_step(model, opt, rows(x, rank, world))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _failing_worker(rank, world, where):
    from lanton_dist.engine.meter import fail_fast

    cfg = OptimConfig(name="lanton", estimate_every=1, nuclear_estimator="exact")
    model = make_model()
    opt = build_sharded_optimizer(model, cfg)
    if where == "optimizer" and rank == 1:
        opt.core._directions = lambda *a: (_ for _ in ()).throw(RuntimeError("injected failure in the LMO"))
    for i, x in enumerate(batches(3)):
        with fail_fast():
            if where == "forward" and i == 1 and rank == 1:
                raise RuntimeError("injected failure in the forward pass")
            backward_step(model, opt, rows(x, rank, world))


@pytest.mark.parametrize("where", ["forward", "optimizer"])
def test_a_rank_that_raises_makes_every_rank_fail_naming_it_without_hanging(where):
    import time

    start = time.time()
    results = run(_failing_worker, 3, where, timeout_s=20, expect_error=True)
    assert time.time() - start < 90
    assert all(status == "error" for status, _ in results)
    assert "injected failure" in results[1][1]
    for r in (0, 2):
        assert "rank 1 raised RuntimeError: injected failure" in results[r][1], results[r][1][:500]


def _nan_worker(rank, world):
    cfg = OptimConfig(name="lanton", estimate_every=1, nuclear_estimator="exact")
    model = make_model()
    opt = build_sharded_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = rows(batches(1)[0], rank, world)
    from engine_cases import loss_fn

    loss_fn(model, x).backward()
    if rank == 2:
        next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    same = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    return same, opt.skipped_steps, opt.t, len(opt.core.state)


def test_nan_gradient_on_one_rank_skips_the_step_on_every_rank_with_state_untouched():
    for same, skipped, t, n_state in run(_nan_worker, 3):
        assert same and skipped == 1 and t == 0 and n_state == 0


def _mismatch_worker(rank, world):
    model = make_model(seed=0)
    if rank == 1:
        model.lm_head = torch.nn.Linear(32, 65, bias=False)
    build_sharded_optimizer(model, OptimConfig())


def test_ranks_with_different_models_get_a_clear_error():
    results = run(_mismatch_worker, 2, expect_error=True)
    assert all(status == "error" and "different model" in msg for status, msg in results)


def test_engine_refuses_to_run_without_a_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        build_sharded_optimizer(make_model(), OptimConfig())
