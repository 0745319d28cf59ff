"""Specification of LANTON under fairscale's OSS (lanton_oss), on CPU gloo.

fairscale 0.4.13 runs on torch 2.13: OSS constructs, steps, broadcasts and consolidates.
Gradients are averaged by torch ``DistributedDataParallel``. Every algorithm against the
single-process reference, Newton–Schulz once per matrix and the consolidated-state resume are
the contract every backend keeps (``tests/test_contract.py``, 3 ranks); here, what OSS's
whole-parameter ownership adds: no tensor traffic, one owner per parameter.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fairscale")

from distributed import run  # noqa: E402
from engine_cases import batches, loss_fn, make_model, rows  # noqa: E402
from lanton_dist.config import OptimConfig  # noqa: E402
from lanton_dist.groups import classify_parameters  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4


def _cfg(k=3, option="I"):
    return OptimConfig(name="lanton", option=option, estimate_every=k, nuclear_estimator="exact")


def _metered_run(rank, world):
    """LANTON (k = 1, overlapped variance) under OSS + DDP; what this rank's shard moved and owns."""
    from torch.nn.parallel import DistributedDataParallel

    from lanton_dist.integrations.fairscale import lanton_oss

    model = make_model()
    ddp, opt = DistributedDataParallel(model), lanton_oss(model, _cfg(k=1))
    for x in batches(STEPS):
        loss_fn(ddp, rows(x, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    shard = opt.optim
    return dict(tensor_bytes=shard.meter.tensor_bytes(), ops={r.op for r in shard.meter.records},
                owned=sorted(shard._mine))


def test_oss_owners_move_no_tensor_bytes_and_every_parameter_has_one_owner():
    """OSS's whole-parameter partition is the owner scheme: no gather/scatter at all, only
    scalar all-reduces (3 ranks: an uneven partition)."""
    results = run(_metered_run, 3, timeout_s=300)
    for res in results:
        assert res["tensor_bytes"] == 0
        assert res["ops"] <= {"all_reduce"}
    owned = [set(res["owned"]) for res in results]
    assert all(owned) and set.union(*owned) == set(classify_parameters(make_model())), "every parameter has one owner"
    assert sum(len(o) for o in owned) == len(set.union(*owned))


def test_option_two_is_refused_under_oss():
    from lanton_dist.integrations.fairscale import LANTONOSSShard

    with pytest.raises(ValueError, match="Option II"):
        LANTONOSSShard([], cfg=_cfg(option="II"))
