"""Nothing grows with steps or with W² (``docs/scale_costs.md``): the communication meter's memory
is bounded over 10,000 steps; construction's agreement collectives move the same bytes per rank at
W = 16 and W = 256; a step's host work (torch calls) is the same at W = 16 and W = 256 for the ZeRO
engine's uneven buckets and the FSDP2 all-to-all exchange; a mismatch between ranks still raises a
clear error naming the rank on every rank.

Large worlds run in this process on torch's fake process group (every collective a no-op; one
process plays rank 0 of W). Its all-to-all refuses an empty input with a non-empty output (NCCL
and gloo-with-data accept it), so the exchange tests replace ``all_to_all_single`` by a no-op:
they count host work, not data.
"""
from __future__ import annotations

import pickle
import tracemalloc
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lanton_dist.config import OptimConfig
from lanton_dist.engine.meter import Collectives, CommMeter
from tests.distributed import run
from tests.engine_cases import make_model

PHASES = ("grad_reduce", "param_gather", "finite", "norm", "variance")
SMALL, LARGE = 16, 256


# ---------------------------------------------------------------------------------------- meter
def _meter_steps(meter: CommMeter, first: int, last: int, per_step: int = 20) -> None:
    coll = Collectives(meter)  # no process group: world 1, every call recorded
    t = torch.zeros(8)
    for step in range(first, last + 1):
        meter.step = step
        for i in range(per_step):
            coll.all_reduce(t, PHASES[i % len(PHASES)])


def test_meter_memory_is_constant_over_10000_steps_and_its_totals_stay_exact():
    meter = CommMeter()
    tracemalloc.start()
    try:
        _meter_steps(meter, 1, 2000)  # both windows (32 and 1,024 steps) full
        before, _ = tracemalloc.get_traced_memory()
        _meter_steps(meter, 2001, 10_000)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"meter grew by {after - before} bytes over 8,000 steps"
    assert len(meter.records) == 20 * meter.window
    assert meter.by_phase(key="count") == {p: 10_000 * 4 for p in PHASES}
    assert meter.by_phase(key="tensor_bytes") == {p: 10_000 * 4 * 32 for p in PHASES}
    assert meter.tensor_bytes(10_000, key="tensor_bytes") == 8 * 32 and meter.scalar_bytes(10_000, key="tensor_bytes") == 12 * 32


def test_meter_keeps_construction_and_the_last_steps_record_for_record_and_refuses_dropped_ones():
    meter = CommMeter(window=4, summary_window=8)
    coll = Collectives(meter)
    added: dict[int, list] = {}
    for step in range(0, 21):
        meter.step = step
        for i in range(step % 3 + 1):
            coll.all_reduce(torch.zeros(i + 1), PHASES[(step + i) % len(PHASES)])
        added[step] = [(r.op, r.phase, r.numel) for r in meter.for_step(step)]
        assert len(added[step]) == step % 3 + 1
    kept = [0, 17, 18, 19, 20]
    assert [(r.op, r.phase, r.numel) for r in meter.records] == [x for s in kept for x in added[s]]
    for s in kept:
        assert [(r.op, r.phase, r.numel) for r in meter.for_step(s)] == added[s]
    assert meter.by_phase(13, key="count") == dict(Counter(p for _, p, _ in added[13]))
    with pytest.raises(KeyError, match="last 4 steps"):
        meter.for_step(16)
    with pytest.raises(KeyError, match="last 8 steps"):
        meter.by_phase(12)
    assert meter.for_step(21) == [] and meter.by_phase(21) == {}  # not recorded yet: empty, not an error
    assert sum(meter.by_phase(key="count").values()) == sum(len(v) for v in added.values())


