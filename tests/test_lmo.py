"""Specification of the LMOs and dual norms of the three geometry groups (``lanton_dist.lmo``).

For a layer of radius ρ, ``O = lmo(G)`` attains ``⟨G, O⟩ = −ρ·‖G‖_*`` when the polar
factor is exact. Radii: 1 for hidden (spectral scale √(d_out/d_in), i.e. the RMS→RMS ball),
embedding and vector; 1/d_in for the LM head under ``sign_scale='scion'``; Moonlight's
0.2·√max(d_out, d_in) scale gives ⟨G, O⟩ = −0.2·√max·‖G‖_nuclear. Fused parameters act
per logical block. A parameter stored transposed (``ParamSpec.transposed``, e.g. GPT-2's
``Conv1D``) gets the transpose of its logical matrix's LMO and the same dual norms. The exact-polar checks swap the
Newton–Schulz kernel for an SVD polar
(``exact_polar`` fixture); the real kernel is checked to stay within Muon's band.
"""
from __future__ import annotations

import math

import pytest
import torch

import lanton_dist.lmo as lmo
from engine_cases import svd_polar
from lanton_dist.groups import Block, Geometry, ParamSpec, qkv_blocks
from lanton_dist.lmo import LMOConfig

CFG = LMOConfig()
SHAPES = [(8, 8), (6, 15), (15, 6), (1, 7), (7, 1)]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hidden(name="w", shape=(8, 8), blocks=()):
    return ParamSpec(name, Geometry.HIDDEN, shape, blocks=blocks)


def nuc(x: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(x.double()).sum())


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())




# --------------------------------------------------------------------------- dual norms
@pytest.mark.parametrize("shape", SHAPES)
def test_hidden_dual_norm_is_scaled_nuclear_norm(shape):
    g = rand(*shape, seed=1)
    expected = math.sqrt(shape[0] / shape[1]) * nuc(g)
    assert float(lmo.dual_norm(hidden(shape=shape), g)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("estimator", ["exact", "ns"])
def test_hidden_dual_norm_uses_the_requested_estimator(estimator):
    g = rand(12, 20, seed=2)
    assert float(lmo.dual_norm(hidden(shape=(12, 20)), g, estimator)) == pytest.approx(math.sqrt(12 / 20) * nuc(g), rel=1e-4)


@pytest.mark.parametrize("role, sign_scale, scale", [("embed", "scion", 1.0), ("head", "unit", 1.0), ("head", "scion", 1 / 4)])
def test_embed_head_dual_norm_is_l1_times_the_sign_lmo_radius(role, sign_scale, scale):
    g = rand(9, 4, seed=3)
    spec = ParamSpec("e", Geometry.EMBED_HEAD, (9, 4), role=role)
    got = float(lmo.dual_norm(spec, g, lmo=LMOConfig(sign_scale=sign_scale)))
    assert got == pytest.approx(scale * float(g.double().abs().sum()), rel=1e-6)


@pytest.mark.parametrize("shape", [(7,), (3, 4, 2)])
def test_vector_dual_norm_is_sqrt_d_times_l2(shape):
    g = rand(*shape, seed=4)
    spec = ParamSpec("v", Geometry.VECTOR, shape)
    d = g.numel()
    assert float(lmo.dual_norm(spec, g)) == pytest.approx(math.sqrt(d) * float(g.double().norm()), rel=1e-6)


def test_fused_hidden_dual_norm_is_sum_over_blocks_with_block_d_out():
    blocks = qkv_blocks("qkv", num_heads=4, num_kv_heads=2, head_dim=2, interleaved=True)
    spec = hidden("qkv", (16, 6), blocks)
    g = rand(16, 6, seed=5)
    per_block = lmo.hidden_dual_norms([spec], [g], "exact")
    expected = [math.sqrt(b.d_out / 6) * nuc(b.gather(g)) for b in blocks]
    assert [float(x) for x in per_block] == pytest.approx(expected, rel=1e-5)
    assert float(lmo.dual_norm(spec, g)) == pytest.approx(sum(expected), rel=1e-5)
    # and not the whole-matrix norm (the test would pass vacuously otherwise)
    assert float(lmo.dual_norm(spec, g)) != pytest.approx(math.sqrt(16 / 6) * nuc(g), rel=1e-3)


def test_hidden_dual_norms_are_flattened_in_parameter_then_block_order():
    a = hidden("a", (4, 3))
    b = hidden("b", (4, 5), blocks=(Block("b:0", ((0, 1),)), Block("b:1", ((1, 4),))))
    c = hidden("c", (4, 3))
    ga, gb, gc = rand(4, 3, seed=6), rand(4, 5, seed=7), 3 * rand(4, 3, seed=8)
    out = [float(x) for x in lmo.hidden_dual_norms([a, b, c], [ga, gb, gc], "exact")]
    expected = [
        math.sqrt(4 / 3) * nuc(ga),
        math.sqrt(1 / 5) * nuc(gb[:1]),
        math.sqrt(3 / 5) * nuc(gb[1:]),
        math.sqrt(4 / 3) * nuc(gc),
    ]
    assert out == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- LMO attains the dual norm
@pytest.mark.parametrize("shape", SHAPES)
def test_hidden_lmo_attains_minus_dual_norm_with_exact_polar(exact_polar, shape):
    g = rand(*shape, seed=9)
    spec = hidden(shape=shape)
    o = lmo.direction(spec, g, CFG)
    assert inner(g, o) == pytest.approx(-float(lmo.dual_norm(spec, g)), rel=1e-5)
    # and O is on the unit sphere of the layer's norm √(d_in/d_out)·‖O‖₂
    assert math.sqrt(shape[1] / shape[0]) * float(torch.linalg.matrix_norm(o.double(), 2)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_hidden_lmo_is_minus_spectral_scale_times_polar(exact_polar, shape):
    g = rand(*shape, seed=10)
    o = lmo.direction(hidden(shape=shape), g, CFG)
    assert torch.allclose(o, -math.sqrt(shape[0] / shape[1]) * svd_polar(g), atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 8), (6, 15), (15, 6)])
