"""Specification of split Newton–Schulz (issue #12 item 4): the column-split iteration equals the
whole-matrix kernel, and the ZeRO engine with a split forced equals the single-process
reference, runs each matrix's NS once with the plan's per-rank work, and moves exactly the
bytes the planner lists (:func:`lanton_dist.plan.splitns.split_collectives`)."""
from __future__ import annotations

import pytest
import torch

from distributed import run
from engine_cases import make_model, max_rel_err, reference_run, sharded_run
from lanton_dist.config import OptimConfig
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.newton_schulz import newton_schulz, newton_schulz_columns, newton_schulz_flops
from lanton_dist.plan.splitns import SplitBatch, SplitPlan, split_collectives

SPLIT_PHASES = ("ns_split_scatter", "ns_gram", "ns_gram_gather", "ns_split_gather")


def _column_team(rank: int, world: int, batch: SplitBatch, meter: CommMeter):
    """gram_sum / gather_rows over the default gloo group, through the engine's metered all-to-all."""
    coll = Collectives(meter, None, "dp")
    counts = [batch.rows(q)[1] - batch.rows(q)[0] for q in batch.ranks]
    m = batch.m

    def gram_sum(A):
        coll.all_reduce(A, "ns_gram").wait()

    def gather_rows(R):
        mine = R.transpose(0, 1).reshape(1, -1)
        out = R.new_empty(m * R.size(0) * m)
        coll.all_to_all(out, mine.expand(world, -1).reshape(-1), [k * R.size(0) * m for k in counts],
                        [mine.numel()] * world, "ns_gram_gather").wait()
        return out.view(m, R.size(0), m).transpose(0, 1)

    return gram_sum, gather_rows


def _columns_worker(rank, world, cases):
    """This rank's blocks, per case ``(x, ks, kwargs)``: x ``(b, m, n)`` in its wide orientation."""
    out = []
    for x, ks, kwargs in cases:
        batch = SplitBatch(("x",), 0, tuple(enumerate(ks)), x.shape[-2], x.shape[-1], "dp")
        c0, c1 = batch.columns(rank)
        gram_sum, gather_rows = _column_team(rank, world, batch, CommMeter())
        out.append(newton_schulz_columns(x[..., c0:c1], batch.rows(rank), gram_sum, gather_rows, **kwargs))
    return out


COLUMN_CASES = {  # team size → (column counts, shape, options)
    1: [((24,), (2, 8, 24), {})],
    2: [((7, 17), (2, 8, 24), {}), ((20, 4), (3, 24, 8), {})],
    3: [((3, 10, 11), (2, 8, 24), {}),
        ((3, 10, 11), (3, 24, 8), {}),  # tall: split the columns of its transpose
        ((5, 0, 19), (1, 8, 24), {}),   # a member with no columns
        ((3, 10, 11), (2, 8, 24), {"start": "gram", "schedule": "polar_express", "steps": 6, "refine_steps": 2}),
        ((3, 10, 11), (2, 8, 24), {"symmetric": True})],
}


@pytest.mark.parametrize("c", [1, 2, 3])
def test_column_split_newton_schulz_equals_the_whole_matrix_kernel_in_fp64(c):
    """c = 1, 2, 3 uneven column blocks over a gloo group of c ranks, batched, both orientations
    (a tall matrix is split as its wide transpose), the start/schedule/refine/symmetric options:
    the concatenated blocks equal ``newton_schulz`` of the whole matrix to ≤ 1e-10 (fp64)."""
    torch.manual_seed(0)
    xs = [torch.randn(*shape, dtype=torch.float64) for _, shape, _ in COLUMN_CASES[c]]
    cases = [((x.mT if x.shape[-2] > x.shape[-1] else x).contiguous(), ks, kw) for x, (ks, _, kw) in zip(xs, COLUMN_CASES[c])]
    blocks = run(_columns_worker, c, cases)
    for i, (x, (_, _, kwargs)) in enumerate(zip(xs, COLUMN_CASES[c])):
        got = torch.cat([blocks[r][i] for r in range(c)], dim=-1)
        got = got.mT if x.shape[-2] > x.shape[-1] else got
        assert (got - newton_schulz(x, **kwargs)).abs().max().item() <= 1e-10, (c, i)


def test_column_split_refuses_torch_compile_and_bad_rows():
    x = torch.randn(1, 4, 6)
    with pytest.raises(ValueError, match="torch.compile"):
        newton_schulz_columns(x, (0, 4), lambda a: None, lambda r: r, compile_backend="aot_eager")
    with pytest.raises(ValueError, match="row range"):
        newton_schulz_columns(x, (2, 5), lambda a: None, lambda r: r)
    with pytest.raises(ValueError, match="start"):
        newton_schulz_columns(x, (0, 4), lambda a: None, lambda r: r, start="nope")


