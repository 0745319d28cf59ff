"""The options where the paper is silent (docs/fidelity.md): the LM head's own rate
(``optim.lr.head``), α in each group's own units (``optim.alpha_mode auto``) and bias-corrected
trackers (``optim.bias_correction``) — one rule (:mod:`lanton_dist.noise`), the same in the
reference and the sharded engine, saved with the optimizer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lanton_dist import noise
from lanton_dist.config import ConfigError, OptimConfig, RateValues, check_run_config, load_run_config
from lanton_dist.factory import build_optimizer, param_groups
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.lanton import LANTON
from lanton_dist.schedule import build_scheduler

NAN = float("nan")


# ------------------------------------------------------------------ the shared rule
def test_auto_alpha_is_the_lower_median_of_root_H_over_each_groups_estimated_layers():
    h = torch.tensor([4.0, 9.0, 1.0, 100.0, 16.0, 25.0, 0.0])
    gids = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    est = torch.tensor([True, True, True, False, True, True, False])
    got = noise.auto_alpha(h, gids, est)
    assert got[0] == 2.0                   # √{4, 9, 1} = {2, 3, 1}: median 2
    assert got[1] == 4.0                   # √{16, 25} (100 not estimated): lower median 4
    assert math.isnan(float(got[2]))       # no estimated layer: unset


def test_bias_correction_divides_by_one_minus_beta2_to_each_layers_own_count():
    h = torch.tensor([0.1, 0.19, 0.0])
    n = torch.tensor([1.0, 2.0, 0.0])
    got = noise.bias_corrected(h, n, torch.tensor([0.9, 0.9, 0.9]))
    assert torch.allclose(got, torch.tensor([1.0, 1.0, 0.0]))


def test_auto_alpha_is_set_once_and_then_kept():
    gids = torch.tensor([0, 0])
    est = torch.tensor([True, True])
    ones = torch.ones(2)
    a0 = torch.full((3,), NAN)
    f1, a1 = noise.rate_factors(torch.tensor([1.0, 4.0]), ones, est, gids, ones, 0.9 * ones, a0, anchor="max",
                                auto=torch.tensor([True, True]))
    assert a1[0] == 1.0                    # lower median of √{1, 4}
    # α^ℓ = 1/√(1 + H): 1/√2 and 1/√5, the quieter one anchors
    assert torch.allclose(f1, torch.tensor([1.0, math.sqrt(math.sqrt(2 / 5))]))
    _, a2 = noise.rate_factors(torch.tensor([100.0, 400.0]), 2 * ones, est, gids, ones, 0.9 * ones, a1,
                               anchor="max", auto=torch.tensor([True, True]))
    assert a2[0] == 1.0


# ------------------------------------------------------------------ the reference optimizer
def _layers() -> tuple[dict[str, nn.Parameter], list[dict]]:
    specs = {"h1": ParamSpec("h1", Geometry.HIDDEN, (4, 4)), "h2": ParamSpec("h2", Geometry.HIDDEN, (4, 4)),
             "h3": ParamSpec("h3", Geometry.HIDDEN, (4, 4)), "emb": ParamSpec("emb", Geometry.EMBED_HEAD, (6, 4), "embed")}
    gen = torch.Generator().manual_seed(0)
    params = {n: nn.Parameter(torch.randn(*s.shape, generator=gen)) for n, s in specs.items()}
    groups = [dict(params=[params[n] for n in ("h1", "h2", "h3")], specs=[specs[n] for n in ("h1", "h2", "h3")]),
              dict(params=[params["emb"]], specs=[specs["emb"]])]
    return params, groups


def _drive(opt: LANTON, params: dict[str, nn.Parameter], steps: int, skip: tuple[tuple[int, str], ...] = ()) -> None:
    gen = torch.Generator().manual_seed(1)
    noise_level = {"h1": 0.1, "h2": 1.0, "h3": 3.0, "emb": 0.5}
    for t in range(1, steps + 1):
        for n, p in params.items():
            g = torch.ones_like(p) + noise_level[n] * torch.randn(*p.shape, generator=gen)
            p.grad = None if (t, n) in skip else g
        opt.step()


def test_reference_auto_alpha_is_the_median_root_H_of_the_first_estimate_and_is_saved():
    params, groups = _layers()
    opt = LANTON(groups, estimate_every=2, alpha_mode="auto", nuclear_estimator="exact")
    _drive(opt, params, 2)                  # step 2: the first estimate
    hs = sorted(float(opt.state[params[n]]["H"]) for n in ("h1", "h2", "h3"))
    assert float(opt.alpha_auto[0]) == pytest.approx(math.sqrt(hs[1]), rel=1e-6)
    assert float(opt.alpha_auto[1]) == pytest.approx(math.sqrt(float(opt.state[params["emb"]]["H"])), rel=1e-6)
    first = opt.alpha_auto.clone()
    _drive(opt, params, 4)
    torch.testing.assert_close(opt.alpha_auto, first, rtol=0, atol=0, equal_nan=True)
    rows = {r["name"]: r for r in opt.layer_diagnostics()}
    mid = next(n for n in ("h1", "h2", "h3") if float(opt.state[params[n]]["H"]) == sorted(
        float(opt.state[params[m]]["H"]) for m in ("h1", "h2", "h3"))[1])
    h = float(opt.state[params[mid]]["H"])
    assert rows[mid]["alpha"] == pytest.approx(float(first[0]) / math.sqrt(float(first[0]) ** 2 + h), rel=1e-6)
    # saved and restored
    params2, groups2 = _layers()
    again = LANTON(groups2, estimate_every=2, alpha_mode="auto", nuclear_estimator="exact")
    again.load_state_dict(opt.state_dict())
    torch.testing.assert_close(again.alpha_auto, first, rtol=0, atol=0, equal_nan=True)


def test_reference_fixed_alpha_is_the_default_and_ignores_the_auto_value():
    params, groups = _layers()
    opt = LANTON(groups, estimate_every=2, nuclear_estimator="exact", alpha=1.0)
    _drive(opt, params, 2)
    f = {n: float(opt.state[params[n]]["lr_factor"]) for n in ("h1", "h2", "h3")}
    a = {n: 1.0 / math.sqrt(1.0 + float(opt.state[params[n]]["H"])) for n in f}
    top = max(a.values())
    for n in f:
        assert f[n] == pytest.approx(math.sqrt(a[n] / top), rel=1e-6)


def test_reference_bias_correction_counts_each_layers_own_estimates():
    params, groups = _layers()
    opt = LANTON(groups, estimate_every=1, bias_correction=True, nuclear_estimator="exact")
    _drive(opt, params, 4, skip=((3, "h3"),))   # h3 misses step 3 and so the estimates at 3 and 4
    n = {k: float(opt.state[params[k]]["n_estimates"]) for k in ("h1", "h3")}
    assert n == {"h1": 3.0, "h3": 1.0}
    used = {k: float(opt.state[params[k]]["H"]) / (1 - 0.9 ** n_k) for k, n_k in
            {k: float(opt.state[params[k]]["n_estimates"]) for k in ("h1", "h2", "h3")}.items()}
    a = {k: 1.0 / math.sqrt(1.0 + v) for k, v in used.items()}
    for k in a:
        assert float(opt.state[params[k]]["lr_factor"]) == pytest.approx(math.sqrt(a[k] / max(a.values())), rel=1e-6)


def test_reference_checkpoints_without_the_new_state_load_with_documented_fallbacks():
    params, groups = _layers()
    opt = LANTON(groups, estimate_every=2, nuclear_estimator="exact")
    _drive(opt, params, 4)
    sd = opt.state_dict()
    sd.pop("alpha_auto")
    for st in sd["state"].values():
        st.pop("n_estimates")
    for g in sd["param_groups"]:
        g.pop("alpha_mode"), g.pop("bias_correction")
    params2, groups2 = _layers()
    fresh = LANTON(groups2, estimate_every=2, nuclear_estimator="exact", bias_correction=True)
    fresh.load_state_dict(sd)
    assert fresh.alpha_auto is None
    assert all(g["bias_correction"] is True and g["alpha_mode"] == "fixed" for g in fresh.param_groups)
    for p in params2.values():
        assert fresh.state[p]["n_estimates"].tolist() == [2.0]  # ⌊4/2⌋ for an estimated layer
    _drive(fresh, params2, 2)


# ------------------------------------------------------------------ the LM head's rate
def test_lr_head_gives_the_head_its_own_param_group_that_schedules_scale():
    from lanton_dist.model import Transformer
    from engine_cases import TINY

    model = Transformer(TINY)
    same = param_groups(model, OptimConfig())
    assert [g["geometry"] for g in same] == ["hidden", "embed_head", "vector"]
    cfg = OptimConfig(lr=RateValues(hidden=0.02, embed_head=0.1, vector=0.01, head=0.4))
    groups = param_groups(model, cfg)
    assert [g["geometry"] for g in groups] == ["hidden", "embed_head", "head", "vector"]
    head = groups[2]
    assert head["names"] == ["lm_head.weight"] and head["lr"] == 0.4
    assert all(s.geometry is Geometry.EMBED_HEAD and s.role == "head" for s in head["specs"])
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=10, min_ratio=0.1)
    for _ in range(2):
        opt.step()
        sched.step()
    lrs = {g["geometry"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] / 0.4 == pytest.approx(lrs["embed_head"] / 0.1)


def test_the_head_shares_its_anchor_group_with_the_embedding_when_split():
    """Splitting the head's param group changes its rate only: its noise factor still anchors
    against the embedding (geometry group embed_head)."""
    from lanton_dist.model import Transformer
    from engine_cases import TINY, backward_step, batches

    runs = {}
    for head in (None, 0.002):
        torch.manual_seed(0)
        model = Transformer(TINY)
        opt = build_optimizer(model, OptimConfig(lr=RateValues(hidden=0.02, embed_head=0.002, vector=0.002, head=head),
                                                 estimate_every=1, nuclear_estimator="exact"))
        for x in batches(3):
            backward_step(model, opt, x)
        runs[head] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in runs[None]:
        assert torch.equal(runs[None][n], runs[0.002][n]), n


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("args, key", [
    (["--optim.lr.head", "-1"], "optim.lr.head"),
    (["--optim.lr.head", "nan"], "optim.lr.head"),
    (["--optim.alpha_mode", "median"], "optim.alpha_mode"),
    (["--optim.bias_correction", "maybe"], "optim.bias_correction"),
])
def test_bad_option_values_are_config_errors_naming_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_run_config(load_run_config(None, args))


def test_the_study_helpers_option_names_parse():
    cfg = load_run_config(None, ["--optim.lr.head", "0.5", "--optim.alpha_mode", "auto", "--optim.bias_correction", "true"])
    assert (cfg.optim.lr.head, cfg.optim.alpha_mode, cfg.optim.bias_correction) == (0.5, "auto", True)


# ------------------------------------------------------------------ the sharded engine: the same rule
OPTIONS_CFG = dict(name="lanton", estimate_every=2, nuclear_estimator="exact", alpha_mode="auto", bias_correction=True,
                   lr=RateValues(hidden=0.02, embed_head=0.002, vector=0.002, head=0.01))
ENGINE_STEPS = 8


def _options_reference(overlap: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from engine_cases import backward_step, batches, make_model

    model = make_model(torch.float64)
    opt = build_optimizer(model, OptimConfig(**OPTIONS_CFG, delay_lr_factor=overlap))
    for x in batches(ENGINE_STEPS):
        backward_step(model, opt, x)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.alpha_auto


def _options_worker(rank, world, tmp):
    import os

    from engine_cases import make_model, sharded_run
    from lanton_dist.engine import build_sharded_optimizer, checkpoint

    out = {}
    for overlap in (False, True):
        model = make_model(torch.float64)
        opt = build_sharded_optimizer(model, OptimConfig(**OPTIONS_CFG), overlap=overlap)
        params = sharded_run(rank, world, opt, model, ENGINE_STEPS)
        opt.core.finish_variance()  # overlap: the last estimate's reduction is still pending
        out[overlap] = (params, opt.core.A.clone(), opt.core.N.clone())
    path = os.path.join(tmp, "ckpt")
    checkpoint.save(opt, path, model)
    fresh = build_sharded_optimizer(make_model(torch.float64), OptimConfig(**OPTIONS_CFG), overlap=True)
    checkpoint.load(fresh, path)
    out["restored"] = (fresh.core.A.clone(), fresh.core.N.clone())
    return out


@pytest.mark.slow
def test_engine_runs_auto_alpha_bias_correction_and_the_head_rate_as_the_reference():
    import tempfile

    from distributed import run
    from engine_cases import max_rel_err

    with tempfile.TemporaryDirectory() as tmp:
        results = run(_options_worker, 2, tmp)
    for overlap in (False, True):
        ref, ref_alpha = _options_reference(overlap)
        for r, res in enumerate(results):
            params, A, N = res[overlap]
            assert max_rel_err(params, ref) <= 1e-6, (overlap, r)
            torch.testing.assert_close(A, ref_alpha, rtol=1e-9, atol=0, equal_nan=True)
            assert not torch.isnan(A).any() and N.max() == ENGINE_STEPS // 2
    for r, res in enumerate(results):
        torch.testing.assert_close(res["restored"][0], res[True][1], rtol=0, atol=0)
        torch.testing.assert_close(res["restored"][1], res[True][2], rtol=0, atol=0)


def _fairscale_resume_worker(rank, world, tmp):
    import dataclasses
    import os

    from contract_cases import STACKS, STEPS, Run

    @dataclasses.dataclass(frozen=True)
    class OptionsRun(Run):
        def optim(self) -> OptimConfig:
            return OptimConfig(**OPTIONS_CFG)

    run_ = OptionsRun("lanton", estimate_every=2, overlap=True)
    build = STACKS["fairscale"].build
    whole = build(rank, world, run_, torch.float64)
    whole.train(0, STEPS)
    first = build(rank, world, run_, torch.float64)
    first.train(0, 4)
    path = os.path.join(tmp, "oss")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    first.save(path)
    resumed = build(rank, world, run_, torch.float64)
    resumed.load(path)
    resumed.train(4, STEPS)
    return whole.params(), resumed.params()


@pytest.mark.slow
def test_fairscale_resume_keeps_auto_alpha_and_estimate_counts_bit_exactly():
    """Saved at step 4 (two estimates: α set, n = 2), resumed to step 10: bit for bit the
    uninterrupted run (a reset α or count would change the factors)."""
    import tempfile

    pytest.importorskip("fairscale")
    from distributed import run

    with tempfile.TemporaryDirectory() as tmp:
        results = run(_fairscale_resume_worker, 2, tmp, timeout_s=300)
    for whole, resumed in results:
        for n in whole:
            assert torch.equal(whole[n], resumed[n]), n
