"""LANTON on Megatron-core (TP × PP × DP on CPU gloo): the training step, weights and checkpoint
tensors that tests/test_contract.py (TP2×DP2 and TP2×PP2 against one process: every algorithm,
Newton–Schulz once per logical matrix, bit-exact resume) and tests/test_missing_gradients.py use."""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

from lanton_dist.groups import Geometry  # noqa: E402
from lanton_dist.integrations import megatron_model as mm  # noqa: E402
from lanton_dist.megatron_backend import MegatronBackend, checkpoint_keys  # noqa: E402

OPTIM = dict(optim__name="lanton", optim__estimate_every=3, optim__nuclear_estimator="exact", train__global_batch=8,
             train__micro_batch=2, parallel__overlap="false")


def megatron_backend(cfg, model, opt) -> MegatronBackend:
    """The training loop's Megatron backend around a model and optimizer built by the test."""
    return MegatronBackend(model, opt, torch.device("cpu"), cfg, checkpoint_keys(mm.logical_param_specs(model, cfg)),
                           shim=False)


@functools.cache
def _dataset(source: str, vocab_size: int, seq_len: int, seed: int):
    from lanton_dist.config import DataConfig
    from lanton_dist.data import build_dataset

    return build_dataset(DataConfig(source=source, seq_len=seq_len, seed=seed), vocab_size)


def forward_backward(backend, cfg, step: int, shard: tuple[int, int], halves_of: int = 1) -> None:
    """Gradients of data shard ``shard`` = (replica, replicas) of the global batch of ``step``
    (the loop's data and Megatron schedule). ``halves_of`` (one process only): order the rows so
    that Option II's two halves are those of ``halves_of`` data-parallel replicas (each
    replica's first half of its rows in the first half), the reference for that DP size."""
    data = _dataset(cfg.data.source, cfg.model.vocab_size, cfg.data.seq_len, cfg.data.seed)
    x, y = data.get_batch(step, cfg.train.global_batch, *shard)
    if halves_of > 1:
        x, y = (t.reshape(halves_of, 2, -1, t.shape[-1]).transpose(0, 1).reshape(t.shape) for t in (x, y))
    backend.forward_backward(x, y, cfg.train.micro_batch, "fp32")


def _train(cfg, steps, start=0, opt=None, model=None, halves_of: int = 1):
    backend = megatron_backend(cfg, model, opt)
    for step in range(start, steps):
        model.zero_grad(set_to_none=True)
        forward_backward(backend, cfg, step, backend.data_shard(), halves_of)
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
