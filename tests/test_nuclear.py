"""Specification of the nuclear-norm estimators (``lanton_dist.nuclear``).

``ns`` (the GPU default) is ⟨D, polar(D)⟩ with :data:`~lanton_dist.nuclear.NS_ESTIMATE`: the
Gram-norm start, 6 Polar Express steps and 1 cubic step (1.33–1.40× the FLOPs of one NS5 call).
Its bound, asserted on the three spectra of ``launch/bench_ns.py`` (Gaussian, decaying
logspace(0, −4), rank 16 + noise) on wide, tall and square shapes, 1×N and all-zero: relative
error ≤ 1e-3 in fp32 and in bf16 (bf16 D, bf16 Newton–Schulz, fp32 accumulation). Measured here
(CPU, torch 2.13): fp32 −1.8e-4 … −1.5e-6 (the decaying spectrum's σ < 1e-3·σ_max are not
reached by the schedule's l = 1e-3), bf16 −6.3e-4 … +1.6e-5. ``launch/bench_ns.py`` gives the table
that chose it (512×1376 and 1024×2752: ``launch/results/bench_ns.json``).

The other estimators, over the CASES below (relative error against fp64 svdvals, fp32 input):

=====================  ======================  ======================  ======================
estimator              full rank, square       full rank, rectangular  low rank (r ≤ 16)
=====================  ======================  ======================  ======================
exact (svdvals fp32)   −1.6e-7 … +4.9e-8       −4.7e-8 … +1.9e-7       +7.4e-9 … +6.7e-7
ns, muon5 (no refine)  −18.3% … −16.1%         −20.6% … −14.4%         −6.3% … −4.6%
rsvd, rank 16          −55% … −44%             −64% … −38%             −1.4e-7 … +1.2e-7
rsvd, rank = min(m,n)  −9.3e-8 … +2.1e-7       −1.8e-8 … +5.2e-8       −3.2e-8 … +1.7e-7
=====================  ======================  ======================  ======================

rsvd is therefore unusable for full-rank differences (the module docstring says so); it is exact
when rank(D) ≤ r. Asserted bounds: exact 5e-6; muon5 within [−25%, −2%] on full rank and ±15%
on low rank; rsvd exact (1e-5) when rank(D) ≤ r and never above the exact value.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lanton_dist.nuclear import (
    ESTIMATORS,
    NS_ESTIMATE,
    NSEstimate,
    nuclear_norm,
    resolve_estimator,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))  # bench_ns: the test spectra, shared with the benchmark
import bench_ns as bench


def _gauss(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _low_rank(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


FULL_SQUARE = {f"gauss{n}x{n}_s{s}": (n, n, s) for n, s in [(64, 0), (64, 1), (64, 3), (48, 0), (48, 2)]}
FULL_RECT = {f"gauss{m}x{n}_s{s}": (m, n, s) for m, n, s in [(32, 96, 0), (96, 32, 1), (128, 64, 2), (64, 128, 3)]}
LOW_RANK = {f"rank{r}_{m}x{n}": (m, n, r) for m, n, r in [(64, 64, 4), (64, 64, 16), (32, 96, 8), (96, 32, 16)]}


def case_matrix(kind: str, name: str) -> torch.Tensor:
    if kind == "low_rank":
        m, n, r = LOW_RANK[name]
        return _low_rank(m, n, r, seed=100 + r)
    m, n, s = (FULL_SQUARE | FULL_RECT)[name]
    return _gauss(m, n, s)


CASES = [("square", k) for k in FULL_SQUARE] + [("rect", k) for k in FULL_RECT] + [("low_rank", k) for k in LOW_RANK]
FULL_CASES = [c for c in CASES if c[0] != "low_rank"]


def rel_err(estimate: torch.Tensor, d: torch.Tensor) -> float:
    truth = torch.linalg.svdvals(d.double()).sum()
    return float((estimate.double() - truth) / truth)


@pytest.mark.parametrize("kind,name", CASES)
def test_exact_estimator_equals_svdvals_sum(kind, name):
    d = case_matrix(kind, name)
    assert abs(rel_err(nuclear_norm(d, "exact"), d)) < 5e-6


SPECTRUM_SHAPES = [(128, 344), (344, 128), (96, 96)]
NS5 = NSEstimate(5, 0, "muon", "frobenius")  # the LMO's plain quintic, as an estimator


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SPECTRUM_SHAPES)
@pytest.mark.parametrize("kind", bench.SPECTRA)
def test_ns_estimator_is_within_1e3_on_the_three_spectra(kind, shape, dtype):
    d = bench.spectrum_matrix(kind, *shape).to(bench.DTYPES[dtype])
    ns = replace(NS_ESTIMATE, dtype=bench.DTYPES[dtype])
    err = bench.relative_error(nuclear_norm(d, "ns", ns=ns), bench.true_nuclear(d))
    assert abs(err) <= 1e-3, err


@pytest.mark.parametrize("kind,name", CASES)
def test_ns_estimator_is_within_1e3_on_gaussian_and_low_rank_cases(kind, name):
    d = case_matrix(kind, name)
    assert abs(rel_err(nuclear_norm(d, "ns"), d)) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ns_estimator_of_a_single_row_or_column_is_its_euclidean_norm(dtype):
    for d in (_gauss(1, 300, 4), _gauss(300, 1, 5)):
        d = d.to(dtype)
        truth = d.double().norm()
        est = nuclear_norm(d, "ns", ns=replace(NS_ESTIMATE, dtype=dtype)).double()
        assert abs(float(est / truth) - 1) <= 1e-3


def test_default_ns_estimate_is_gram_start_polar_express_within_one_and_a_half_ns5_calls():
    assert (NS_ESTIMATE.start, NS_ESTIMATE.schedule) == ("gram", "polar_express")
    for m, n in [(4096, 4096), (4096, 11008), (11008, 4096), (1, 4096), (2048, 5632)]:
        assert NS_ESTIMATE.cost(m, n) <= 1.5


def test_gram_start_is_what_makes_six_polar_express_steps_enough_on_a_decaying_spectrum():
    """Same 6 steps, Frobenius start, 512×1376 logspace(0, −4): measured −2.06e-3 (over the
    bound) against −8.65e-4 with the Gram start. On the Gaussian and low-rank spectra the two
    starts are within 20% of each other (launch/bench_ns.py); the decaying one is where ‖D‖_F
    overshoots ‖D‖₂ most."""
    d = bench.spectrum_matrix("decaying", 512, 1376)
    truth = bench.true_nuclear(d)
    frob = bench.relative_error(nuclear_norm(d, "ns", ns=replace(NS_ESTIMATE, start="frobenius", refine_steps=0)), truth)
    gram = bench.relative_error(nuclear_norm(d, "ns", ns=replace(NS_ESTIMATE, refine_steps=0)), truth)
    assert abs(gram) < 0.5 * abs(frob), (gram, frob)


def test_ns_estimate_rejects_bad_settings():
    with pytest.raises(ValueError, match="schedule"):
        NSEstimate(schedule="newton")
    with pytest.raises(ValueError, match="steps >= 1"):
        NSEstimate(steps=0)


@pytest.mark.parametrize("kind,name", FULL_CASES)
def test_plain_ns5_estimator_is_biased_low_on_full_rank(kind, name):
    """⟨D, NS5(D)⟩ = Σσᵢφ(σᵢ) with φ in Muon's band: a 2–25% underestimate on full rank."""
    d = case_matrix(kind, name)
    err = rel_err(nuclear_norm(d, "ns", ns=NS5), d)
    assert -0.25 < err < -0.02, err


