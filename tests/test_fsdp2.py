"""Specification of the FSDP2 adapter (LANTONFSDP2) and of the all-to-all exchange, on CPU gloo.

One spawned job per world size computes every run the property tests below read (process
start-up dominates on 2 cores). Everything compares in fp64 (FSDP2 shards fp64 parameters as
they are): the reference is the single-process LANTON on the global batch
(``engine_cases.reference_run``), with ``delay_lr_factor=True`` when the variance is deferred.
Every algorithm against the reference on 3 ranks (Option I and II), Newton–Schulz once per
matrix and the DCP resume are the contract every backend keeps: ``tests/test_contract.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run
from engine_cases import make_model, max_rel_err, reference_run, rows, sharded_run
from lanton_dist.config import OptimConfig

pytestmark = pytest.mark.slow
STEPS = 10


def _cfg(k=3):
    return OptimConfig(name="lanton", estimate_every=k, nuclear_estimator="exact")


def _shard(model: nn.Module, world: int, blocks: bool = True) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    if blocks:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor() for n, p in params.items()}


class EmptyShardNet(nn.Module):
    """A model whose 4-row hidden matrix and 2-element gain leave rank 2 of 3 with empty shards."""

    def __init__(self, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.embed = nn.Embedding(16, 8)
        self.down = nn.Linear(8, 4, bias=False)   # rows 2, 2, 0 on 3 ranks
        self.up = nn.Linear(4, 8, bias=False)
        self.gain = nn.Parameter(torch.ones(2))     # 1, 1, 0
        self.lm_head = nn.Linear(8, 16, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.to(dtype)

    def forward(self, tok):
        h = self.embed(tok)
        z = self.down(h)
        z = z * torch.cat([self.gain, self.gain])
        return self.lm_head(h + self.up(F.silu(z)))


def _tiny_batches(steps):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 16, (6, 5), generator=g) for _ in range(steps)]


def _tiny_loss(model, x):
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def _tiny_reference(steps, delay):
    from lanton_dist.factory import build_optimizer

    model = EmptyShardNet()
    opt = build_optimizer(model, OptimConfig(**{**_cfg(k=1).__dict__, "delay_lr_factor": delay}))
    for x in _tiny_batches(steps):
        _tiny_loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _exchange_case(rank, world, pad):
    """Random uneven/empty layouts: gather must assemble the exact matrices, scatter return the pieces."""
    from lanton_dist.engine import Collectives, CommMeter, LocalPiece, plan_ownership
    from lanton_dist.groups import Geometry, ParamSpec
    from lanton_dist.engine.exchange import AllToAllExchange
    from lanton_dist.engine.ranges import row_ranges

    specs = [ParamSpec("a", Geometry.HIDDEN, (5, 3)), ParamSpec("b", Geometry.HIDDEN, (2, 4)),
             ParamSpec("c", Geometry.HIDDEN, (7, 6)), ParamSpec("d", Geometry.HIDDEN, (1, 9))]
    ranges = {s.name: row_ranges(s.shape, world) for s in specs}
    ranges["c"] = tuple((0, 0) if r == 1 else ((0, 30) if r == 0 else (30, 42)) for r in range(world))
    meter = CommMeter()
    ex = AllToAllExchange(specs, ranges, plan_ownership(specs, world), Collectives(meter), bucket_mb=60 / 2**20, pad=pad)
    full = {s.name: torch.arange(s.numel, dtype=torch.float64).view(s.shape) + 100 * i for i, s in enumerate(specs)}
    pieces = [LocalPiece(s, 0, *ranges[s.name][rank], torch.empty(0)) for s in specs]
    tensors = [full[p.name].reshape(-1)[p.start:p.stop].clone() for p in pieces]
    owned = ex.gather(pieces, tensors, "lmo_gather")
    ok_gather = set(owned) == set(ex.plan.owned(rank)) and all(torch.equal(owned[n], full[n]) for n in owned)
    back = ex.apply(pieces, tensors, lambda names, mats: [2 * m for m in mats], "lmo_gather", "lmo_scatter")
    ok_apply = all(torch.equal(b, 2 * t) for b, t in zip(back, tensors))
    sent = sum(r.sent_bytes for r in meter.records if r.phase == "lmo_gather")
    return ok_gather, ok_apply, sent, ex.optimum_sent_elements() * 8, len({r.numel for r in meter.records})


def _meter_worker_runs(rank, world, name, model_dtype=torch.float32):
    """4 steps of ``name`` with k = 2, metered."""
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    model = _shard(make_model(model_dtype), world)
    opt = LANTONFSDP2(model, OptimConfig(name=name, estimate_every=2, nuclear_estimator="exact"), bucket_mb=0.01)
    sharded_run(rank, world, opt, model, 4)
    m = opt.meter
    steps = {s: dict(tensor=m.tensor_bytes(s), scalar=m.scalar_bytes(s), phases=m.by_phase(s),
                     ops={(r.op, r.phase) for r in m.for_step(s)}) for s in range(1, 5)}
    opt_elems = opt.exchange.optimum_sent_elements()
    gather_elems = sum(opt.exchange._len(n, rank) for n in opt.exchange.specs if opt.plan.owner[n] != rank)
    return dict(steps=steps, owned_bytes=opt.owned_hidden_bytes(),
                optimum=opt_elems * 4, gather_optimum=gather_elems * 4)


def _job(rank, world):
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    out: dict = {}
    model = _shard(make_model(torch.float64), world)
    opt = LANTONFSDP2(model, _cfg(k=1), pad=True, bucket_mb=0.005)
    out["padded"] = _full(sharded_run(rank, world, opt, model, STEPS))
    out["meter"] = {name: _meter_worker_runs(rank, world, name) for name in ("lanton", "adamw")}
    if world == 3:
        model = _shard(EmptyShardNet(), world, blocks=False)
        opt = LANTONFSDP2(model, _cfg(k=1))
        out["empty_local"] = {n: p.to_local().numel() for n, p in model.named_parameters()}
        for x in _tiny_batches(STEPS):
            _tiny_loss(model, rows(x, rank, world)).backward()
            opt.step()
            opt.zero_grad()
        out["empty"] = _full(dict(model.named_parameters()))
        out["exchange"] = {pad: _exchange_case(rank, world, pad) for pad in (False, True)}
    return out


@pytest.fixture(scope="module", params=[2, 3])
def job(request):
    return request.param, run(_job, request.param, timeout_s=240)


def test_padded_all_to_all_gives_the_same_result(job):
    world, results = job
    ref = reference_run(_cfg(k=1), STEPS, world, torch.float64, delay=True)
    assert max_rel_err(results[0]["padded"], ref) <= 1e-6


def test_extra_traffic_over_fsdp2_adamw_is_within_1_1x_the_all_to_all_optimum(job):
    """FSDP2's own all-gathers/reduce-scatters are the same for both; the meter records what the
    optimizer adds. AdamW adds only the scalar skip vote; LANTON adds the all-to-alls."""
    world, results = job
    for r, res in enumerate(results):
        lan, adam = res["meter"]["lanton"], res["meter"]["adamw"]
        for step in range(1, 5):
            extra = lan["steps"][step]["tensor"] - adam["steps"][step]["tensor"]
            assert adam["steps"][step]["tensor"] == 0
            phases = lan["steps"][step]["phases"]
            lmo_bytes = phases["lmo_gather"] + phases["lmo_scatter"]
            assert lmo_bytes == lan["optimum"], f"rank {r} step {step}: {lmo_bytes} != optimum {lan['optimum']}"
            # owners keep momentum and the previous gradient whole: estimation steps gather nothing more
            assert extra == lan["optimum"], f"rank {r} step {step}: extra {extra} != optimum {lan['optimum']}"
        # The brief's yardstick, summed over ranks: 2 × owned-matrix bytes per step.
    for step in (1, 3):
        total_extra = sum(res["meter"]["lanton"]["steps"][step]["tensor"] for res in results)
        assert total_extra <= 1.1 * 2 * sum(res["meter"]["lanton"]["owned_bytes"] for res in results)


def test_no_collective_gathers_whole_matrices_to_every_rank(job):
    world, results = job
    for res in results:
        for step in range(1, 5):
            ops = res["meter"]["lanton"]["steps"][step]["ops"]
            assert {op for op, _ in ops} <= {"all_to_all", "all_reduce"}
            assert {ph for op, ph in ops if op == "all_reduce"} <= {"finite", "norm", "variance"}
            assert ("all_to_all", "variance_gather") not in ops  # Option I: the owners form D themselves


def test_empty_shards_on_some_ranks_still_match_the_reference(job):
    world, results = job
    if world != 3:
        pytest.skip("the empty-shard model is laid out for 3 ranks")
    assert results[2]["empty_local"]["down.weight"] == 0 and results[2]["empty_local"]["gain"] == 0
    ref = _tiny_reference(STEPS, delay=True)
    for r, res in enumerate(results):
        assert max_rel_err(res["empty"], ref) <= 1e-6, f"rank {r}"


def test_exchange_assembles_uneven_and_empty_pieces_and_meters_padding_honestly(job):
    world, results = job
    if world != 3:
        pytest.skip("3 ranks")
    for res in results:
        for pad in (False, True):
            ok_gather, ok_apply, sent, optimum_both_ways, _ = res["exchange"][pad]
            assert ok_gather and ok_apply, f"pad={pad}"
        unpadded, padded = res["exchange"][False][2], res["exchange"][True][2]
        assert padded >= unpadded
    assert sum(res["exchange"][True][2] for res in results) > sum(res["exchange"][False][2] for res in results)


def test_a_model_not_wrapped_with_fully_shard_is_refused():
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    with pytest.raises(ValueError, match="fully_shard"):
        LANTONFSDP2(make_model(), _cfg())


class _RecordingCollectives:
    """A 2-rank stand-in for Collectives that records the order of posts, waits and owner work."""

    def __init__(self, log):
        self.world, self.rank, self.log = 2, 0, log

    def all_to_all(self, out, inp, out_splits, in_splits, phase):
        self.log.append(("post", phase))
        log = self.log

        class Handle:
            def wait(self):
                log.append(("wait", phase))
        return Handle()


def test_newton_schulz_of_one_bucket_overlaps_the_transfer_of_the_next():
    """Issue order of AllToAllExchange.apply with window 2: two gathers posted before any wait;
    each bucket's Newton–Schulz runs with the next gather in flight; its scatter is posted at once."""
    from lanton_dist.engine import LocalPiece, plan_ownership
    from lanton_dist.groups import Geometry, ParamSpec
    from lanton_dist.engine.exchange import AllToAllExchange
    from lanton_dist.engine.ranges import row_ranges

    specs = [ParamSpec(f"m{i}", Geometry.HIDDEN, (4, 4)) for i in range(6)]
    log: list = []
    plan = plan_ownership(specs, 2)
    ex = AllToAllExchange(specs, {s.name: row_ranges(s.shape, 2) for s in specs}, plan, _RecordingCollectives(log),
                          bucket_mb=2 * 16 * 4 / 2**20, window=2)
    pieces = [LocalPiece(s, 0, 0, 8, torch.zeros(8)) for s in specs]

    def fn(names, mats):
        log.append(("ns", tuple(names)))
        return [torch.zeros_like(m) for m in mats]

    ex.apply(pieces, [torch.ones(8) for _ in specs], fn, "lmo_gather", "lmo_scatter")
    order = [e[0] + ":" + e[1].split("_")[1] if e[0] != "ns" else "ns" for e in log]
    assert order == ["post:gather", "post:gather",
                     "wait:gather", "post:gather", "ns", "post:scatter",   # bucket 0; bucket 1 and 2 in flight
                     "wait:gather", "ns", "post:scatter",                  # bucket 1; bucket 2 in flight
                     "wait:gather", "ns", "post:scatter",
                     "wait:scatter", "wait:scatter", "wait:scatter"], order