def test_hidden_lmo_moonlight_scale_is_point_two_sqrt_max_dim(exact_polar, shape):
    g = rand(*shape, seed=11)
    o = lmo.direction(hidden(shape=shape), g, LMOConfig(scale_mode="moonlight"))
    scale = 0.2 * math.sqrt(max(shape))
    assert torch.allclose(o, -scale * svd_polar(g), atol=1e-6)
    assert inner(g, o) == pytest.approx(-scale * nuc(g), rel=1e-5)


@pytest.mark.parametrize("shape", [(8, 8), (6, 15), (15, 6)])
def test_hidden_lmo_with_newton_schulz_attains_dual_norm_within_muons_band(shape):
    g = rand(*shape, seed=12)
    spec = hidden(shape=shape)
    ratio = inner(g, lmo.direction(spec, g, CFG)) / -float(lmo.dual_norm(spec, g))
    assert 0.6 <= ratio <= 1.25, ratio


def test_polar_batched_with_refine_steps_is_the_exact_polar_factor():
    mats = [rand(6, 10, seed=13), rand(10, 6, seed=14), rand(6, 10, seed=15)]
    for m, p in zip(mats, lmo.polar_batched(mats, CFG, refine_steps=6)):
        assert p.shape == m.shape
        assert torch.allclose(p, svd_polar(m), atol=1e-5)
        assert inner(m, p) == pytest.approx(nuc(m), rel=1e-5)


def test_embedding_sign_lmo_attains_minus_l1():
    g = rand(9, 4, seed=16)
    spec = ParamSpec("emb", Geometry.EMBED_HEAD, (9, 4), role="embed")
    o = lmo.direction(spec, g, CFG)
    assert torch.equal(o, -torch.sign(g))
    assert inner(g, o) == pytest.approx(-float(g.double().abs().sum()), rel=1e-6)


def test_head_sign_lmo_has_radius_one_over_d_in():
    g = rand(9, 4, seed=17)
    spec = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (9, 4), role="head")
    o = lmo.direction(spec, g, CFG)
    assert torch.equal(o, -torch.sign(g) / 4)
    assert float(o.abs().max()) == pytest.approx(1 / 4)
    assert inner(g, o) == pytest.approx(-float(lmo.dual_norm(spec, g, lmo=CFG)), rel=1e-6)


def test_head_sign_lmo_with_unit_scale_has_radius_one():
    g = rand(9, 4, seed=18)
    spec = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (9, 4), role="head")
    assert torch.equal(lmo.direction(spec, g, LMOConfig(sign_scale="unit")), -torch.sign(g))


