"""The planner's memory column is what the engine actually holds: per-rank bytes of parameters,
gradients (measured after backward: the bucket buffer and the copied parameters' own grads),
communication buffers and optimizer state of a built ShardedLANTON on CPU gloo ranks
(world 2 and 3) equal lanton_dist.plan.memory's, byte for byte."""
from __future__ import annotations

import pytest
import torch

from distributed import run
from engine_cases import TINY, batches, loss_fn, make_model, rows
from lanton_dist.config import OptimConfig
from lanton_dist.engine import build_sharded_optimizer
from lanton_dist.plan import HARDWARE, OptimSettings, ParallelLayout, StepPlanner, plan_table

K = 3  # estimate_every: Option I keeps the previous gradient after step K-1 and drops it after step K

pytestmark = pytest.mark.slow


def reachable_bytes(root, skip: set[int], skip_storages: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through attributes,
    dicts and sequences (objects in ``skip`` and storages in ``skip_storages`` left out)."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        x = stack.pop()
        if id(x) in seen or id(x) in skip:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if st.data_ptr() not in skip_storages:
                storages[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type) and type(x).__module__.startswith(("lanton_dist", "collections")):
            stack += list(vars(x).values())
    return sum(storages.values())


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def _held(opt, model, grads: dict[int, int]) -> dict[str, int]:
    """Bytes held after a step; ``grads``: the gradient storages measured after backward."""
    params = _storages([*model.parameters(), opt.storage.param_buffer])
    grads = grads | _storages([opt.storage.grad_buffer])
    core = opt.core
    state = sum(t.untyped_storage().nbytes() for st in core.state.values() for t in st.values())
    return {"buffers": reachable_bytes(opt, {id(core)}, set(params) | set(grads)),
            "state": state + core.H.untyped_storage().nbytes() + core.F.untyped_storage().nbytes(),
            "prev_grad": any("prev_grad" in st for st in core.state.values()),
            "parameters": sum(params.values()), "gradients": sum(grads.values())}


def _memory_worker(rank, world, name):
    cfg = OptimConfig(name=name, option="I", estimate_every=K, nuclear_estimator="exact")
    model = make_model()
    opt = build_sharded_optimizer(model, cfg)
    out = {}
    for step, x in enumerate(batches(K), start=1):
        loss_fn(model, rows(x, rank, world)).backward()
        grads = _storages([p.grad for p in model.parameters()])
        opt.step()
        out[step] = _held(opt, model, grads)
        opt.zero_grad(set_to_none=True)
    return out

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["lanton", "adamw"])
def test_planner_memory_equals_the_bytes_the_engine_holds(world, name):
    held = run(_memory_worker, world, name)
    planner = StepPlanner(TINY, ParallelLayout(nodes=1, gpus_per_node=world, strategy="zero2"),
                          OptimSettings(algorithm=name, option="I", estimate_every=K, nuclear_estimator="exact", device="cpu"))
    for d in range(world):
        mem = planner.rank_memory(0, d, 0)
        for step in range(1, K + 1):
            got = held[d][step]
            assert got["parameters"] == mem.parameters, f"rank {d}: parameters {got['parameters']} vs planned {mem.parameters}"
            assert got["gradients"] == mem.gradients, f"rank {d}: gradients {got['gradients']} vs planned {mem.gradients}"
            assert got["buffers"] == mem.buffers, f"rank {d} step {step}: buffers {got['buffers']} vs planned {mem.buffers}"
            expected = mem.state + (mem.state_peak_extra if got["prev_grad"] else 0)
            assert got["state"] == expected, f"rank {d} step {step}: state {got['state']} vs planned {expected}"
        if name == "lanton":
            assert held[d][K - 1]["prev_grad"] and not held[d][K]["prev_grad"], "Option I keeps G_{t-1} only before estimation"


def _early_worker(rank, world):
    """Bytes the core holds after step 1, and after step 2's backward (owner steps started)."""
    model = make_model()
    opt = build_sharded_optimizer(model, OptimConfig(name="lanton", estimate_every=K), bucket_mb=0.02,
                                  overlap_grad_reduce=True)
    xs = batches(2)
    loss_fn(model, rows(xs[0], rank, world)).backward()
    opt.step()
    opt.zero_grad()
    after_step = reachable_bytes(opt.core, set(), set())
    loss_fn(model, rows(xs[1], rank, world)).backward()
    return after_step, reachable_bytes(opt.core, set(), set())


def test_owner_steps_started_during_backward_hold_at_most_the_planned_early_extra():
    planner = StepPlanner(TINY, ParallelLayout(nodes=1, gpus_per_node=2, strategy="zero2", bucket_mb=0.02),
                          OptimSettings(algorithm="lanton", estimate_every=K, device="cpu"))
    for d, (after_step, after_backward) in enumerate(run(_early_worker, 2)):
        early = after_backward - after_step
        assert 0 < early <= planner.rank_memory(0, d, 0).early_peak_extra, (d, early)


def test_the_fit_check_warns_when_a_rank_does_not_fit_the_gpu():
    """fp32 on 8 H100s: 7B fits now that parameters and gradients are views of the bucket
    buffers (one model-size copy each; ~62.5 GiB peak with the early owner steps' momentum
    copies and directions; 4 copies and ~110 GiB before); 13B (~112 GiB) does not, and the table
    says so."""
    _, small = plan_table("llama-7b", ParallelLayout(), OptimSettings(), HARDWARE["h100"], algorithms=("lanton",),
                          ks=(10,), growth_models=("llama-1b",))
    mem = small["plans"]["lanton"]["memory"]
    assert mem["fits"] and mem["buffers"] == 0 and mem["peak"] < 64 * 2**30
    text, data = plan_table("llama-13b", ParallelLayout(), OptimSettings(), HARDWARE["h100"], algorithms=("lanton",),
                            ks=(10,), growth_models=("llama-1b",))
    mem = data["plans"]["lanton"]["memory"]
    assert not mem["fits"] and mem["peak"] > mem["gpu_bytes"] == 80 * 2**30
    assert "WARNING: does not fit" in text
