"""Megatron's tensor-parallel exchange hands its collectives buffers of the parameters' dtype and
device only — also the empty ones of a TP rank that owns nothing in a call (NCCL rejects CPU
tensors; a dtype mismatch across ranks corrupts the all-to-all) — and round-trips the shards."""
from __future__ import annotations

import pytest
import torch

from distributed import run

pytestmark = pytest.mark.slow
DTYPE = torch.float64  # not torch's default dtype, so a default-made buffer shows


def _exchange_calls(rank: int, world: int):
    from lanton_dist.engine import Collectives, CommMeter, LocalPiece
    from lanton_dist.groups import Geometry, ParamSpec
    from lanton_dist.integrations.megatron import TensorParallelExchange
    from lanton_dist.integrations.megatron_model import MegatronParam

    spec = ParamSpec("w", Geometry.HIDDEN, (4, 6))
    info = MegatronParam("w", spec, partition_dim=0, tp_size=world, local_shape=(4 // world, 6))
    coll = Collectives(CommMeter(), None, "tp")
    calls = []
    all_to_all = coll.all_to_all

    def recorded(out, inp, out_splits, in_splits, phase):
        calls.append((phase, inp.dtype, inp.device, out.dtype, out.device))
        return all_to_all(out, inp, out_splits, in_splits, phase)

    coll.all_to_all = recorded
    exchange = TensorParallelExchange({"w": info}, coll, device=torch.device("cpu"), dtype=DTYPE)
    shard = torch.arange(spec.numel // world, dtype=DTYPE) + 100 * rank
    piece = LocalPiece(spec, 0, rank * shard.numel(), (rank + 1) * shard.numel(), shard)
    mine = exchange.owned([piece])  # the core's first call of a step: fixes the TP owners
    owned = exchange.gather([piece], [shard], "lmo_gather")  # one matrix: one TP rank owns it, the other nothing
    back = exchange.scatter([piece], {n: m * 2 for n, m in owned.items()}, "lmo_scatter")
    exchange.gather([], [], "variance_gather")  # a call with no matrix at all
    exchange.scatter([], {}, "lmo_scatter")
    assert mine == list(owned), (mine, list(owned))
    return calls, {n: m.clone() for n, m in owned.items()}, back[0].clone(), shard


def test_tp_exchange_buffers_have_the_parameters_dtype_and_device_also_when_empty_tp_2():
    results = run(_exchange_calls, 2, timeout_s=60)
    owners = [rank for rank, (_, owned, _, _) in enumerate(results) if owned]
    assert len(owners) == 1, "exactly one TP rank owns the matrix"
    full = torch.cat([shard.view(2, 6) for _, _, _, shard in results])
    for rank, (calls, owned, back, shard) in enumerate(results):
        assert [c[0] for c in calls] == ["lmo_gather", "lmo_scatter", "variance_gather", "lmo_scatter"]
        for phase, *placed in calls:
            assert placed == [DTYPE, torch.device("cpu"), DTYPE, torch.device("cpu")], f"rank {rank} {phase}: {placed}"
        if owned:
            torch.testing.assert_close(owned["w"], full, rtol=0, atol=0)
        torch.testing.assert_close(back, 2 * shard, rtol=0, atol=0)