def test_sign_lmo_of_zero_entries_is_zero():
    spec = ParamSpec("emb", Geometry.EMBED_HEAD, (2, 2), role="embed")
    o = lmo.direction(spec, torch.tensor([[0.0, 2.0], [-3.0, 0.0]]), CFG)
    assert torch.equal(o, torch.tensor([[0.0, -1.0], [1.0, 0.0]]))


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_vector_lmo_attains_minus_sqrt_d_l2_and_has_unit_rms(shape):
    g = rand(*shape, seed=19)
    spec = ParamSpec("v", Geometry.VECTOR, shape)
    o = lmo.direction(spec, g, CFG)
    d = g.numel()
    assert torch.allclose(o, -math.sqrt(d) * g / g.norm(), atol=1e-6)
    assert inner(g, o) == pytest.approx(-float(lmo.dual_norm(spec, g)), rel=1e-6)
    assert float(o.double().norm() / math.sqrt(d)) == pytest.approx(1.0, rel=1e-6)


def test_vector_lmo_of_zero_is_zero_not_nan():
    spec = ParamSpec("v", Geometry.VECTOR, (5,))
    assert torch.equal(lmo.direction(spec, torch.zeros(5), CFG), torch.zeros(5))


# --------------------------------------------------------------------------- fused QKV acts per block
GQA = dict(num_heads=4, num_kv_heads=2, head_dim=3)  # q 12 rows, k 6, v 6; interleaved groups of 12


def _fused_and_parts(interleaved: bool, seed: int):
    blocks = qkv_blocks("qkv", interleaved=interleaved, **GQA)
    d_in = 10
    spec = hidden("qkv", (24, d_in), blocks)
    g = rand(24, d_in, seed=seed)
    return spec, g, blocks, d_in


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("scale_mode", ["spectral", "moonlight"])
def test_fused_qkv_lmo_equals_lmo_of_q_k_v_separately(interleaved, scale_mode):
    cfg = LMOConfig(scale_mode=scale_mode)
    spec, g, blocks, d_in = _fused_and_parts(interleaved, seed=20)
    o = lmo.direction(spec, g, cfg)
    for blk in blocks:
        part = blk.gather(g)
        alone = lmo.direction(hidden(blk.name, tuple(part.shape)), part, cfg)
        assert torch.allclose(blk.gather(o), alone, atol=1e-6), blk.name
    whole = lmo.direction(hidden("qkv", (24, d_in)), g, cfg)
    assert not torch.allclose(o, whole, atol=1e-2)  # block-wise is not the whole-matrix LMO


@pytest.mark.parametrize("interleaved", [True, False])
def test_fused_qkv_lmo_attains_minus_blockwise_dual_norm_with_exact_polar(exact_polar, interleaved):
    spec, g, blocks, d_in = _fused_and_parts(interleaved, seed=21)
    o = lmo.direction(spec, g, CFG)
    expected = sum(math.sqrt(b.d_out / d_in) * nuc(b.gather(g)) for b in blocks)
    assert inner(g, o) == pytest.approx(-expected, rel=1e-5)
    assert float(lmo.dual_norm(spec, g)) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- storage orientation
def _transposed(spec: ParamSpec) -> ParamSpec:
    """The same logical matrix stored (d_in, d_out)."""
    return ParamSpec(spec.name, spec.geometry, spec.shape[::-1], spec.role, spec.blocks, transposed=True)


ORIENTATION_CASES = [hidden(shape=s) for s in SHAPES] + [
    hidden("qkv", (24, 10), qkv_blocks("qkv", interleaved=i, **GQA)) for i in (False, True)]


@pytest.mark.parametrize("spec", ORIENTATION_CASES, ids=lambda s: f"{s.shape}x{len(s.blocks)}")
@pytest.mark.parametrize("scale_mode", ["spectral", "moonlight"])
def test_lmo_of_transposed_storage_is_the_transpose_of_the_logical_lmo(spec, scale_mode):
    cfg = LMOConfig(scale_mode=scale_mode)
    g = rand(*spec.shape, seed=30)
    stored = g.T.contiguous()
    o = lmo.direction(_transposed(spec), stored, cfg)
    assert o.shape == stored.shape and o.is_contiguous()
    assert torch.allclose(o, lmo.direction(spec, g, cfg).T, atol=1e-6)
    batched = lmo.hidden_directions([_transposed(spec), spec], [stored, g], cfg)
    assert torch.allclose(batched[0], batched[1].T, atol=1e-6)


