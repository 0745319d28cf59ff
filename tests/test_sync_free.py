"""Host syncs of an optimizer step: the ZeRO engine and the FSDP2 adapter read the device once per
step — the job-wide skip/presence vote (``ShardedCore._agree``'s ``tolist``) — whatever the
model size. Every ``Tensor`` method that copies a device value to the host is counted during
``step()`` (on a GPU each one stalls the CPU until the device catches up), and so is every
tensor built from host values (on a GPU a blocking host→device copy): once the step's lists
(layers present, owned matrices, ``beta2``/``alpha``) are on the device, a step builds none."""
from __future__ import annotations

import pytest
import torch

from distributed import run
from engine_cases import TINY, batches, loss_fn, rows
from host_reads import HOST_READS, counting_host_copies, counting_host_reads
from lanton_dist.config import OptimConfig
from lanton_dist.model import Transformer

pytestmark = pytest.mark.slow

#: The one allowed host read per step: the skip vote (``finite``) of ``ShardedCore._agree``.
READS_PER_STEP = 1
STEPS = 6  # k = 2: steps 2, 4 and 6 estimate, 3 and 5 consume the overlapped variance
STEADY = 4  # from this step on every list the step needs is already on the device


def _model(n_layers: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY.__class__(**{**TINY.__dict__, "n_layers": n_layers}))


def _reads_per_step(rank: int, world: int, model, opt) -> list[dict[str, int]]:
    out = []
    for x in batches(STEPS):
        loss_fn(model, rows(x, rank, world)).backward()
        with counting_host_reads() as counts, counting_host_copies() as copies:
            opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({**counts, **copies})
    return out


def _job(rank: int, world: int) -> dict[tuple[str, int], list[dict[str, int]]]:
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2
    from test_fsdp2 import _shard

    cfg = OptimConfig(name="lanton", estimate_every=2)
    result = {}
    for n_layers in (2, 4):
        model = _model(n_layers)
        result[("zero", n_layers)] = _reads_per_step(rank, world, model, build_sharded_optimizer(model, cfg))
        model = _shard(_model(n_layers), world)
        result[("fsdp2", n_layers)] = _reads_per_step(rank, world, model, LANTONFSDP2(model, cfg))
    return result


@pytest.fixture(scope="module")
def reads():
    return run(_job, 2, timeout_s=120)


@pytest.mark.parametrize("engine", ["zero", "fsdp2"])
def test_one_host_read_and_no_host_copy_per_steady_step_whatever_the_model_size_2_ranks(reads, engine):
    for rank, result in enumerate(reads):
        small, large = result[(engine, 2)], result[(engine, 4)]
        assert large == small, f"rank {rank}: host reads grow with the model: {small} -> {large}"
        for step, counts in enumerate(small, start=1):
            host_reads = {k: v for k, v in counts.items() if k != "tensor"}
            assert host_reads == {"tolist": READS_PER_STEP}, f"rank {rank} step {step}: {counts}"
            if step >= STEADY:
                assert "tensor" not in counts, f"rank {rank} step {step} builds tensors from host values: {counts}"
        assert any("tensor" in c for c in small[:STEADY - 1]), "the first steps copy their lists: the counter sees them"


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(2)
    with counting_host_reads() as counts:
        t[0].item(), bool(t[0]), t.tolist(), t.cpu(), float(t[0]), int(t[0])
    assert counts == dict.fromkeys(HOST_READS, 1)
    assert torch.Tensor.__dict__.get("item") is None  # restored: the method is torch's again


def test_the_copy_counter_sees_torch_tensor_and_restores_it():
    original = torch.tensor
    with counting_host_copies() as counts:
        torch.tensor([1.0, 2.0])
    assert counts == {"tensor": 1} and torch.tensor is original


def test_device_lists_copy_a_list_once_and_again_only_when_it_changes():
    from lanton_dist.engine.device_lists import DeviceLists

    lists, cpu = DeviceLists(), torch.device("cpu")
    first = lists.get("present", [1, 2, 3], torch.long, cpu)
    assert lists.get("present", (1, 2, 3), torch.long, cpu) is first and lists.copies == 1
    changed = lists.get("present", [1, 3], torch.long, cpu)  # a parameter without a gradient this step
    assert changed.tolist() == [1, 3] and lists.copies == 2
    assert lists.get("present", [1, 3], torch.float64, cpu).dtype == torch.float64 and lists.copies == 3
    assert lists.get("beta2", [1, 3], torch.long, cpu) is not changed  # keys never share a copy