@pytest.mark.parametrize("name", sorted(LOW_RANK))
def test_plain_ns5_estimator_is_within_15_percent_on_low_rank(name):
    d = case_matrix("low_rank", name)
    assert abs(rel_err(nuclear_norm(d, "ns", ns=NS5), d)) < 0.15


@pytest.mark.parametrize("name", sorted(LOW_RANK))
def test_rsvd_is_exact_when_rank_does_not_exceed_r(name):
    d = case_matrix("low_rank", name)
    est = nuclear_norm(d, "rsvd", rank=16, generator=torch.Generator().manual_seed(0))
    assert abs(rel_err(est, d)) < 1e-5


@pytest.mark.parametrize("kind,name", FULL_CASES)
def test_rsvd_is_biased_low_on_full_rank(kind, name):
    d = case_matrix(kind, name)
    err = rel_err(nuclear_norm(d, "rsvd", rank=16, generator=torch.Generator().manual_seed(0)), d)
    assert err < -0.1, err


@pytest.mark.parametrize("kind,name", CASES)
def test_rsvd_never_overestimates(kind, name):
    d = case_matrix(kind, name)
    for r in (4, 16, 32):
        est = nuclear_norm(d, "rsvd", rank=r, generator=torch.Generator().manual_seed(r))
        assert rel_err(est, d) <= 1e-6


