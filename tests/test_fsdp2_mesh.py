"""Specification of LANTONFSDP2 on 2-D device meshes, at world 4 on CPU gloo: HSDP (2 replicas ×
2 shards) and FSDP × TP (FSDP 2 × TP 2, torch's ``parallelize_module`` on the tiny LLaMA).

One spawned job computes every run the property tests read (process start-up dominates on 2
cores); the checkpoint tests spawn their own save and resume jobs. fp64 against the
single-process reference on the global batch (``engine_cases.reference_run``, with
``delay_lr_factor=True`` for the deferred variance).
"""
from __future__ import annotations

import pytest
import torch

from distributed import run
from engine_cases import backward_step, batches, make_model, max_rel_err, reference_run, rows
from lanton_dist.config import OptimConfig
from lanton_dist.groups import classify_parameters

slow = pytest.mark.slow
WORLD, STEPS = 4, 6
VARIANTS = [("I", 3, True), ("II", 2, True), ("I", 1, False)]  # (option, k, overlap)
TP_PLAN = {"attention.wq": "col", "attention.wk": "col", "attention.wv": "col", "attention.wo": "row",
           "feed_forward.w_gate": "col", "feed_forward.w_up": "col", "feed_forward.w_down": "row"}


def _cfg(name="lanton", option="I", k=3):
    return OptimConfig(name=name, option=option, estimate_every=k, nuclear_estimator="exact")


def _hsdp(model):
    """HSDP: ``fully_shard`` on a ("replicate", "shard") 2 × 2 mesh (placements (Replicate(), Shard(0)))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _plain(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_tp(model, dp=2):
    """FSDP ``dp`` × TP 2 on a ("dp", "tp") mesh: column-parallel q/k/v/gate/up (placements
    (_StridedShard(0), Shard(0))), row-parallel o/down ((Shard(0), Shard(1))), then
    ``fully_shard`` over "dp"; embeddings, head and norms are FSDP-sharded and TP-replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dp, 2), mesh_dim_names=("dp", "tp"))
    for layer in model.layers:
        parallelize_module(layer, mesh["tp"], {k: ColwiseParallel() if v == "col" else RowwiseParallel()
                                               for k, v in TP_PLAN.items()})
        layer.attention.n_heads //= 2       # heads per TP rank (what torchtitan does)
        layer.attention.n_kv_heads //= 2
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _full(model):
    return {n: p.full_tensor() for n, p in model.named_parameters()}


def _train(model, opt, dp_rank, dp, steps=STEPS, start=0):
    """Steps ``start … start+steps−1`` on data-parallel rank ``dp_rank``'s rows of ``dp``."""
    for x in batches(start + steps)[start:]:
        backward_step(model, opt, rows(x, dp_rank, dp))
    return _full(model)


def _counting_ns():
    """Patch the Newton–Schulz kernel to count matrices; returns (calls list, restore fn)."""
    import lanton_dist.lmo as lmo

    calls, real = [], lmo.newton_schulz
    lmo.newton_schulz = lambda x, *a, **kw: (calls.append(x.shape[0] if x.ndim == 3 else 1), real(x, *a, **kw))[1]

    def restore():
        lmo.newton_schulz = real
    return calls, restore


