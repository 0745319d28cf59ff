"""Specification of the torchtitan entry (``LANTONOptimizersContainer``), at world 2 on CPU gloo,
on the llama3 ``debugmodel`` torchtitan 0.3.0 ships, FSDP2-sharded.

Through torchtitan's own objects: the container is built from its config (``Config.build``),
its learning rate is driven by ``LRSchedulersContainer`` and it is saved and restored by
``CheckpointManager`` (DCP). Gradients are synthetic (seeded per step and parameter, the
same on every rank): torchtitan's llama3 attention is FlexAttention, which has no backward
on CPU in torch 2.13, so its forward/backward and ``Trainer`` loop are not exercised here.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from distributed import run

pytest.importorskip("torchtitan")
pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 4, 2


def _model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.models.llama3 import model_registry

    torch.manual_seed(0)
    model = model_registry("debugmodel").model.build()
    model.init_weights()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _container(model):
    from torchtitan.components.optimizer import LRSchedulersContainer

    from lanton_dist.config import OptimConfig
    from lanton_dist.integrations.torchtitan import LANTONOptimizersContainer

    cfg = LANTONOptimizersContainer.Config(lanton=OptimConfig(name="lanton", estimate_every=2,
                                                              nuclear_estimator="exact"))
    opt = cfg.build(model_parts=[model])
    sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=STEPS)
    return opt, sched


def _manager(folder, model, opt, sched):
    from torchtitan.components.checkpoint import CheckpointManager

    cfg = CheckpointManager.Config(enable=True, folder=folder, interval=SAVE_AT, last_save_model_only=False)
    return cfg.build(dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched, states={},
                     sd_adapter=None)


def _step(model, opt, sched, t):
    """Seeded synthetic gradients (the same full tensors on every rank, then sharded), one step."""
    from torch.distributed.tensor import distribute_tensor

    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator().manual_seed(1000 * t + i)
        full = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01
        p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    opt.step()
    sched.step()
    opt.zero_grad()


def _full(model):
    return {n: p.full_tensor() for n, p in model.named_parameters()}


def _worker(rank, world, folder, phase):
    model = _model(world)
    opt, sched = _container(model)
    manager = _manager(folder, model, opt, sched)
    out = {}
    if phase == "save":
        for t in range(1, SAVE_AT + 1):
            _step(model, opt, sched, t)
        manager.save(curr_step=SAVE_AT)
        out["lr"] = [g["lr"] for g in opt.optimizers[0].param_groups]
    else:
        assert manager.load(step=SAVE_AT)
        out["t"] = opt.optimizers[0].t
        out["lr"] = [g["lr"] for g in opt.optimizers[0].param_groups]
    for t in range(SAVE_AT + 1, STEPS + 1):
        _step(model, opt, sched, t)
    out["params"] = _full(model)
    out["H"] = opt.optimizers[0].core.H.clone()
    manager.close()
    return out


def test_torchtitan_checkpoint_resume_is_bit_exact_and_reshards_from_2_to_1_rank():
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "ckpt")
        full = run(_worker, 2, folder, "save", timeout_s=300)
        resumed = run(_worker, 2, folder, "load", timeout_s=300)
        one = run(_worker, 1, folder, "load", timeout_s=300)
    assert resumed[0]["t"] == SAVE_AT and resumed[0]["lr"] == full[0]["lr"]
    assert torch.count_nonzero(full[0]["H"]) > 0, "the noise trackers were estimated"
    for r in range(2):
        for n, v in full[r]["params"].items():
            assert torch.equal(resumed[r]["params"][n], v), f"rank {r} {n}"
        assert torch.equal(resumed[r]["H"], full[r]["H"])
    for n, v in full[0]["params"].items():
        err = ((one[0]["params"][n] - v).norm() / v.norm()).item()
        assert err <= 1e-5, f"{n}: resharded 2 → 1 differs by {err:.1e}"


def test_the_container_refuses_pipeline_parts_and_torchtitan_param_groups():
    from torchtitan.components.optimizer import ParamGroupConfig

    from lanton_dist.integrations.torchtitan import LANTONOptimizersContainer

    with pytest.raises(ValueError, match="pipeline"):
        LANTONOptimizersContainer.Config().build(model_parts=[torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    cfg = LANTONOptimizersContainer.Config(param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW")])
    with pytest.raises(ValueError, match="param_groups"):
        cfg.build(model_parts=[torch.nn.Linear(2, 2)])