# ---------------------------------------------------------------------------------------- fake worlds
@pytest.fixture
def fake_world():
    """``fake_world(W)``: make this process rank 0 of ``W`` on torch's fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(world: int) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


class _Bytes:
    """Counts the bytes this rank receives through the agreement collectives of construction."""

    def __init__(self, monkeypatch) -> None:
        self.total = 0
        for name in ("all_gather_object", "broadcast_object_list", "all_reduce", "all_gather"):
            monkeypatch.setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if name == "all_gather_object":
                self.total += len(args[0]) * len(pickle.dumps(args[1]))
            elif name == "broadcast_object_list":
                self.total += sum(len(pickle.dumps(o)) for o in args[0])
            elif name == "all_reduce":
                self.total += args[0].numel() * args[0].element_size()
            else:
                self.total += sum(t.numel() * t.element_size() for t in args[0])
            return fn(*args, **kwargs)
        return counted


def _fsdp2_model(world: int, hsdp: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp
            else init_device_mesh("cpu", (world,)))
    model = make_model()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _build(stack: str, world: int, bucket_mb: float = 0.002):
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    if stack == "zero":
        model = make_model()
        return model, build_sharded_optimizer(model, OptimConfig(estimate_every=2), bucket_mb=bucket_mb)
    model = _fsdp2_model(world, hsdp=stack == "hsdp")
    return model, LANTONFSDP2(model, OptimConfig(estimate_every=2), bucket_mb=bucket_mb)


@pytest.mark.parametrize("stack", ["zero", "fsdp2", "hsdp"])
def test_construction_agreement_moves_the_same_bytes_per_rank_at_16_and_256_ranks(stack, fake_world, monkeypatch):
    moved = {}
    for world in (SMALL, LARGE):
        fake_world(world)
        counter = _Bytes(monkeypatch)
        _build(stack, world)
        moved[world] = counter.total
        monkeypatch.undo()
    assert moved[SMALL] > 0 and moved[LARGE] == moved[SMALL], moved


class _TorchCalls(TorchFunctionMode):
    """Counts torch function calls (slicing, copies, zero fills, …) made on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class _NoWork:
    def wait(self) -> None:
        return None


def _zeros_all_to_all(out, inp, *args, **kwargs):
    out.zero_()  # the fake backend refuses some all-to-alls; receive zeros (finite) instead
    return _NoWork()


