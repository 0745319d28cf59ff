"""Each layer's dual norm is the dual of the norm whose LMO gives its step (spec, "Rule for dual
norms"): ⟨G, lmo(G)⟩ = −‖G‖_* for the direction exactly as the optimizer scales it, for every
geometry and every scale option; and every sharded backend measures the LM head's noise H as
the reference does.

The hidden case uses the exact polar factor (SVD), so the identity holds to rounding: with
Newton–Schulz the direction is only approximately orthogonal.
"""
from __future__ import annotations

import math

import pytest
import torch

from lanton_dist import lmo
from lanton_dist.groups import Block, Geometry, ParamSpec
from lanton_dist.lmo import LMOConfig

HIDDEN_SHAPES = [(12, 20), (20, 12), (16, 16)]


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def exact_hidden_direction(spec: ParamSpec, b: torch.Tensor, cfg: LMOConfig) -> torch.Tensor:
    """The optimizer's hidden direction with the exact polar factor of each logical block: the
    scaling step (:func:`lmo.scatter_block_direction`) the optimizer runs after Newton–Schulz."""
    out = torch.empty_like(b)
    for blk in spec.blocks:
        u, _, vh = torch.linalg.svd(blk.gather(spec.logical(b)), full_matrices=False)
        lmo.scatter_block_direction(spec, blk, u @ vh, out, cfg.scale_mode)
    return out


@pytest.mark.parametrize("scale_mode", ["spectral", "moonlight"])
@pytest.mark.parametrize("shape", HIDDEN_SHAPES)
def test_hidden_direction_attains_minus_the_dual_norm_in_both_scale_modes(scale_mode, shape):
    cfg = LMOConfig(scale_mode=scale_mode)
    spec = ParamSpec("w", Geometry.HIDDEN, shape)
    g = rand(*shape, seed=1)
    o = exact_hidden_direction(spec, g, cfg)
    assert inner(g, o) == pytest.approx(-float(lmo.dual_norm(spec, g, "exact", lmo=cfg)), rel=1e-10)


@pytest.mark.parametrize("scale_mode", ["spectral", "moonlight"])
def test_fused_hidden_blocks_each_attain_minus_their_own_dual_norm(scale_mode):
    cfg = LMOConfig(scale_mode=scale_mode)
    spec = ParamSpec("qkv", Geometry.HIDDEN, (24, 8), blocks=(Block("q", ((0, 16),)), Block("k", ((16, 24),))))
    g = rand(24, 8, seed=2)
    o = exact_hidden_direction(spec, g, cfg)
    duals = lmo.hidden_dual_norms([spec], [g], "exact", lmo=cfg)
    for blk, dual in zip(spec.blocks, duals):
        assert inner(blk.gather(g), blk.gather(o)) == pytest.approx(-float(dual), rel=1e-10)


def test_moonlight_hidden_dual_uses_moonlights_scale_not_the_spectral_one():
    g = rand(12, 20, seed=3)
    spec = ParamSpec("w", Geometry.HIDDEN, (12, 20))
    nuc = float(torch.linalg.svdvals(g).sum())
    assert float(lmo.dual_norm(spec, g, "exact", lmo=LMOConfig(scale_mode="moonlight"))) == pytest.approx(
        0.2 * math.sqrt(20) * nuc, rel=1e-10)


@pytest.mark.parametrize("role, sign_scale", [("head", "scion"), ("head", "unit"), ("embed", "scion"), ("embed", "unit")])
def test_sign_direction_attains_minus_the_dual_norm(role, sign_scale):
    cfg = LMOConfig(sign_scale=sign_scale)
    spec = ParamSpec("e", Geometry.EMBED_HEAD, (40, 16), role=role)
    g = rand(40, 16, seed=4)
    o = lmo.direction(spec, g, cfg)
    assert inner(g, o) == pytest.approx(-float(lmo.dual_norm(spec, g, lmo=cfg)), rel=1e-12)