def _job(rank, world):
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    out: dict = {"hsdp": {}, "tp": {}}
    for option, k, overlap in VARIANTS:
        model = _hsdp(make_model(torch.float64))
        opt = LANTONFSDP2(model, _cfg(option=option, k=k), overlap=overlap, defer_variance=overlap, bucket_mb=0.005)
        out["hsdp"][(option, k, overlap)] = _train(model, opt, rank, WORLD)
    for option, k, overlap in VARIANTS[:2]:
        model = _fsdp_tp(make_model(torch.float64))
        opt = LANTONFSDP2(model, _cfg(option=option, k=k), overlap=overlap, defer_variance=overlap, bucket_mb=0.005)
        out["tp"][(option, k, overlap)] = _train(model, opt, rank // 2, 2)
    out["tp_row_major"] = {n: lay.row_major for n, lay in opt.layouts.items()}
    for kind, shard, dp in (("hsdp", _hsdp, WORLD), ("tp", _fsdp_tp, 2)):  # TP rank r: dp rank r // 2
        calls, restore = _counting_ns()
        try:
            model = shard(make_model())
            opt = LANTONFSDP2(model, OptimConfig(name="lanton", estimate_every=2, nuclear_estimator="exact"),
                              bucket_mb=0.01)
            _train(model, opt, rank * dp // WORLD, dp, steps=4)
        finally:
            restore()
        m = opt.meter
        out[f"{kind}_meter"] = dict(
            calls=sum(calls), optimum=opt.exchange.optimum_sent_elements() * 4,
            lmo=[m.by_phase(s).get("lmo_gather", 0) + m.by_phase(s).get("lmo_scatter", 0) for s in range(1, 5)],
            ops={(r.op, r.phase) for s in range(1, 5) for r in m.for_step(s)},
            held={n: opt.held[n] for n in opt.exchange.specs}, ranges={n: opt.ranges[n] for n in opt.exchange.specs},
            owner=dict(opt.plan.owner))
    return out


@pytest.fixture(scope="module")
def job():
    return run(_job, WORLD, timeout_s=300)


def _hidden_matrices():
    return sum(len(s.blocks) for s in classify_parameters(make_model()).values() if s.geometry.value == "hidden")


@slow
def test_hsdp_2x2_equals_single_process_reference_in_fp64(job):
    """Option I k = 3 and 1 (deferred and waited-for variance), Option II k = 2."""
    for option, k, overlap in VARIANTS:
        ref = reference_run(_cfg(option=option, k=k), STEPS, WORLD, torch.float64, delay=overlap)
        for r, res in enumerate(job):
            err = max_rel_err(res["hsdp"][(option, k, overlap)], ref)
            assert err <= 1e-6, f"HSDP rank {r} option {option} k {k} overlap {overlap}: {err:.2e}"


@slow
def test_fsdp2_x_tp2_equals_single_process_reference_in_fp64(job):
    for option, k, overlap in VARIANTS[:2]:
        ref = reference_run(_cfg(option=option, k=k), STEPS, 2, torch.float64, delay=overlap)
        for r, res in enumerate(job):
            err = max_rel_err(res["tp"][(option, k, overlap)], ref)
            assert err <= 1e-6, f"FSDP×TP rank {r} option {option} k {k}: {err:.2e}"


@slow
def test_row_parallel_weights_use_column_band_storage_and_the_rest_row_major(job):
    layouts = job[0]["tp_row_major"]
    for name, row_major in layouts.items():
        parallel = next((v for k, v in TP_PLAN.items() if f".{k}." in name), None)
        assert row_major == (parallel != "row"), name


@slow
@pytest.mark.parametrize("kind", ["hsdp", "tp"])
def test_newton_schulz_runs_once_per_logical_matrix_per_step_across_the_whole_job(job, kind):
    assert sum(res[f"{kind}_meter"]["calls"] for res in job) == 4 * _hidden_matrices()
    owners = {res[f"{kind}_meter"]["owner"][n] for res in job for n in res[f"{kind}_meter"]["owner"]}
    assert owners == set(range(WORLD)), "owners spread over both mesh dimensions"


@slow
@pytest.mark.parametrize("kind", ["hsdp", "tp"])
def test_lmo_traffic_is_one_gather_and_a_scatter_to_every_holder(job, kind):
    """Per rank: exactly the exchange's optimum (its gather sub-ranges of matrices owned
    elsewhere; as owner, every other holder's range). Job total: each matrix gathered once,
    its result sent to every rank that holds a piece (R copies under HSDP)."""
    for res in job:
        meter = res[f"{kind}_meter"]
        assert meter["lmo"] == [meter["optimum"]] * 4
        assert {op for op, _ in meter["ops"]} <= {"all_to_all", "all_reduce"}
    meter = job[0][f"{kind}_meter"]
    numel = {s.name: s.numel for s in classify_parameters(make_model()).values()}
    copies = 2 if kind == "hsdp" else 1
    expected = 0
    for n, held in meter["held"].items():
        assert sum(b - a for a, b in held) == copies * numel[n], n
        o = meter["owner"][n]
        gather_o = meter["ranges"][n][o][1] - meter["ranges"][n][o][0]
        expected += (numel[n] - gather_o) + (copies * numel[n] - (held[o][1] - held[o][0]))
    assert sum(res[f"{kind}_meter"]["lmo"][0] for res in job) == expected * 4


# ---------------------------------------------------------------------------- layouts (no processes)
def test_column_bands_make_every_block_one_storage_range_and_round_trip():
    """A 5×7 matrix in FSDP 2 × TP 2 row-parallel blocks (uneven rows and columns): each rank's
    block is one range of the storage order; to_flat ∘ to_matrix is the identity."""
    from lanton_dist.engine.ranges import BlockLayout

    per_rank = [((0, 0), (3, 4)), ((0, 4), (3, 3)), ((3, 0), (2, 4)), ((3, 4), (2, 3))]  # (offset, local shape)
    layout, held = BlockLayout.from_blocks("w", (5, 7), per_rank)
    assert not layout.row_major and layout.signature() == (0, 4, 7)
    m = torch.arange(35.0).view(5, 7)
    flat = layout.to_flat(m)
    for ((r, c), (nr, nc)), (a, b) in zip(per_rank, held):
        assert torch.equal(flat[a:b], m[r : r + nr, c : c + nc].reshape(-1))
    assert torch.equal(layout.to_matrix(flat), m)


def test_row_blocks_are_the_row_major_flattening_and_empty_blocks_hold_nothing():
    from lanton_dist.engine.ranges import BlockLayout, row_ranges

    per_rank = [((0, 0), (2, 3)), ((2, 0), (2, 3)), ((4, 0), (0, 3))]
    layout, held = BlockLayout.from_blocks("w", (4, 3), per_rank)
    assert layout.row_major and held == row_ranges((4, 3), 3)


def test_replicas_split_their_range_and_only_the_first_counts_in_scalar_sums():
    from lanton_dist.engine.ranges import check_ranges, replica_ranges

    held = ((0, 5), (5, 8), (0, 5), (5, 8), (8, 8))      # HSDP 2 × 2 (+ an empty rank)
    gather, weights = replica_ranges(held)
    assert gather == ((0, 3), (5, 7), (3, 5), (7, 8), (8, 8))
    assert weights == (1.0, 1.0, 0.0, 0.0, 1.0)
    check_ranges("w", 8, gather, 5)


def test_blocks_that_do_not_tile_the_matrix_are_refused():
    from lanton_dist.engine.ranges import BlockLayout

    with pytest.raises(ValueError, match="column bands"):
        BlockLayout.from_blocks("w", (4, 4), [((0, 0), (2, 4)), ((1, 0), (3, 4))])
    with pytest.raises(ValueError, match="dim 0"):
        BlockLayout.from_blocks("w", (2, 2, 2), [((0, 1, 0), (2, 1, 2)), ((0, 0, 0), (2, 1, 2))])


# ---------------------------------------------------------------------------- checkpoints
def _ckpt_worker(rank, world, path, phase, kind):
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    shard = {"hsdp": _hsdp, "tp": lambda m: _fsdp_tp(m, world // 2), "plain": lambda m: _plain(m, world)}[kind]
    dp = world // 2 if kind == "tp" else world
    dp_rank = rank * dp // world
    model = shard(make_model())
    opt = LANTONFSDP2(model, _cfg(k=1), bucket_mb=0.005)
    if phase == "save":
        _train(model, opt, dp_rank, dp, steps=3)
        opt.save(path, model)  # the deferred variance of step 3 is still in flight here
    else:
        opt.load(path, model)
        assert opt.t == 3
    return _train(model, opt, dp_rank, dp, steps=STEPS - 3, start=3)


@pytest.fixture(scope="module", params=["hsdp", "tp"])
def saved(request, tmp_path_factory):
    """A checkpoint written after step 3 on the 2 × 2 mesh ``kind``, and that run's final parameters."""
    kind = request.param
    path = str(tmp_path_factory.mktemp(kind) / "ckpt")
    return kind, path, run(_ckpt_worker, WORLD, path, "save", kind, timeout_s=180)


@slow
def test_dcp_resume_on_the_same_mesh_is_bit_exact(saved):
    kind, path, full = saved
    resumed = run(_ckpt_worker, WORLD, path, "load", kind, timeout_s=180)
    for r in range(WORLD):
        for n in full[r]:
            assert torch.equal(resumed[r][n], full[r][n]), f"{kind} rank {r} {n}"


def _resumes_as_reference(saved, written: str, load_as: str) -> None:
    """The ``written`` checkpoint of ``saved``, loaded on 2 ranks sharded as ``load_as``,
    continues as the reference (fp32, another reduction order)."""
    kind, path, _ = saved
    if kind != written:
        pytest.skip(f"the {written} checkpoint")
    resumed = run(_ckpt_worker, 2, path, "load", load_as, timeout_s=180)
    ref = reference_run(_cfg(k=1), STEPS, delay=True)
    for r, res in enumerate(resumed):
        assert max_rel_err(res, ref) <= 5e-5, f"rank {r}"


@slow
def test_hsdp_checkpoint_resumes_on_plain_fsdp2_at_world_2(saved):
    """HSDP 2 × 2 → FSDP2 on 2 ranks: replicated pieces were written once, the plain layout
    reads them back."""
    _resumes_as_reference(saved, "hsdp", "plain")


@slow
def test_fsdp_x_tp_checkpoint_resumes_at_another_fsdp_size(saved):
    """FSDP 2 × TP 2 → FSDP 1 × TP 2 on 2 ranks: the TP column split is the same, the FSDP
    chunks and the owners change."""
    _resumes_as_reference(saved, "tp", "tp")


@slow
def test_a_tensor_parallel_checkpoint_is_refused_by_another_column_split(saved):
    """Row-parallel weights are stored in column-band order: loading them into a row-major
    layout (HSDP) would put every element in the wrong place, so it is refused by name."""
    kind, path, _ = saved
    if kind != "tp":
        pytest.skip("the FSDP × TP checkpoint")
    assert run(_cross_load_worker, WORLD, path, timeout_s=120) == [True] * WORLD


def _cross_load_worker(rank, world, path):
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2

    model = _hsdp(make_model())
    opt = LANTONFSDP2(model, _cfg(k=1))
    with pytest.raises(ValueError, match="tensor-parallel"):
        opt.load(path, model)
    return True