@pytest.mark.parametrize("spec", ORIENTATION_CASES, ids=lambda s: f"{s.shape}x{len(s.blocks)}")
def test_dual_norms_of_transposed_storage_are_those_of_the_logical_matrix(spec):
    g = rand(*spec.shape, seed=31)
    got = lmo.hidden_dual_norms([_transposed(spec)], [g.T.contiguous()], "exact")
    want = lmo.hidden_dual_norms([spec], [g], "exact")
    assert [float(x) for x in got] == pytest.approx([float(x) for x in want], rel=1e-6)


def test_head_sign_radius_uses_the_logical_d_in_of_a_transposed_head():
    head = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (4, 9), role="head", transposed=True)  # logical (9, 4)
    g = rand(4, 9, seed=32)
    assert torch.equal(lmo.direction(head, g, CFG), -torch.sign(g) / 4)


# --------------------------------------------------------------------------- batching
def test_hidden_directions_batch_same_shape_blocks_into_one_newton_schulz_call(monkeypatch):
    calls = []
    real = lmo.newton_schulz

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(lmo, "newton_schulz", spy)
    specs = [hidden("a", (4, 6)), hidden("b", (5, 6)), hidden("c", (4, 6)),
             hidden("f", (8, 6), blocks=(Block("f:0", ((0, 4),)), Block("f:1", ((4, 8),))))]
    moms = [rand(*s.shape, seed=i) for i, s in enumerate(specs)]
    outs = lmo.hidden_directions(specs, moms, CFG)
    assert sorted(calls) == sorted([(4, 4, 6), (1, 5, 6)])
    monkeypatch.setattr(lmo, "newton_schulz", real)
    for s, m, o in zip(specs, moms, outs):
        assert o.shape == m.shape
        assert torch.allclose(o, lmo.direction(s, m, CFG), atol=1e-6)


# --------------------------------------------------------------------------- shard-local helpers
def test_l1_and_square_partials_sum_over_shards_to_the_whole_tensor():
    g = rand(10, 6, seed=22)
    shards = g.split([3, 3, 4])
    assert float(sum(lmo.l1_partial(s) for s in shards)) == pytest.approx(float(g.abs().sum()), rel=1e-6)
    assert float(sum(lmo.sq_partial(s) for s in shards)) == pytest.approx(float(g.pow(2).sum()), rel=1e-6)


def test_partials_accumulate_in_at_least_fp32_and_keep_fp64():
    g = rand(4, 4, seed=23)
    assert lmo.l1_partial(g.bfloat16()).dtype == torch.float32
    assert lmo.sq_partial(g.bfloat16()).dtype == torch.float32
    assert lmo.sq_partial(g.double()).dtype == torch.float64


def test_vector_and_sign_directions_of_a_shard_are_slices_of_the_whole():
    g = rand(12, seed=24)
    spec = ParamSpec("v", Geometry.VECTOR, (12,))
    whole = lmo.direction(spec, g, CFG)
    norm = sum(lmo.sq_partial(s) for s in g.split(5)).sqrt()
    got = torch.cat([lmo.vector_direction(s, norm, 12) for s in g.split(5)])
    assert torch.allclose(got, whole, atol=1e-7)
    head = ParamSpec("lm_head.weight", Geometry.EMBED_HEAD, (3, 4), role="head")
    b = g.view(3, 4)
    assert torch.equal(torch.cat([lmo.sign_direction(head, s, CFG) for s in b.split(1)]), lmo.direction(head, b, CFG))


def test_lmo_keeps_the_parameter_dtype():
    g = rand(6, 10, seed=25).bfloat16()
    assert lmo.direction(hidden(shape=(6, 10)), g, CFG).dtype == torch.bfloat16


# --------------------------------------------------------------------------- configuration
def test_lmo_config_rejects_unknown_modes_and_bad_step_counts():
    with pytest.raises(ValueError, match="scale_mode"):
        LMOConfig(scale_mode="rms")
    with pytest.raises(ValueError, match="sign_scale"):
        LMOConfig(sign_scale="half")
    with pytest.raises(ValueError, match="ns_steps"):
        LMOConfig(ns_steps=0)
    with pytest.raises(ValueError, match="scale_mode"):
        lmo.hidden_scale(4, 4, "rms")


def test_hidden_scale_values():
    assert lmo.hidden_scale(8, 2, "spectral") == pytest.approx(2.0)
    assert lmo.hidden_scale(2, 8, "spectral") == pytest.approx(0.5)
    assert lmo.hidden_scale(2, 8, "moonlight") == pytest.approx(0.2 * math.sqrt(8))
    assert lmo.hidden_scale(100, 8, "moonlight") == pytest.approx(2.0)