def _step_calls(stack: str, world: int, monkeypatch) -> list[int]:
    """Torch calls of each of 4 optimizer steps (estimation steps 2 and 4) on rank 0 of ``world``.
    ZeRO: forward and backward on this rank's batch. FSDP2: the fake backend's all-gathers leave
    the unsharded parameters uninitialised, so the gradient shards are set directly (random)."""
    from torch.distributed.tensor import DTensor

    monkeypatch.setattr(dist, "all_to_all_single", _zeros_all_to_all)
    torch.manual_seed(0)
    model, opt = _build(stack, world)
    x = torch.randint(0, 64, (4, 9))
    counts = []
    for _ in range(4):
        if stack == "zero":
            F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        else:
            for p in model.parameters():
                p.grad = DTensor.from_local(torch.randn_like(p.to_local()), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
        with _TorchCalls() as mode:
            opt.step()
        counts.append(mode.calls)
        opt.zero_grad()
    assert opt.t == 4 and opt.skipped_steps == 0
    return counts


@pytest.mark.parametrize("stack", ["zero", "fsdp2"])
def test_optimizer_step_host_work_does_not_grow_with_the_world(stack, fake_world, monkeypatch):
    """ZeRO engine: uneven buckets (whole matrices on owners) use per-rank chunk views built once;
    FSDP2: the exchange packs and unpacks only the pieces that move (no work per empty
    destination). Rank 0's torch calls per step at W = 256 stay within those at W = 16 plus what
    its own pieces add (rank 0's share differs between worlds)."""
    calls = {}
    for world in (SMALL, LARGE):
        fake_world(world)
        calls[world] = _step_calls(stack, world, monkeypatch)
        monkeypatch.undo()
    for small, large in zip(calls[SMALL], calls[LARGE]):
        assert large <= small * 1.25, calls


def _exchange_calls(world: int) -> int:
    """Torch calls of one gather → identity → scatter of 8 row-sharded 512 × 16 matrices (FSDP2's
    layout: every rank holds 512/W rows of each) on rank 0 of ``world``, which owns 2 of them."""
    from lanton_dist.engine import Collectives, CommMeter, LocalPiece
    from lanton_dist.engine.exchange import AllToAllExchange
    from lanton_dist.engine.ownership import OwnershipPlan
    from lanton_dist.engine.ranges import row_ranges
    from lanton_dist.groups import Geometry, ParamSpec

    specs = [ParamSpec(f"w{i}", Geometry.HIDDEN, (512, 16)) for i in range(8)]
    ranges = {s.name: row_ranges(s.shape, world) for s in specs}
    plan = OwnershipPlan(world, {s.name: i % 4 for i, s in enumerate(specs)}, (0,) * world, (0,) * world)
    ex = AllToAllExchange(specs, ranges, plan, Collectives(CommMeter()), bucket_mb=0.05)
    pieces = [LocalPiece(s, 0, *ranges[s.name][0], torch.zeros(ranges[s.name][0][1] - ranges[s.name][0][0]))
              for s in specs]
    with _TorchCalls() as mode:
        out = ex.apply(pieces, [pc.param for pc in pieces], lambda names, mats: mats, "lmo_gather", "lmo_scatter")
    assert [o.numel() for o in out] == [pc.param.numel() for pc in pieces]
    return mode.calls


def test_exchange_host_work_is_per_piece_that_moves_not_per_rank(fake_world, monkeypatch):
    """Rank 0 packs its 8 pieces, assembles its 2 owned matrices (one coalesced copy each
    whatever W) and returns their pieces: the same torch calls at W = 16 and W = 256."""
    calls = {}
    for world in (SMALL, LARGE):
        fake_world(world)
        monkeypatch.setattr(dist, "all_to_all_single", _zeros_all_to_all)
        calls[world] = _exchange_calls(world)
        monkeypatch.undo()
    assert calls[LARGE] == calls[SMALL] and calls[SMALL] > 0, calls


# ---------------------------------------------------------------------------------------- mismatches
def _mismatch_worker(rank, world):
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.engine.agree import check_same, distinct_union

    out = {}
    check_same([("a", (2, 3))], None, None, "thing")
    try:
        check_same([("a", (2, 3)), ("b", (4,) if rank != 2 else (5,))], None, None, "thing")
    except ValueError as exc:
        out["check"] = str(exc)
    out["union"] = distinct_union([("stage", rank % 2)], None, None)
    model = make_model(seed=0)
    if rank == 2:
        model.lm_head = torch.nn.Linear(32, 65, bias=False)
    try:
        build_sharded_optimizer(model, OptimConfig())
    except ValueError as exc:
        out["engine"] = str(exc)
    return out


def test_a_rank_with_another_model_gets_the_same_clear_error_on_every_rank_3_ranks():
    results = run(_mismatch_worker, 3)
    for out in results:
        assert out["check"] == ("rank 2 has a different thing (first difference from rank 0: entry 1: rank 0 has "
                                "('b', (4,)), the other ('b', (5,)))")
        assert sorted(out["union"]) == [[("stage", 0)], [("stage", 1)]]
        assert out["union"] == results[0]["union"]
        assert out["engine"].startswith("rank 2 has a different model/parameter list") and "lm_head.weight" in out["engine"]


def _oss_bytes_worker(rank, world):
    import pytest as _pytest

    from lanton_dist.integrations.fairscale import lanton_oss

    with _pytest.MonkeyPatch.context() as mp:
        counter = _Bytes(mp)
        lanton_oss(make_model(), OptimConfig())
    return counter.total


def test_fairscale_construction_agreement_moves_the_same_bytes_per_rank_at_2_and_4_ranks():
    """OSS owners by one all-reduce of two integers per parameter, the layout check by a digest
    (the fake process group cannot play OSS: its all-reduce does not sum the owners)."""
    two, four = run(_oss_bytes_worker, 2), run(_oss_bytes_worker, 4)
    assert len(set(two + four)) == 1 and two[0] > 0, (two, four)