def _per_piece_checkpoint_worker(rank, world, path):
    """3 steps (k = 2: step 3 keeps the previous gradient), then the optimizer state rewritten as
    checkpoints were before owners held hidden matrices whole — each rank its row piece of every
    matrix's momentum and previous gradient — and loaded into a fresh optimizer."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from lanton_dist.groups import Geometry
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    model = _shard(make_model(torch.float64), world)
    opt = LANTONFSDP2(model, _cfg(k=2), overlap=False)
    sharded_run(rank, world, opt, model, 3)
    hidden = {s.name for s in opt.specs if s.geometry is Geometry.HIDDEN}
    whole = {n: st for (n, _), st in opt.core.state.items() if n in hidden}
    owners_only = set(whole) == {n for n in hidden if opt.plan.owner[n] == rank}
    has_prev = all("prev_grad" in st and st["prev_grad"].numel() == opt.core.specs[n].numel for n, st in whole.items())
    every: list = [None] * world
    dist.all_gather_object(every, whole)
    merged = {n: st for part in every for n, st in part.items()}
    sd = {k: v for k, v in opt.dcp_state_dict().items() if not any(k.startswith(f"optim/{n}/") for n in hidden)}
    for n in hidden:
        a, b = opt.held[n][rank]
        if b > a:
            sd.update({f"optim/{n}/{key}/{a}_{b}": v[a:b].clone() for key, v in merged[n].items()})
    dcp.save(sd, checkpoint_id=path, process_group=opt.coll.group)
    fresh = LANTONFSDP2(_shard(make_model(torch.float64), world), _cfg(k=2), overlap=False)
    fresh.load_dcp_state(path)
    same = set(fresh.core.state) == set(opt.core.state) and all(
        set(fresh.core.state[k]) == set(st) and all(torch.equal(fresh.core.state[k][key], v) for key, v in st.items())
        for k, st in opt.core.state.items())
    return owners_only, has_prev, same


def test_a_checkpoint_of_per_piece_hidden_state_loads_whole_into_each_owner_on_3_ranks(tmp_path):
    """Owners hold hidden matrices' momentum and previous gradient whole, other ranks nothing;
    a checkpoint written per piece (before that rule) assembles on the owners bit for bit."""
    for r, (owners_only, has_prev, same) in enumerate(run(_per_piece_checkpoint_worker, 3, str(tmp_path / "old"),
                                                           timeout_s=180)):
        assert owners_only and has_prev, f"rank {r}"
        assert same, f"rank {r}: state loaded from per-piece chunks differs"