# ---------------------------------------------------------------------------------------- the engine
STEPS = 4  # LANTON with k = 2 estimates at steps 2 and 4


def _hidden(specs):
    return [s for s in specs if s.geometry.value == "hidden"]


def _wide_shape(spec):
    return min(spec.shape), max(spec.shape)


def forced_plan(specs, world: int, must_split: str | None = None) -> SplitPlan:
    """A plan covering every case the engine must run, over the engine's own owners: two
    same-shape matrices of one owner split alike over 3 ranks (a batch of 2, uneven columns),
    a matrix whose owner keeps no column (one iterating member: no Gram collective), and one
    split over two ranks (``must_split`` if given)."""
    from lanton_dist.engine.ownership import plan_ownership

    hidden = _hidden(specs)
    own = plan_ownership(specs, world, 5)
    by_key: dict = {}
    for s in hidden:
        by_key.setdefault((s.logical_shape, own.owner[s.name]), []).append(s.name)
    pair = next(names[:2] for names in by_key.values() if len(names) >= 2)
    rest = [s.name for s in hidden if s.name not in pair and s.name != must_split]
    single, duo = rest[0], must_split or rest[1]
    spec = {s.name: s for s in hidden}
    n = {name: _wide_shape(spec[name])[1] for name in spec}
    o = {name: own.owner[name] for name in spec}
    teams = {name: ((o[name], 3), ((o[name] + 1) % world, n[name] - 8), ((o[name] + 2) % world, 5)) for name in pair}
    teams[single] = ((o[single], 0), ((o[single] + 1) % world, n[single]))
    teams[duo] = ((o[duo], n[duo] // 3), ((o[duo] + 2) % world, n[duo] - n[duo] // 3))
    gram = {name: (_wide_shape(spec[name])[0], "dp") for name in teams}
    return SplitPlan(world, own.flops, own.flops, teams, gram)


def _counting(calls: list, step_of):
    """Wrap the NS kernels the engine calls: record (step, kind, b, m, k, rows) per call."""
    import lanton_dist.engine.splitns as splitns
    from lanton_dist import lmo

    real_cols, real_whole = splitns.newton_schulz_columns, lmo.newton_schulz

    def cols(x, rows, *a, **kw):
        calls.append((step_of(), "columns", x.shape[0], x.shape[1], x.shape[2], rows[1] - rows[0]))
        return real_cols(x, rows, *a, **kw)

    def whole(x, *a, **kw):
        m, n = sorted(x.shape[-2:])
        calls.append((step_of(), "whole", x.shape[0] if x.ndim == 3 else 1, m, n, m))
        return real_whole(x, *a, **kw)

    splitns.newton_schulz_columns, lmo.newton_schulz = cols, whole

    def restore():
        splitns.newton_schulz_columns, lmo.newton_schulz = real_cols, real_whole

    return restore


def _engine_worker(rank, world, runs):
    """Per run ``(name, cfg, forced)``: parameters after STEPS steps, the split phases' meter
    records and the NS calls (``forced``: the forced plan instead of plan_split's)."""
    import lanton_dist.engine.splitns as splitns
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.groups import classify_parameters

    out = {}
    for name, cfg, forced in runs:
        model = make_model(torch.float64)
        real_plan = splitns.plan_split
        if forced:
            plan = forced_plan(list(classify_parameters(model).values()), world)
            splitns.plan_split = lambda *a, **k: plan
        calls: list = []
        holder: dict = {}
        restore = _counting(calls, lambda: holder["opt"].meter.step)
        try:
            opt = holder["opt"] = build_sharded_optimizer(model, cfg, overlap=False)
            params = sharded_run(rank, world, opt, model, STEPS)
        finally:
            restore()
            splitns.plan_split = real_plan
        records = [(r.step, (r.op, r.phase, r.group_size, r.numel, r.elem_size, r.tensor_bytes, r.sent_bytes))
                   for r in opt.meter.records]
        out[name] = (params, records, calls)
    return out


def _cfgs(tolerance):
    return {"lanton": OptimConfig(name="lanton", estimate_every=2, nuclear_estimator="exact", ns_split_tolerance=tolerance),
            "dmuon": OptimConfig(name="dmuon", ns_split_tolerance=tolerance)}


@pytest.fixture(scope="module")
def engine_runs():
    """One 3-rank spawn: LANTON and D-Muon with the plan of τ = 0 and with the forced plan."""
    runs = [(f"{algo}-{kind}", cfg, kind == "forced") for kind in ("tau0", "forced")
            for algo, cfg in _cfgs(0.0).items()]
    return run(_engine_worker, 3, runs, timeout_s=120), {name: cfg for name, cfg, _ in runs}


def _plans(world: int = 3):
    from lanton_dist.engine.ownership import plan_ownership
    from lanton_dist.groups import classify_parameters
    from lanton_dist.plan.splitns import plan_split

    specs = list(classify_parameters(make_model()).values())
    return specs, {"tau0": plan_split(_hidden(specs), plan_ownership(specs, world, 5), 5, tolerance=0.0),
                   "forced": forced_plan(specs, world)}


@pytest.mark.slow
def test_engine_with_split_newton_schulz_equals_the_reference_at_world_3(engine_runs):
    """LANTON (Option I, k = 2: two estimation steps) and D-Muon, fp64, 4 steps, on 3 ranks, with
    the split of τ = 0 (one FFN matrix over 3 ranks) and with a forced plan (a batch of two
    matrices split over 3 ranks, an owner keeping no column, a 2-rank team): every rank's
    parameters equal the single-process reference as the unsplit engine does (≤ 1e-6)."""
    results, cfgs = engine_runs
    _, plans = _plans()
    assert plans["tau0"].teams and len(plans["forced"].teams) == 4
    for name, cfg in cfgs.items():
        ref = reference_run(cfg, STEPS, 3, torch.float64)
        for r in range(3):
            assert max_rel_err(results[r][name][0], ref) <= 1e-6, (name, r)


@pytest.mark.slow
def test_split_engine_meter_records_exactly_the_planners_split_collectives(engine_runs):
    """Per rank and step, the ordered ns_split_scatter / ns_gram / ns_gram_gather /
    ns_split_gather records equal :func:`split_collectives` of the plan (fp64: 8-byte elements);
    the other phases are the unsplit engine's."""
    results, cfgs = engine_runs
    specs, plans = _plans()
    for name in cfgs:
        plan = plans[name.split("-")[1]]
        for r in range(3):
            predicted = [c.key() for c in split_collectives(plan, _hidden(specs), r, 5, 8)]
            records = results[r][name][1]
            for step in range(1, STEPS + 1):
                assert [k for s, k in records if s == step and k[1] in SPLIT_PHASES] == predicted, (name, r, step)
            assert {k[1] for _, k in records} - set(SPLIT_PHASES) <= {"init_sync", "grad_reduce", "param_gather", "finite",
                                                                      "norm", "variance"}
        assert any(split_collectives(plan, _hidden(specs), r, 5, 8) for r in range(3))


@pytest.mark.slow
def test_split_engine_runs_each_matrix_once_with_the_plans_per_rank_work(engine_runs):
    """Every step, over the 3 ranks: each unsplit hidden matrix through the whole kernel once,
    each split matrix's columns exactly once (Σ columns = n); each rank's executed NS FLOPs
    (whole: ``newton_schulz_flops``; a block: 4m²k + 2m²r per step) equal the plan's
    per-rank FLOPs up to the one-row rounding of the row split, so the imbalance the engine
    executes is the plan's."""
    results, cfgs = engine_runs
    specs, plans = _plans()
    hidden = _hidden(specs)
    for name in cfgs:
        plan = plans[name.split("-")[1]]
        split = {s.name: _wide_shape(s) for s in hidden if s.name in plan.teams}
        executed = []
        for r in range(3):
            calls = [c for c in results[r][name][2] if c[0] == 1]
            flops = sum(b * newton_schulz_flops(m, cols, 5) if kind == "whole" else b * 5 * (4 * m * m * cols + 2 * m * m * r_)
                        for _, kind, b, m, cols, r_ in calls)
            executed.append(flops)
            bound = sum(2 * m * m * 5 for nm, (m, _) in split.items() if r in dict(plan.teams[nm]))
            if "forced" not in name:
                assert abs(flops - plan.flops[r]) <= bound, (name, r, flops, plan.flops[r])
        whole_calls = sum(c[2] for r in range(3) for c in results[r][name][2] if c[0] == 1 and c[1] == "whole")
        cols = sum(c[2] * c[4] for r in range(3) for c in results[r][name][2] if c[0] == 1 and c[1] == "columns")
        assert whole_calls == len(hidden) - len(split)
        assert cols == sum(n for _, n in split.values())
        if "forced" not in name:
            mean = sum(plan.whole_flops) / 3
            assert max(executed) / mean == pytest.approx(plan.imbalance, rel=0.01)
            assert plan.imbalance < plan.whole_imbalance


def _missing_gradient_worker(rank, world):
    """The side-branch model of tests/test_missing_gradients.py (``side.weight`` gets no gradient
    on odd steps, on any rank) with ``side.weight`` forced into a split team."""
    import lanton_dist.engine.splitns as splitns
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.groups import classify_parameters
    from test_missing_gradients import SideBranch, _cfg, _params, _train

    model = SideBranch()
    plan = forced_plan(list(classify_parameters(model).values()), world, must_split="side.weight")
    real_plan, splitns.plan_split = splitns.plan_split, lambda *a, **k: plan
    try:
        cfg = OptimConfig(**{**_cfg().__dict__, "ns_split_tolerance": 0.0})
        opt = build_sharded_optimizer(model, cfg, overlap=False)
    finally:
        splitns.plan_split = real_plan

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    _train(rank, world, "some_steps", model, lambda loss: loss.backward(), step)
    return _params(model), "side.weight" in plan.teams


@pytest.mark.slow
def test_a_split_matrix_without_gradient_anywhere_is_skipped_as_in_the_reference():
    """A split matrix no rank has a gradient for (every other step) is not stepped — no
    momentum decay, weight decay or update — while its team still runs its collectives on
    zeros: every rank equals the reference of tests/test_missing_gradients.py (fp32, 5e-5)."""
    from test_missing_gradients import TOL, reference

    results = run(_missing_gradient_worker, 3)
    ref = reference("some_steps", 3)
    for params, split in results:
        assert split and max_rel_err(params, ref) <= TOL


def _refusal_worker(rank, world):
    from lanton_dist.engine import ShardedLANTON, build_sharded_optimizer
    from lanton_dist.factory import hyper_parameters, lanton_options, param_groups
    from lanton_dist.lmo import LMOConfig

    errors = {}
    cases = {
        "negative": (OptimConfig(ns_split_tolerance=-0.1), {}),
        "nan": (OptimConfig(ns_split_tolerance=float("nan")), {}),
        "adamw": (OptimConfig(name="adamw", ns_split_tolerance=0.0), {}),
        "compile": (OptimConfig(ns_split_tolerance=0.0), {"lmo": LMOConfig(ns_compile="aot_eager")}),
        "exchange": (OptimConfig(ns_split_tolerance=0.0), {"exchange": object()}),
    }
    for name, (cfg, extra) in cases.items():
        model = make_model()
        try:
            ShardedLANTON(param_groups(model, cfg), cfg.name, **{**lanton_options(cfg), **extra},
                          ns_split_tolerance=cfg.ns_split_tolerance, **hyper_parameters(cfg))
        except ValueError as exc:
            errors[name] = str(exc)
    errors["off"] = build_sharded_optimizer(make_model(), OptimConfig()).core.polar.__name__
    return errors


def test_engine_refuses_a_split_it_cannot_run_with_a_clear_error():
    """ns_split_tolerance negative or NaN, with AdamW (no NS), with torch.compile'd NS, with a
    custom exchange: ValueError naming the option; off by default (the core's polar is
    :func:`lanton_dist.lmo.hidden_directions`)."""
    (errors,) = run(_refusal_worker, 1)
    assert set(errors) == {"negative", "nan", "adamw", "compile", "exchange", "off"}
    assert all("ns_split_tolerance" in msg for key, msg in errors.items() if key != "off")
    assert errors["off"] == "hidden_directions"


def test_config_key_ns_split_tolerance_is_validated_and_zero_backend_only():
    from lanton_dist.config import ConfigError, check_run_config, load_run_config

    cfg = load_run_config(None, ["--optim.ns_split_tolerance", "0.05", "--parallel.backend", "zero"])
    assert cfg.optim.ns_split_tolerance == 0.05
    check_run_config(cfg, 4)
    assert load_run_config(None, []).optim.ns_split_tolerance is None
    for overrides, match in [(["--optim.ns_split_tolerance", "-1", "--parallel.backend", "zero"], "ns_split_tolerance"),
                             (["--optim.ns_split_tolerance", "0.1", "--parallel.backend", "ddp"], "zero engine only"),
                             (["--optim.ns_split_tolerance", "0.1", "--parallel.backend", "zero", "--optim.name", "adamw"],
                              "adamw")]:
        with pytest.raises(ConfigError, match=match):
            check_run_config(load_run_config(None, overrides), 4)
    with pytest.raises(ConfigError, match="ns_split_tolerance"):
        load_run_config(None, ["--optim.ns_split_tolerance", "many"])
