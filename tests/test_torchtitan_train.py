"""torchtitan's llama3 ``debugmodel`` trained through ``LANTONOptimizersContainer`` with real
forward and backward passes, FSDP2 at world 2 on CPU gloo, against the single-process reference.

torchtitan's llama3 attention is FlexAttention, which has no backward on CPU (torch 2.13); here
every layer's inner attention is replaced by torchtitan's own ``ScaledDotProductAttention``
(causal), which is the same attention for one document per row (no packing). Everything else —
fused QKV projection, complex RoPE, RMSNorm, SwiGLU, tied-free head, torchtitan's init — is the
shipped model. What stays untested on CPU: FlexAttention's block-causal masks and torchtitan's
``Trainer`` loop (it defaults to CUDA).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run
from engine_cases import max_rel_err

pytest.importorskip("torchtitan")
pytestmark = pytest.mark.slow

STEPS, BATCH, SEQ = 4, 4, 32


def _model() -> torch.nn.Module:
    """The shipped debugmodel (6 layers, dim 256, fused QKV), fp64, causal SDPA attention."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    torch.manual_seed(0)
    model = model_registry("debugmodel").model.build()
    model.init_weights()
    for layer in model.layers.values():
        layer.attention.inner_attention = ScaledDotProductAttention(ScaledDotProductAttention.Config())
    return model.double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 2048, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _optim_config(reference: bool = False):
    """LANTON, k = 2; the container overlaps the variance reduction (factors one step late),
    so the reference delays its factors too."""
    from lanton_dist.config import OptimConfig

    return OptimConfig(name="lanton", estimate_every=2, nuclear_estimator="exact", delay_lr_factor=reference)


def _sharded(rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lanton_dist.integrations.torchtitan import LANTONOptimizersContainer

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LANTONOptimizersContainer.Config(lanton=_optim_config()).build(model_parts=[model])
    rows = BATCH // world
    for step in range(STEPS):
        x, y = _batch(step)
        _loss(model, x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]).backward()
        opt.step()
        opt.zero_grad()
    assert opt.optimizers[0].t == STEPS and opt.optimizers[0].core.E.any(), "the noise trackers were estimated"
    return {n: p.full_tensor() for n, p in model.named_parameters()}


def _reference() -> dict[str, torch.Tensor]:
    from lanton_dist.factory import build_optimizer

    model = _model()
    opt = build_optimizer(model, _optim_config(reference=True))
    for step in range(STEPS):
        _loss(model, *_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_torchtitan_llama3_trains_through_the_container_as_the_single_process_reference():
    sharded = run(_sharded, 2, timeout_s=300)
    ref = _reference()
    initial = {n: p.detach() for n, p in _model().named_parameters()}
    assert max_rel_err(ref, initial) > 1e-3, "the reference moved"
    for r, params in enumerate(sharded):
        assert set(params) == set(ref)
        err = max_rel_err(params, ref)
        assert err <= 1e-6, f"rank {r}: rel err {err:.2e}"
