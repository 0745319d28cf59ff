"""Specification of the Newton–Schulz polar-factor kernel (``lanton_dist.newton_schulz``).

Properties (spec "Layers and groups" and "Dual norms"):

* plain Muon quintic, 5 steps: the singular values of the output lie in Muon's band
  (roughly [0.6, 1.25]; measured 0.68–1.20 on the inputs below);
* ``refine_steps`` cubic steps afterwards drive them to 1 (measured |σ − 1| ≤ 7e-7 in fp32
  with 6 steps);
* on rank-deficient input only the non-zero subspace is orthogonalised; the null space
  stays (numerically) zero;
* tall input is computed on its transpose (the Gram matrix is min(m, n)²);
* batched == unbatched; the FLOP formula equals a count of the matmuls actually run.

The quintic only resolves singular values that are not tiny relative to ‖X‖_F (below
≈1.5e-3·‖X‖_F five steps do not reach the band — e.g. an unlucky 64×64 Gaussian with
condition number 3e-4). "Random" square inputs here therefore have a controlled spectrum;
rectangular Gaussians are well conditioned by themselves.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lanton_dist.newton_schulz import (
    DEFAULT_STEPS,
    POLAR_EXPRESS_COEFFS,
    QUINTIC_COEFFS,
    default_ns_dtype,
    newton_schulz,
    newton_schulz_flops,
    newton_schulz_reference,
    schedule_coeffs,
)

MUON_BAND = (0.6, 1.25)


def gaussian(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def conditioned(m: int, n: int, seed: int, lo: float = 0.05) -> torch.Tensor:
    """U diag(s) Vᵀ with s uniform in [lo, 1]: random singular vectors, bounded condition number."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.empty(r).uniform_(lo, 1.0, generator=g)
    return (u * s) @ v.T


def low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