def test_the_default_head_dual_is_l1_over_d_in():
    """Scion's head steps along −sign(B)/d_in, so its noise is measured in (1/d_in)·Σ|D|, not Σ|D|."""
    spec = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (40, 16), role="head")
    g = rand(40, 16, seed=5)
    assert float(lmo.dual_norm(spec, g)) == pytest.approx(float(g.abs().sum()) / 16, rel=1e-12)


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_vector_direction_attains_minus_the_dual_norm(shape):
    spec = ParamSpec("v", Geometry.VECTOR, shape)
    g = rand(*shape, seed=6)
    assert inner(g, lmo.direction(spec, g, LMOConfig())) == pytest.approx(-float(lmo.dual_norm(spec, g)), rel=1e-12)


@pytest.mark.parametrize("sign_scale", ["scion", "unit"])
def test_sharded_sign_dual_is_the_sum_of_per_shard_partials(sign_scale):
    cfg = LMOConfig(sign_scale=sign_scale)
    spec = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (40, 16), role="head")
    g = rand(40, 16, seed=7)
    shards = g.reshape(-1).split([100, 0, 333, 207])
    total = sum(float(lmo.sign_dual_partial(spec, s, cfg)) for s in shards)
    assert total == pytest.approx(float(lmo.dual_norm(spec, g, lmo=cfg)), rel=1e-12)


def test_pair_scale_is_the_scale_of_both_the_direction_and_the_dual():
    cfg = LMOConfig()
    head = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (40, 16), role="head")
    assert lmo.pair_scale(head, cfg) == 1 / 16
    assert float(lmo.direction(head, torch.ones(40, 16), cfg).abs().max()) == 1 / 16
    hidden = ParamSpec("w", Geometry.HIDDEN, (12, 20))
    assert lmo.pair_scale(hidden, cfg) == math.sqrt(12 / 20)
    assert lmo.pair_scale(hidden, LMOConfig(scale_mode="moonlight")) == 0.2 * math.sqrt(20)
    assert lmo.pair_scale(ParamSpec("v", Geometry.VECTOR, (9,)), cfg) == 3.0


# ------------------------------------------------------------------ every backend: the head's H
slow = pytest.mark.slow
H_STEPS = 6


def _tracker_rows(rows: list[dict]) -> dict[str, float]:
    return {r["name"]: r["H"] for r in rows}


def _sharded_h_worker(rank, world, stack):
    from contract_cases import STACKS, Run, batches, rows

    runner = STACKS[stack].build(rank, world, Run("lanton", estimate_every=2), torch.float64)
    for x in batches(H_STEPS):
        runner.step(rows(x, rank, world))
    return _tracker_rows(runner.optimizer.layer_diagnostics())


def _reference_h() -> dict[str, float]:
    from engine_cases import backward_step, batches, make_model
    from lanton_dist.config import OptimConfig
    from lanton_dist.factory import build_optimizer

    model = make_model(torch.float64)
    opt = build_optimizer(model, OptimConfig(name="lanton", estimate_every=2, nuclear_estimator="exact"))
    for x in batches(H_STEPS):
        backward_step(model, opt, x)
    return _tracker_rows(opt.layer_diagnostics())


@slow
@pytest.mark.parametrize("stack", ["engine", "fsdp2"])
def test_sharded_backends_measure_every_layers_noise_as_the_reference_does(stack):
    """H of every layer (the LM head's sharded ℓ1 sum included) after 6 steps on 2 ranks equals
    the reference's, fp64."""
    from distributed import run

    ref = _reference_h()
    head = [n for n in ref if "lm_head" in n]
    assert head and ref[head[0]] > 0
    for got in run(_sharded_h_worker, 2, stack):
        assert set(got) == set(ref)
        for name, h in ref.items():
            assert got[name] == pytest.approx(h, rel=1e-9, abs=1e-300), name
