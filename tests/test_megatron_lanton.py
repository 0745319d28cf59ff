"""LANTON on Megatron-core (TP × PP × DP on CPU gloo): the training step, weights and checkpoint
tensors that tests/test_contract.py (TP2×DP2 and TP2×PP2 against one process: every algorithm,
Newton–Schulz once per logical matrix, bit-exact resume) and tests/test_missing_gradients.py use."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

from test_megatron_model import load_pretrain  # noqa: E402
from lanton_dist.groups import Geometry  # noqa: E402
from lanton_dist.integrations import megatron_model as mm  # noqa: E402

OPTIM = dict(optim__name="lanton", optim__estimate_every=3, optim__nuclear_estimator="exact", train__global_batch=8,
             train__micro_batch=2, parallel__overlap="false")


def _train(cfg, steps, start=0, opt=None, model=None):
    from megatron.core import parallel_state as ps

    pre = load_pretrain()
    dp = ps.get_data_parallel_world_size()
    micro, num_micro = pre.batch_geometry(cfg, dp)
    data, _ = pre.build_data(cfg, 0, 0)
    fwd = pre.make_forward_step(torch.device("cpu"), mm.causal_attention_mask(cfg.data.seq_len), False)
    for step in range(start, steps):
        model.zero_grad(set_to_none=True)
        batches = pre.micro_batches(data, step, cfg.train.global_batch, micro, num_micro, ps.get_data_parallel_rank(), dp)
        pre.run_batches(model, fwd, batches, num_micro, cfg.data.seq_len, micro, False, torch.device("cpu"))
        opt.step()


def _logical_params(model, cfg):
    """TP-gathered parameters in TP=1 layout, keyed by global name, from every pipeline stage."""
    import torch.distributed as dist

    specs = mm.logical_param_specs(model, cfg)
    mine = {i.global_name: mm.to_tp1_layout(mm.tp_gather(p.data, i), i) for n, p in model.named_parameters() for i in [specs[n]]}
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return {k: v for d in out for k, v in d.items()}


def canonical_init(model, cfg) -> None:
    """Weights as a function of the global parameter name only, so TP/PP layouts build the same
    logical model (Megatron's own init depends on the pipeline stage)."""
    import zlib

    specs = mm.logical_param_specs(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            info = specs[n]
            g = torch.Generator().manual_seed(zlib.crc32(info.global_name.encode()))
            full = torch.randn(info.spec.shape, generator=g)
            full = 1.0 + 0.1 * full if info.spec.geometry is Geometry.VECTOR else 0.02 * full
            p.copy_(mm.tp_shard(mm.from_tp1_layout(full, info), info))


def _model_tensors(model, cfg):
    from megatron.core import parallel_state as ps

    specs = mm.logical_param_specs(model, cfg)
    tp = ps.get_tensor_model_parallel_rank()
    return {f"model/{specs[n].global_name}@tp{tp if specs[n].is_sharded else 0}": p.detach().clone()
            for n, p in model.named_parameters()}


def _load_model_tensors(model, cfg, extra):
    from megatron.core import parallel_state as ps

    specs = mm.logical_param_specs(model, cfg)
    tp = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(extra[f"model/{specs[n].global_name}@tp{tp if specs[n].is_sharded else 0}"])