def svdvals64(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


RANDOM_INPUTS = {
    "square_conditioned_64": lambda: conditioned(64, 64, 0),
    "square_conditioned_48": lambda: conditioned(48, 48, 1, lo=0.01),
    "wide_gaussian_32x96": lambda: gaussian(32, 96, 2),
    "tall_gaussian_96x32": lambda: gaussian(96, 32, 3),
    "tall_gaussian_128x64": lambda: gaussian(128, 64, 4),
    "wide_conditioned_16x40": lambda: conditioned(16, 40, 5),
}


class MatmulRecorder(TorchFunctionMode):
    """Records the operand shapes of every matmul run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "matmul" in getattr(func, "__name__", "") or func in (torch.mm, torch.bmm):
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        elif func in (torch.addmm, torch.baddbmm):  # fused forms: input, lhs, rhs
            self.shapes.append((tuple(args[1].shape), tuple(args[2].shape)))
        return out


# --------------------------------------------------------------------------- orthogonality
@pytest.mark.parametrize("name", sorted(RANDOM_INPUTS))
def test_ns_quintic_singular_values_lie_in_muon_band(name):
    x = RANDOM_INPUTS[name]()
    s = svdvals64(newton_schulz(x))
    assert s.min() >= MUON_BAND[0] and s.max() <= MUON_BAND[1], (name, s.min().item(), s.max().item())


@pytest.mark.parametrize("name", sorted(RANDOM_INPUTS))
def test_ns_with_refine_steps_is_orthogonal_to_tight_tolerance(name):
    x = RANDOM_INPUTS[name]()
    s = svdvals64(newton_schulz(x, refine_steps=6))
    assert (s - 1).abs().max() < 1e-5, (name, (s - 1).abs().max().item())


@pytest.mark.parametrize("name", sorted(RANDOM_INPUTS))
def test_ns_with_refine_steps_equals_svd_polar_factor(name):
    x = RANDOM_INPUTS[name]().double()
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    polar = newton_schulz(x.float(), refine_steps=6).double()
    assert (polar - u @ vh).abs().max() < 1e-4


def test_ns_plain_quintic_is_not_exactly_orthogonal():
    """The band is a real band: without refinement σ ≠ 1 (otherwise refine_steps would be moot)."""
    s = svdvals64(newton_schulz(gaussian(32, 96, 2)))
    assert (s - 1).abs().max() > 0.05


@pytest.mark.parametrize("shape,rank", [((64, 64), 8), ((32, 96), 5), ((96, 32), 10)])
def test_ns_output_is_orthogonal_on_rank_deficient_input(shape, rank):
    """Only the non-zero subspace is orthogonalised: the r non-zero singular values go to the
    band (plain) / to 1 (refined), the others stay ≈ 0, and the refined output is U_r V_rᵀ."""
    x = low_rank(*shape, rank, seed=rank)
    s_plain = svdvals64(newton_schulz(x))
    assert MUON_BAND[0] <= s_plain[:rank].min() and s_plain[:rank].max() <= MUON_BAND[1]
    assert s_plain[rank:].max() < 1e-3
    y = newton_schulz(x, refine_steps=6).double()
    s_ref = svdvals64(y)
    assert (s_ref[:rank] - 1).abs().max() < 1e-5
    assert s_ref[rank:].max() < 1e-3
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    assert (y - u[:, :rank] @ vh[:rank]).abs().max() < 1e-3


def test_ns_of_zero_matrix_is_zero_not_nan():
    y = newton_schulz(torch.zeros(3, 5), refine_steps=2)
    assert torch.equal(y, torch.zeros(3, 5))


def test_ns_is_invariant_to_input_scale():
    x = gaussian(16, 24, 7)
    assert torch.allclose(newton_schulz(x), newton_schulz(1e3 * x), atol=1e-5)


def test_ns_keeps_input_dtype_and_honours_compute_dtype():
    x = gaussian(16, 48, 8)
    y_bf16 = newton_schulz(x, dtype=torch.bfloat16)
    assert y_bf16.dtype == torch.float32
    # bf16 compute is visibly coarser than fp32 but still inside the band.
    assert (y_bf16 - newton_schulz(x)).abs().max() > 1e-4
    s = svdvals64(y_bf16)
    assert MUON_BAND[0] <= s.min() and s.max() <= MUON_BAND[1]
    assert newton_schulz(x.double()).dtype == torch.float64


def test_default_ns_dtype_is_fp32_on_cpu_fp64_for_fp64_and_bf16_on_cuda():
    assert default_ns_dtype(torch.ones(2, 2)) == torch.float32
    assert default_ns_dtype(torch.ones(2, 2, dtype=torch.bfloat16)) == torch.float32
    assert default_ns_dtype(torch.ones(2, 2, dtype=torch.float64)) == torch.float64
    fake_cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # no GPU needed
    assert default_ns_dtype(fake_cuda) == torch.bfloat16


def test_ns_of_fp64_input_is_computed_in_fp64():
    x = conditioned(12, 20, 6).double()
    s = svdvals64(newton_schulz(x, refine_steps=8))
    assert (s - 1).abs().max() < 1e-12


def test_ns_coefficients_and_steps_are_muons():
    assert QUINTIC_COEFFS == (3.4445, -4.7750, 2.0315)
    assert DEFAULT_STEPS == 5


def test_ns_matches_a_hand_written_quintic_iteration():
    """Spec: X₀ = B/‖B‖_F, X ← aX + b(XXᵀ)X + c(XXᵀ)²X, then X ← 1.5X − 0.5(XXᵀ)X."""
    x = gaussian(6, 10, 9).double()
    a, b, c = 3.4445, -4.7750, 2.0315
    X = x / x.norm()
    for _ in range(5):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    for _ in range(2):
        X = 1.5 * X - 0.5 * (X @ X.T) @ X
    assert torch.allclose(newton_schulz(x, refine_steps=2, dtype=torch.float64), X, atol=1e-10)


# --------------------------------------------------------------------------- batching / orientation
@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_ns_batched_equals_unbatched(shape):
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(10))
    batched = newton_schulz(x, refine_steps=1)
    single = torch.stack([newton_schulz(m, refine_steps=1) for m in x])
    assert batched.shape == x.shape
    assert torch.allclose(batched, single, atol=2e-6)


def test_ns_accepts_several_leading_batch_dimensions():
    x = torch.randn(2, 3, 4, 7, generator=torch.Generator().manual_seed(11))
    y = newton_schulz(x)
    assert y.shape == x.shape
    assert torch.allclose(y[1, 2], newton_schulz(x[1, 2]), atol=2e-6)


def test_ns_tall_input_is_handled_via_the_transpose():
    x = gaussian(40, 12, 12)
    assert torch.equal(newton_schulz(x), newton_schulz(x.T.contiguous()).T)


def test_ns_runs_on_the_wide_orientation_so_the_gram_matrix_is_min_dim_squared():
    rec = MatmulRecorder()
    with rec:
        newton_schulz(gaussian(40, 12, 13), steps=2, refine_steps=1)
    assert rec.shapes, "no matmul recorded"
    for lhs, rhs in rec.shapes:
        for dims in (lhs, rhs):
            assert dims[-2] in (12, 40) and dims[-1] in (12, 40)
        # every product has inner/outer dims drawn from the wide (12 × 40) problem, never a 40×40 Gram
        assert not (lhs[-2] == 40 and rhs[-1] == 40)


# --------------------------------------------------------------------------- flops
def test_ns_flops_formula_matches_hand_count():
    # m = 2, n = 3: s = 2, l = 3. Quintic step: XXᵀ 2·2·3·2 = 24, A·A 2·2·2·2 = 16, B·X 24 → 64.
    # Cubic step: XXᵀ 24 + A·X 24 → 48.
    assert newton_schulz_flops(2, 3, steps=5, refine_steps=0) == 5 * 64
    assert newton_schulz_flops(2, 3, steps=5, refine_steps=2) == 5 * 64 + 2 * 48
    assert newton_schulz_flops(3, 2, steps=1, refine_steps=1) == 64 + 48  # orientation-free
    assert newton_schulz_flops(4096, 4096) == 5 * (4 * 4096**3 + 2 * 4096**3)


@pytest.mark.parametrize("start", ["frobenius", "gram"])
@pytest.mark.parametrize("m,n,steps,refine", [(7, 13, 5, 0), (13, 7, 5, 3), (9, 9, 2, 4), (5, 20, 1, 2)])
def test_ns_flops_formula_matches_the_matmuls_actually_run(m, n, steps, refine, start):
    """Also for the Gram-norm start: its scale reuses the first step's XXᵀ and A², no extra matmul."""
    rec = MatmulRecorder()
    with rec:
        newton_schulz(gaussian(m, n, 14), steps=steps, refine_steps=refine, start=start)
    counted = sum(2 * lhs[-2] * lhs[-1] * rhs[-1] for lhs, rhs in rec.shapes)
    assert counted == newton_schulz_flops(m, n, steps, refine)


# --------------------------------------------------------------------------- input validation
def test_ns_rejects_vectors_and_negative_step_counts():
    with pytest.raises(ValueError, match="matrices"):
        newton_schulz(torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        newton_schulz(torch.ones(2, 2), steps=-1)
    with pytest.raises(ValueError, match=">= 0"):
        newton_schulz(torch.ones(2, 2), refine_steps=-1)


def test_ns_rejects_unknown_schedules_and_starts_and_a_gram_start_without_steps():
    with pytest.raises(ValueError, match="unknown Newton–Schulz schedule"):
        newton_schulz(torch.ones(2, 2), schedule="cubic")
    with pytest.raises(ValueError, match="unknown Newton–Schulz start"):
        newton_schulz(torch.ones(2, 2), start="spectral")
    with pytest.raises(ValueError, match="steps >= 1"):
        newton_schulz(torch.ones(2, 2), steps=0, start="gram")


# --------------------------------------------------------------------------- Polar Express, Gram start
def test_polar_express_coefficients_are_the_published_ones_with_the_safety_factor():
    """arXiv 2505.16932, Algorithm 1: (a, b, c) / (1.01, 1.01³, 1.01⁵) except the last polynomial."""
    assert len(POLAR_EXPRESS_COEFFS) == 8
    assert POLAR_EXPRESS_COEFFS[0] == pytest.approx((8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3,
                                                     17.300387312530933 / 1.01**5), rel=1e-15)
    assert POLAR_EXPRESS_COEFFS[-1] == (1.875, -1.25, 0.375)
    a, b, c = POLAR_EXPRESS_COEFFS[-1]
    assert a + b + c == 1.0 and a + 3 * b + 5 * c == 0.0  # p(1) = 1, p'(1) = 0: the fixed point is σ = 1


def test_schedules_give_one_coefficient_triple_per_step_and_repeat_polar_express_last():
    assert schedule_coeffs("muon", 3) == (QUINTIC_COEFFS,) * 3
    assert schedule_coeffs("polar_express", 3) == POLAR_EXPRESS_COEFFS[:3]
    assert schedule_coeffs("polar_express", 10) == POLAR_EXPRESS_COEFFS + (POLAR_EXPRESS_COEFFS[-1],) * 2


def _hand_written(x: torch.Tensor, coeffs, scale: torch.Tensor, refine: int) -> torch.Tensor:
    X = x / scale
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    for _ in range(refine):
        X = 1.5 * X - 0.5 * (X @ X.T) @ X
    return X


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_gram_start_polar_express_matches_a_hand_written_iteration(shape):
    """Spec: X₀ = B/(Σσ⁸)^⅛ = B/‖(BBᵀ)²‖_F^¼ (wide orientation), then the Polar Express steps."""
    x = gaussian(*shape, 15).double()
    w = x if shape[0] <= shape[1] else x.T
    scale = torch.linalg.matrix_norm(torch.linalg.matrix_power(w @ w.T, 2)) ** 0.25
    ref = _hand_written(w, POLAR_EXPRESS_COEFFS[:6], scale, 1)
    ref = ref if shape[0] <= shape[1] else ref.T
    out = newton_schulz(x, 6, 1, torch.float64, schedule="polar_express", start="gram")
    assert torch.allclose(out, ref, atol=1e-10)


@pytest.mark.parametrize("name", sorted(RANDOM_INPUTS))
def test_gram_start_bounds_the_top_singular_value_more_tightly_than_frobenius(name):
    """(Σσ⁸)^⅛ ≥ σ_max ≥ ... and ≤ ‖X‖_F: the start never overshoots 1 and is closer to it."""
    x = RANDOM_INPUTS[name]().double()
    s = svdvals64(x)
    gram = float(s.pow(8).sum() ** 0.125)
    assert float(s[0]) <= gram <= float(s.norm())


@pytest.mark.parametrize("name", sorted(RANDOM_INPUTS))
def test_polar_express_with_gram_start_converges_to_the_polar_factor(name):
    x = RANDOM_INPUTS[name]()
    s = svdvals64(newton_schulz(x, 8, 0, schedule="polar_express", start="gram"))
    assert (s - 1).abs().max() < 1e-4, (name, (s - 1).abs().max().item())


def test_gram_start_of_zero_and_of_a_single_row_is_exact():
    assert torch.equal(newton_schulz(torch.zeros(2, 3, 5), start="gram", schedule="polar_express"), torch.zeros(2, 3, 5))
    row = gaussian(1, 50, 16)
    y = newton_schulz(row, 6, 1, schedule="polar_express", start="gram")
    assert torch.allclose(y, row / row.norm(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(RANDOM_INPUTS))
def test_muon_quintic_with_gram_start_and_four_steps_stays_in_the_band(name):
    """The LMO option (``LMOConfig(ns_start='gram', ns_steps=4)``): one step fewer, same band."""
    s = svdvals64(newton_schulz(RANDOM_INPUTS[name](), steps=4, start="gram"))
    assert MUON_BAND[0] <= s.min() and s.max() <= MUON_BAND[1], (name, s.min().item(), s.max().item())


# --------------------------------------------------------------------------- fused kernel vs textbook
ALL_SHAPES = [(64, 64), (48, 48), (32, 96), (96, 32), (128, 64), (16, 40), (1, 30), (30, 1), (3, 5)]


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_fused_ns_equals_the_textbook_loop_in_fp32(shape):
    x = gaussian(*shape, 17)
    assert torch.allclose(newton_schulz(x), newton_schulz_reference(x), atol=2e-5)


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_fused_ns_in_bf16_is_as_close_to_fp32_as_the_textbook_loop_in_bf16(shape):
    """Same iteration, different rounding. Measured ‖Δ‖_F/‖O‖_F of each bf16 run against the fp32
    textbook on these shapes: textbook 2.8e-2 … 3.6e-2, ours 1.3e-2 … 1.9e-2 (``baddbmm`` adds
    aX and bA in fp32 before rounding once). Asserted: ours is no worse."""
    x = gaussian(*shape, 18)
    truth = newton_schulz_reference(x).double()
    ours = (newton_schulz(x, dtype=torch.bfloat16).double() - truth).norm() / truth.norm()
    ref = (newton_schulz_reference(x, dtype=torch.bfloat16).double() - truth).norm() / truth.norm()
    assert float(ours) <= float(ref), (float(ours), float(ref))


def test_compiled_ns_equals_eager():
    """``compile_backend`` traces the whole iteration (fullgraph=True); aot_eager needs no C compiler."""
    x = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(19))
    for kw in ({}, {"schedule": "polar_express", "start": "gram", "refine_steps": 1}):
        eager = newton_schulz(x, **kw)
        assert torch.allclose(newton_schulz(x, compile_backend="aot_eager", **kw), eager, atol=1e-6)


def test_symmetric_flag_without_a_triton_backend_falls_back_to_the_same_torch_result():
    """On CPU without TRITON_INTERPRET the one-triangle kernel cannot run: the torch path is used."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreter on: tests/test_kernels_symmetric.py covers this case")
    x = gaussian(20, 36, 20)
    assert torch.equal(newton_schulz(x, symmetric=True), newton_schulz(x))


# --------------------------------------------------------------------------- LMOConfig options
def test_lmo_config_passes_its_newton_schulz_options_to_the_batched_polar():
    from lanton_dist.lmo import LMOConfig, polar_batched

    mats = [gaussian(12, 20, 21), gaussian(12, 20, 22), gaussian(20, 12, 23)]
    assert LMOConfig().ns_options() == {}
    cfg = LMOConfig(ns_steps=4, ns_start="gram", ns_compile="aot_eager")
    assert cfg.ns_options() == {"start": "gram", "compile_backend": "aot_eager"}
    for m, p in zip(mats, polar_batched(mats, cfg)):
        assert torch.allclose(p, newton_schulz(m, 4, start="gram"), atol=1e-6)
    with pytest.raises(ValueError, match="ns_start"):
        LMOConfig(ns_start="spectral")


def test_lmo_start_table_measures_orthogonality_and_rms_norm_of_each_variant():
    """``launch/bench_ns.py``'s measurement behind the ``ns_start`` option: one row per
    (spectrum, variant) with ‖OOᵀ − I‖₂ and σ_max(O) (the step's RMS→RMS norm), in Muon's band."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import bench_ns

    rows = bench_ns.lmo_table([(32, 86)], ["fp32"], torch.device("cpu"))
    assert len(rows) == len(bench_ns.SPECTRA) * len(bench_ns.LMO_VARIANTS)
    for r in rows:
        assert 0 < r["rms_to_rms"] <= MUON_BAND[1]
        assert r["rms_to_rms"] ** 2 - 1 - 1e-9 <= r["orth_err"] <= 1.0  # max|σ² − 1| ≥ σ_max² − 1; σ ≥ 0