def test_rsvd_with_power_iterations_captures_the_top_r_singular_values():
    """Slowly decaying spectrum σᵢ = 0.9ⁱ (64×48): rank-16 rsvd estimates Σ_{i<16}σᵢ (its Ky Fan
    upper bound). Measured over 5 sketches: −0.7% … −0.4% with the default 2 power
    iterations, −8.5% … −6.1% with none."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(64, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    s = 0.9 ** torch.arange(48.0)
    d = (u * s) @ v.T
    top = float(s[:16].double().sum())
    for seed in range(5):
        est = float(nuclear_norm(d, "rsvd", rank=16, generator=torch.Generator().manual_seed(seed)))
        raw = float(nuclear_norm(d, "rsvd", rank=16, power_iters=0, generator=torch.Generator().manual_seed(seed)))
        assert -1.5e-2 < (est - top) / top <= 1e-6
        assert (raw - top) / top < -3e-2


def test_rsvd_rank_is_capped_at_min_dim_and_then_exact_on_full_rank():
    d = _gauss(12, 40, 5)
    est = nuclear_norm(d, "rsvd", rank=64, generator=torch.Generator().manual_seed(0))
    assert abs(rel_err(est, d)) < 1e-5


def test_rsvd_is_reproducible_with_a_generator():
    d = _gauss(40, 40, 6)
    a = nuclear_norm(d, "rsvd", rank=8, generator=torch.Generator().manual_seed(3))
    b = nuclear_norm(d, "rsvd", rank=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_are_batched_over_leading_dimensions(estimator):
    d = torch.stack([_low_rank(10, 14, 3, seed=s) for s in range(4)]).reshape(2, 2, 10, 14)
    out = nuclear_norm(d, estimator, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2)
    truth = torch.linalg.svdvals(d.double()).sum(-1)
    assert torch.allclose(out.double(), truth, rtol=1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_return_fp32_for_low_precision_and_fp64_for_fp64(estimator):
    d = _low_rank(8, 12, 3, seed=1)
    assert nuclear_norm(d.bfloat16(), estimator).dtype == torch.float32
    out64 = nuclear_norm(d.double(), estimator)
    assert out64.dtype == torch.float64
    # ns in fp64 is limited by its 7 steps (measured 2.0e-6 here), not by precision
    assert abs(rel_err(out64, d.double())) < (1e-5 if estimator == "ns" else 1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nuclear_norm_of_zero_is_zero(estimator):
    assert float(nuclear_norm(torch.zeros(5, 7), estimator)) == 0.0


def test_nuclear_norm_rejects_vectors_and_unknown_estimators():
    with pytest.raises(ValueError, match="needs"):
        nuclear_norm(torch.ones(5), "exact")
    with pytest.raises(ValueError, match="unknown nuclear estimator"):
        nuclear_norm(torch.ones(3, 3), "eig")  # type: ignore[arg-type]


def test_resolve_estimator_auto_is_exact_on_cpu_and_ns_on_cuda():
    assert resolve_estimator("auto", torch.device("cpu")) == "exact"
    assert resolve_estimator("auto", torch.device("cuda")) == "ns"
    for name in ESTIMATORS:
        assert resolve_estimator(name, torch.device("cpu")) == name
    with pytest.raises(ValueError, match="unknown nuclear_estimator 'svd'"):
        resolve_estimator("svd", torch.device("cpu"))


if __name__ == "__main__":  # re-measure the docstring table
    rows: dict[tuple[str, str], list[float]] = {}
    for kind, name in CASES:
        d = case_matrix(kind, name)
        g = lambda: torch.Generator().manual_seed(0)
        for label, est in [
            ("exact", nuclear_norm(d, "exact")),
            ("ns", nuclear_norm(d, "ns")),
            ("ns/muon5", nuclear_norm(d, "ns", ns=NS5)),
            ("rsvd16", nuclear_norm(d, "rsvd", rank=16, generator=g())),
            ("rsvd_full", nuclear_norm(d, "rsvd", rank=min(d.shape), generator=g())),
        ]:
            rows.setdefault((label, kind), []).append(rel_err(est, d))
    for (label, kind), errs in rows.items():
        print(f"{label:10s} {kind:9s} min {min(errs):+.2e} max {max(errs):+.2e}")
