"""Specification of the reference LANTON / Scion optimizer (``lanton_dist.lanton.LANTON``).

The expected values are computed here from the spec's formulas (Algorithm 1), with plain
torch arithmetic and none of the optimizer's helpers:

    B ← β₁B + (1−β₁)G;   O = lmo(B)  (Nesterov: lmo(β₁B + (1−β₁)G));
    on t mod k == 0:  H ← β₂H + (1−β₂)‖G − G̃‖_*²   (I: G̃ = G_{t−1};  II: D = ∇_A − ∇_B);
    α^ℓ = α/√(α² + H^ℓ);   η^ℓ = η·√(α^ℓ/α^m), m = max-α (or min-α) layer of ℓ's group;
    W ← W(1 − ηλ) + η^ℓ·O   (``wd_lr='layer'``: W(1 − η^ℓλ)).

Every layout below has two layers per geometry group, with different noise levels, so the
group-wide ratio α^ℓ/α^m is not 1.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lanton_dist.config import OptimConfig
from lanton_dist.factory import param_groups
from lanton_dist.groups import Geometry, ParamSpec, qkv_blocks
from lanton_dist import noise
from lanton_dist.lanton import LANTON

HIDDEN, EMBED_HEAD, VECTOR = Geometry.HIDDEN, Geometry.EMBED_HEAD, Geometry.VECTOR


# =========================================================================== spec formulas
def q5(x: float, steps: int = 5) -> float:
    """Muon's quintic on one (normalised) singular value: p(x) = ax + bx³ + cx⁵."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def ns5(b: torch.Tensor) -> torch.Tensor:
    """Spec: X₀ = B/‖B‖_F, five steps X ← aX + b(XXᵀ)X + c(XXᵀ)²X, on the wide orientation."""
    tall = b.shape[0] > b.shape[1]
    x = (b.T if tall else b).double()
    x = x / x.norm()
    a_, b_, c_ = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        a = x @ x.T
        x = a_ * x + b_ * (a @ x) + c_ * (a @ a @ x)
    return x.T if tall else x


def spec_lmo(spec: ParamSpec, m: torch.Tensor) -> torch.Tensor:
    if spec.geometry is HIDDEN:
        d_out, d_in = spec.shape
        return -math.sqrt(d_out / d_in) * ns5(m)
    if spec.geometry is EMBED_HEAD:
        radius = 1.0 / spec.shape[1] if spec.role == "head" else 1.0
        return -radius * torch.sign(m)
    return -math.sqrt(m.numel()) * m / m.norm()


def spec_dual(spec: ParamSpec, d: torch.Tensor) -> float:
    if spec.geometry is HIDDEN:
        d_out, d_in = spec.shape
        return math.sqrt(d_out / d_in) * float(torch.linalg.svdvals(d.double()).sum())
    if spec.geometry is EMBED_HEAD:  # the dual of the sign LMO's norm, its radius included
        radius = 1.0 / spec.shape[1] if spec.role == "head" else 1.0
        return radius * float(d.double().abs().sum())
    return math.sqrt(d.numel()) * float(d.double().norm())


def spec_reference(w0, specs, hp, grads, halves=None, *, option="I", k=1, beta1=0.9, beta2=0.9, wd=0.1,
                   nesterov=False, wd_lr="group", anchor="max", delay=False, adaptive=True, lr_mult=None):
    """Algorithm 1 of the spec, float64, one scalar H per (unfused) layer.

    Returns one dict per step: name → dict(W, B, H, f) with f the factor stored after the step."""
    names = list(specs)
    W = {n: w0[n].double().clone() for n in names}
    B = {n: torch.zeros_like(W[n]) for n in names}
    H = {n: 0.0 for n in names}
    f = {n: 1.0 for n in names}
    prev = {n: None for n in names}
    trace = []
    for t in range(1, len(grads) + 1):
        est = adaptive and t % k == 0
        if adaptive and option == "II" and est:
            g_a, g_b = halves[t]
            G = {n: g_a[n].double() + g_b[n].double() for n in names}
        else:
            G = {n: grads[t - 1][n].double() for n in names}
        for n in names:
            B[n] = beta1 * B[n] + (1 - beta1) * G[n]
        if est:
            for n in names:
                if option == "I":
                    if prev[n] is None:
                        continue
                    D = G[n] - prev[n]
                else:
                    D = 2 * (g_a[n].double() - g_b[n].double())
                H[n] = beta2 * H[n] + (1 - beta2) * spec_dual(specs[n], D) ** 2
        prev = dict(G)
        if est:
            alpha = {n: hp[specs[n].geometry]["alpha"] / math.sqrt(hp[specs[n].geometry]["alpha"] ** 2 + H[n]) for n in names}
            new = {}
            for n in names:
                peers = [alpha[m] for m in names if specs[m].geometry is specs[n].geometry]
                ref = max(peers) if anchor == "max" else min(peers)
                new[n] = math.sqrt(alpha[n] / ref)
            used, f = (f if delay else new), new
        else:
            used = f
        for n in names:
            M = beta1 * B[n] + (1 - beta1) * G[n] if nesterov else B[n]
            O = spec_lmo(specs[n], M)
            lr = hp[specs[n].geometry]["lr"] * (lr_mult(t) if lr_mult else 1.0)
            decay = lr * wd * (used[n] if wd_lr == "layer" else 1.0)
            W[n] = W[n] * (1 - decay) + lr * used[n] * O
        trace.append({n: dict(W=W[n].clone(), B=B[n].clone(), H=H[n], f=f[n]) for n in names})
    return trace


# =========================================================================== fixtures
LAYOUT = [  # name, geometry, shape, role, gradient-noise scale
    ("h1", HIDDEN, (2, 2), "", 0.1),
    ("h2", HIDDEN, (4, 2), "", 1.0),  # tall: √(d_out/d_in) = √2, NS on the transpose
    ("emb", EMBED_HEAD, (3, 2), "embed", 0.2),
    ("head", EMBED_HEAD, (3, 2), "head", 1.5),  # sign radius 1/d_in = 1/2
    ("g1", VECTOR, (3,), "", 0.05),
    ("g2", VECTOR, (3,), "", 0.8),
]
HP = {HIDDEN: dict(lr=0.1, alpha=1.0), EMBED_HEAD: dict(lr=0.05, alpha=0.5), VECTOR: dict(lr=0.02, alpha=2.0)}
SPECS = {n: ParamSpec(n, geo, shape, role) for n, geo, shape, role, _ in LAYOUT}
NOISE = {n: s for n, *_, s in LAYOUT}


def make_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {n: nn.Parameter(torch.randn(*s.shape, generator=gen)) for n, s in SPECS.items()}


def make_groups(params, hp=HP):
    return [dict(params=[params[n] for n in SPECS if SPECS[n].geometry is geo],
                 specs=[SPECS[n] for n in SPECS if SPECS[n].geometry is geo], **hp[geo]) for geo in (HIDDEN, EMBED_HEAD, VECTOR)]


def grad_stream(steps: int, seed: int = 1, constant: bool = False):
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(*s.shape, generator=gen) for n, s in SPECS.items()}
    if constant:
        return [dict(base) for _ in range(steps)]
    return [{n: base[n] + NOISE[n] * torch.randn(*SPECS[n].shape, generator=gen) for n in SPECS} for _ in range(steps)]


def half_stream(grads, seed: int = 2):
    """Option II half-batch gradients (each already weighted by 1/2): g_A + g_B = G, D = 2(g_A − g_B)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t, G in enumerate(grads, 1):
        delta = {n: 0.5 * NOISE[n] * torch.randn(*SPECS[n].shape, generator=gen) for n in SPECS}
        out[t] = ({n: G[n] / 2 + delta[n] for n in SPECS}, {n: G[n] / 2 - delta[n] for n in SPECS})
    return out


def drive(opt, params, grads, halves=None, sched=None):
    """Feed the gradients (two half-batches with a stash when the optimizer asks) and snapshot."""
    snaps = []
    for t, G in enumerate(grads, 1):
        if opt.needs_two_half_batches():
            g_a, g_b = halves[t]
            for n, p in params.items():
                p.grad = g_a[n].clone()
            opt.stash_half_gradient()
            assert all(p.grad is None for p in params.values())
            for n, p in params.items():
                p.grad = g_b[n].clone()
        else:
            for n, p in params.items():
                p.grad = G[n].clone()
        opt.step()
        if sched is not None:
            sched.step()
        snaps.append({n: dict(W=p.detach().clone(), B=opt.state[p]["momentum_buffer"].clone(),
                              H=float(opt.state[p]["H"][0]), f=float(opt.state[p]["lr_factor"][0]))
                      for n, p in params.items()})
    return snaps


def assert_trace_equal(got, want, atol=2e-5):
    assert len(got) == len(want)
    for t, (g_step, w_step) in enumerate(zip(got, want), 1):
        for n in SPECS:
            g, w = g_step[n], w_step[n]
            assert torch.allclose(g["B"].double(), w["B"], atol=1e-6), (t, n, "B")
            assert g["H"] == pytest.approx(w["H"], rel=1e-5, abs=1e-7), (t, n, "H")
            assert g["f"] == pytest.approx(w["f"], rel=1e-5), (t, n, "factor")
            assert torch.allclose(g["W"].double(), w["W"], atol=atol), (t, n, "W", (g["W"].double() - w["W"]).abs().max())


def run_both(steps=3, *, option="I", k=1, opt_kwargs=None, ref_kwargs=None, constant=False):
    params = make_params()
    w0 = {n: p.detach().clone() for n, p in params.items()}
    grads = grad_stream(steps, constant=constant)
    halves = half_stream(grads)
    kw = dict(weight_decay=0.1, estimate_every=k, option=option, nuclear_estimator="exact") | (opt_kwargs or {})
    opt = LANTON(make_groups(params), **kw)
    got = drive(opt, params, grads, halves)
    want = spec_reference(w0, SPECS, HP, grads, halves, option=option, k=k, **(ref_kwargs or {}))
    return got, want, opt, params


def factors_of(trace_step):
    return {n: v["f"] for n, v in trace_step.items()}


# =========================================================================== hand-written two-step trace
def test_option_I_k1_two_step_trace_by_hand():
    """Option I, k = 1, β₁ = β₂ = 0.9, λ = 0.1; diagonal hidden matrices so NS is a scalar map.

    Layer 1 of each group sees the same gradient twice (H = 0), layer 2 a changed one."""
    b1, b2, lam = 0.9, 0.9, 0.1
    lr = {HIDDEN: 0.1, EMBED_HEAD: 0.05, VECTOR: 0.02}
    alpha = {HIDDEN: 1.0, EMBED_HEAD: 0.5, VECTOR: 2.0}
    specs = {
        "h1": ParamSpec("h1", HIDDEN, (2, 2)), "h2": ParamSpec("h2", HIDDEN, (2, 2)),
        "emb": ParamSpec("emb", EMBED_HEAD, (2, 2), "embed"), "head": ParamSpec("head", EMBED_HEAD, (2, 2), "head"),
        "g1": ParamSpec("g1", VECTOR, (3,)), "g2": ParamSpec("g2", VECTOR, (3,)),
    }
    T = torch.tensor
    w0 = {"h1": T([[1.0, 0.5], [0.0, 2.0]]), "h2": T([[0.5, 0.0], [-1.0, 1.0]]),
          "emb": T([[1.0, -1.0], [2.0, 0.0]]), "head": T([[0.0, 1.0], [1.0, 1.0]]),
          "g1": T([1.0, 1.0, 1.0]), "g2": T([2.0, 0.0, -2.0])}
    G1 = {"h1": T([[1.0, 0.0], [0.0, 2.0]]), "h2": T([[1.0, 0.0], [0.0, 2.0]]),
          "emb": T([[1.0, -2.0], [0.0, 3.0]]), "head": T([[1.0, 1.0], [1.0, 1.0]]),
          "g1": T([3.0, 0.0, 4.0]), "g2": T([1.0, 2.0, 2.0])}
    G2 = dict(G1, h2=T([[1.0, 0.0], [0.0, -2.0]]), head=T([[1.0, -1.0], [1.0, 1.0]]), g2=T([1.0, 2.0, -2.0]))

    params = {n: nn.Parameter(w.clone()) for n, w in w0.items()}
    groups = [dict(params=[params[n] for n in specs if specs[n].geometry is geo],
                   specs=[specs[n] for n in specs if specs[n].geometry is geo], lr=lr[geo], alpha=alpha[geo])
              for geo in (HIDDEN, EMBED_HEAD, VECTOR)]
    opt = LANTON(groups, weight_decay=lam, beta1=b1, beta2=b2, estimate_every=1, option="I", nuclear_estimator="exact")

    def step(grads):
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()

    def diag_ns(d1: float, d2: float) -> torch.Tensor:  # NS5 of diag(d1, d2): q5 on d/‖d‖
        nrm = math.hypot(d1, d2)
        return T([[q5(d1 / nrm), 0.0], [0.0, q5(d2 / nrm)]])

    # ---- step 1: B = 0.1·G1; no previous gradient → H = 0, α = 1, every factor 1.
    step(G1)
    B1 = {n: 0.1 * g for n, g in G1.items()}
    O1 = {
        "h1": -diag_ns(0.1, 0.2), "h2": -diag_ns(0.1, 0.2),          # −√(2/2)·NS5(B)
        "emb": -torch.sign(B1["emb"]), "head": -torch.sign(B1["head"]) / 2,  # head radius 1/d_in
        "g1": -math.sqrt(3) * T([0.6, 0.0, 0.8]),                      # B = [.3, 0, .4], ‖B‖ = .5
        "g2": -math.sqrt(3) * T([1 / 3, 2 / 3, 2 / 3]),                # B = [.1, .2, .2], ‖B‖ = .3
    }
    W1 = {n: w0[n] * (1 - lr[specs[n].geometry] * lam) + lr[specs[n].geometry] * 1.0 * O1[n] for n in w0}
    for n, p in params.items():
        assert torch.allclose(opt.state[p]["momentum_buffer"], B1[n], atol=1e-7), n
        assert float(opt.state[p]["H"]) == 0.0 and float(opt.state[p]["lr_factor"]) == 1.0, n
        assert torch.allclose(p.detach(), W1[n], atol=1e-6), n

    # ---- step 2: B = 0.9·B1 + 0.1·G2; H = 0.1·‖G2 − G1‖_*².
    step(G2)
    B2 = {n: b1 * B1[n] + (1 - b1) * G2[n] for n in w0}
    # h2: D = diag(0, −4): ‖D‖_nuc = 4 → H = 0.1·16 = 1.6, α = 1/√(1 + 1.6) = 0.62017
    # head: D = [[0, −2], [0, 0]]: (1/d_in)·‖D‖₁ = 1 → H = 0.1, α = 0.5/√(0.25 + 0.1) = 0.84515
    # g2: D = [0, 0, −4]: √3·4 → H = 0.1·48 = 4.8, α = 2/√(4 + 4.8) = 0.67420
    H2 = {"h1": 0.0, "h2": 1.6, "emb": 0.0, "head": 0.1, "g1": 0.0, "g2": 4.8}
    a2 = {n: alpha[specs[n].geometry] / math.sqrt(alpha[specs[n].geometry] ** 2 + H2[n]) for n in w0}
    assert a2["h2"] == pytest.approx(0.620174, rel=1e-5) and a2["g2"] == pytest.approx(0.674200, rel=1e-5)
    assert a2["head"] == pytest.approx(0.845154, rel=1e-5)
    # the quiet layer of each group has α = 1 (the max) → factor 1; the noisy one √(α/1)
    f2 = {"h1": 1.0, "h2": math.sqrt(a2["h2"]), "emb": 1.0, "head": math.sqrt(a2["head"]), "g1": 1.0, "g2": math.sqrt(a2["g2"])}
    assert f2["h2"] == pytest.approx(0.787511, rel=1e-5) and f2["g2"] == pytest.approx(0.821097, rel=1e-5)
    O2 = {
        "h1": -diag_ns(0.19, 0.38),          # 0.9·diag(.1,.2) + 0.1·diag(1,2)
        "h2": -diag_ns(0.19, -0.02),         # 0.9·diag(.1,.2) + 0.1·diag(1,−2)
        "emb": -torch.sign(B2["emb"]),
        "head": -T([[1.0, -1.0], [1.0, 1.0]]) / 2,  # B2 = [[.19, −.01], [.19, .19]]
        "g1": -math.sqrt(3) * T([0.6, 0.0, 0.8]),   # B2 = [.57, 0, .76]
        "g2": -math.sqrt(3) * T([0.19, 0.38, -0.02]) / math.sqrt(0.1809),
    }
    W2 = {n: W1[n] * (1 - lr[specs[n].geometry] * lam) + lr[specs[n].geometry] * f2[n] * O2[n] for n in w0}
    for n, p in params.items():
        assert torch.allclose(opt.state[p]["momentum_buffer"], B2[n], atol=1e-7), n
        assert float(opt.state[p]["H"]) == pytest.approx(H2[n], rel=1e-6, abs=1e-9), n
        assert float(opt.state[p]["lr_factor"]) == pytest.approx(f2[n], rel=1e-6), n
        assert torch.allclose(p.detach(), W2[n], atol=1e-6), (n, p.detach(), W2[n])
    assert opt.t == 2


# =========================================================================== traces against the spec
@pytest.mark.parametrize("option,k,steps", [("I", 1, 3), ("I", 3, 7), ("II", 1, 3), ("II", 3, 7)])
def test_reference_trace_matches_spec_formulas(option, k, steps):
    got, want, _, _ = run_both(steps, option=option, k=k)
    assert_trace_equal(got, want)
    final = factors_of(want[-1])
    for a, b in (("h1", "h2"), ("emb", "head"), ("g1", "g2")):  # the group ratio really matters
        assert min(final[a], final[b]) < 0.95 and max(final[a], final[b]) == pytest.approx(1.0)


@pytest.mark.parametrize("option", ["I", "II"])
def test_factors_stay_one_until_the_first_estimation_step(option):
    got, _, _, _ = run_both(2, option=option, k=3)
    for snap in got:
        assert all(v["f"] == 1.0 and v["H"] == 0.0 for v in snap.values())


def test_option_I_with_k3_keeps_previous_gradient_only_before_estimation_steps():
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=3, option="I")
    p = params["h1"]
    kept = []
    for t, G in enumerate(grad_stream(6), 1):
        for n, q in params.items():
            q.grad = G[n].clone()
        opt.step()
        kept.append("prev_grad" in opt.state[p])
        if kept[-1]:
            assert torch.equal(opt.state[p]["prev_grad"], G["h1"])
    assert kept == [False, True, False, False, True, False]


def test_nesterov_uses_lmo_of_beta1_b_plus_one_minus_beta1_g():
    got, want, _, _ = run_both(3, opt_kwargs=dict(nesterov=True), ref_kwargs=dict(nesterov=True))
    assert_trace_equal(got, want)
    plain = run_both(3)[0]
    assert not torch.allclose(got[-1]["h1"]["W"], plain[-1]["h1"]["W"], atol=1e-4)


@pytest.mark.parametrize("wd_lr", ["group", "layer"])
def test_weight_decay_uses_the_group_or_the_layer_rate(wd_lr):
    got, want, _, _ = run_both(3, opt_kwargs=dict(weight_decay=0.5, wd_lr=wd_lr), ref_kwargs=dict(wd=0.5, wd_lr=wd_lr))
    assert_trace_equal(got, want)
    other = "layer" if wd_lr == "group" else "group"
    _, want_other, _, _ = run_both(3, ref_kwargs=dict(wd=0.5, wd_lr=other))
    assert not torch.allclose(got[-1]["h2"]["W"].double(), want_other[-1]["h2"]["W"], atol=1e-5)


def test_ratio_anchor_min_gives_the_noisiest_layer_the_scheduled_rate():
    got, want, _, _ = run_both(3, opt_kwargs=dict(ratio_anchor="min"), ref_kwargs=dict(anchor="min"))
    assert_trace_equal(got, want)
    f = factors_of(got[-1])
    assert f["h2"] == pytest.approx(1.0) and f["h1"] > 1.05
    assert f["head"] == pytest.approx(1.0) and f["emb"] > 1.05
    assert f["g2"] == pytest.approx(1.0) and f["g1"] > 1.05


def test_delay_lr_factor_uses_the_previous_steps_factors():
    got, want, opt, _ = run_both(4, opt_kwargs=dict(delay_lr_factor=True), ref_kwargs=dict(delay=True))
    assert_trace_equal(got, want)
    # step 2 still moved at factor 1 (step 1's), while the non-delayed run used step 2's factors
    eager = run_both(4)[0]
    assert not torch.allclose(got[1]["h2"]["W"], eager[1]["h2"]["W"], atol=1e-5)
    # the stored factors are the fresh ones in both runs
    assert got[1]["h2"]["f"] == pytest.approx(eager[1]["h2"]["f"])


def test_delay_lr_factor_with_k3_applies_estimation_factors_from_the_next_step():
    got, want, _, _ = run_both(7, k=3, opt_kwargs=dict(delay_lr_factor=True), ref_kwargs=dict(delay=True))
    assert_trace_equal(got, want)


def test_scion_noise_adaptive_false_is_the_fixed_rate_update():
    got, want, opt, params = run_both(4, opt_kwargs=dict(noise_adaptive=False), ref_kwargs=dict(adaptive=False))
    assert_trace_equal(got, want)
    for p in params.values():
        st = opt.state[p]
        assert float(st["H"]) == 0.0 and float(st["lr_factor"]) == 1.0 and "prev_grad" not in st
    assert not opt.needs_two_half_batches()
    adaptive = run_both(4)[0]
    assert not torch.allclose(got[-1]["g2"]["W"], adaptive[-1]["g2"]["W"], atol=1e-5)


def test_zero_noise_gives_all_factors_one_and_equals_scion_exactly():
    lanton, _, _, _ = run_both(4, k=1, constant=True)
    scion, _, _, _ = run_both(4, k=1, constant=True, opt_kwargs=dict(noise_adaptive=False))
    for a, b in zip(lanton, scion):
        for n in SPECS:
            assert a[n]["H"] == 0.0 and a[n]["f"] == 1.0
            assert torch.equal(a[n]["W"], b[n]["W"]), n


def test_lambdalr_scheduler_rate_is_read_every_step():
    params = make_params()
    w0 = {n: p.detach().clone() for n, p in params.items()}
    grads = grad_stream(4)
    opt = LANTON(make_groups(params), weight_decay=0.1, estimate_every=1, nuclear_estimator="exact")
    mult = lambda s: 1.0 / (1 + s)  # noqa: E731  (LambdaLR's 0-based epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, mult)
    got = drive(opt, params, grads, sched=sched)
    want = spec_reference(w0, SPECS, HP, grads, lr_mult=lambda t: mult(t - 1))
    assert_trace_equal(got, want)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    const = spec_reference(w0, SPECS, HP, grads)
    assert not torch.allclose(got[-1]["h1"]["W"].double(), const[-1]["h1"]["W"], atol=1e-4)


def test_nonexact_nuclear_estimator_tracks_the_exact_one():
    ns, _, _, _ = run_both(3, opt_kwargs=dict(nuclear_estimator="ns"))
    ex, _, _, _ = run_both(3, opt_kwargs=dict(nuclear_estimator="exact"))
    for n in ("h1", "h2"):
        assert ns[-1][n]["H"] == pytest.approx(ex[-1][n]["H"], rel=1e-4)


def test_parameters_without_gradient_are_left_alone():
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=1)
    before = params["g1"].detach().clone()
    for t, G in enumerate(grad_stream(2), 1):
        for n, p in params.items():
            p.grad = None if n == "g1" else G[n].clone()
        opt.step()
    assert torch.equal(params["g1"].detach(), before)
    assert params["g1"] not in opt.state
    assert "momentum_buffer" in opt.state[params["g2"]]


def test_step_with_closure_returns_the_loss():
    lin = nn.Linear(3, 2, bias=False)
    opt = LANTON([dict(params=[lin.weight], specs=[ParamSpec("w", HIDDEN, (2, 3))])], lr=0.1)
    x = torch.ones(4, 3)
    before = lin.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and float(loss.detach()) > 0
    assert not torch.equal(lin.weight.detach(), before)


# =========================================================================== fused parameters
def test_fused_qkv_parameter_trains_exactly_like_separate_q_k_v():
    d_in = 5
    blocks = qkv_blocks("qkv", num_heads=4, num_kv_heads=2, head_dim=1, interleaved=True)  # q 4, k 2, v 2 rows
    fused_spec = ParamSpec("qkv", HIDDEN, (8, d_in), blocks=blocks)
    other = ParamSpec("o", HIDDEN, (d_in, 4))
    gen = torch.Generator().manual_seed(5)
    w_qkv, w_o = torch.randn(8, d_in, generator=gen), torch.randn(d_in, 4, generator=gen)
    grads = [(torch.randn(8, d_in, generator=gen) * torch.linspace(0.2, 2, 8)[:, None], torch.randn(d_in, 4, generator=gen))
             for _ in range(4)]

    fq, fo = nn.Parameter(w_qkv.clone()), nn.Parameter(w_o.clone())
    fused = LANTON([dict(params=[fq, fo], specs=[fused_spec, other])], lr=0.1, weight_decay=0.1, estimate_every=1)
    parts = {b.name: nn.Parameter(b.gather(w_qkv).clone()) for b in blocks}
    so = nn.Parameter(w_o.clone())
    sep_specs = [ParamSpec(b.name, HIDDEN, (b.d_out, d_in)) for b in blocks]
    separate = LANTON([dict(params=[*parts.values(), so], specs=[*sep_specs, other])], lr=0.1, weight_decay=0.1, estimate_every=1)

    for g_qkv, g_o in grads:
        fq.grad, fo.grad = g_qkv.clone(), g_o.clone()
        for b in blocks:
            parts[b.name].grad = b.gather(g_qkv).clone()
        so.grad = g_o.clone()
        fused.step()
        separate.step()
    h_sep = torch.cat([separate.state[parts[b.name]]["H"] for b in blocks])
    f_sep = torch.cat([separate.state[parts[b.name]]["lr_factor"] for b in blocks])
    assert torch.allclose(fused.state[fq]["H"], h_sep, rtol=1e-5)
    assert torch.allclose(fused.state[fq]["lr_factor"], f_sep, rtol=1e-5)
    assert f_sep.min() < 0.99  # the blocks really get different rates
    for b in blocks:
        assert torch.allclose(b.gather(fq.detach()), parts[b.name].detach(), atol=1e-5), b.name
    assert torch.allclose(fo.detach(), so.detach(), atol=1e-5)


def test_layer_diagnostics_has_one_row_per_logical_block_with_lr_equal_group_lr_times_factor():
    d_in = 4
    blocks = qkv_blocks("attn.qkv", num_heads=2, num_kv_heads=1, head_dim=2, interleaved=True)
    specs = [ParamSpec("attn.qkv", HIDDEN, (8, d_in), blocks=blocks), ParamSpec("mlp", HIDDEN, (6, d_in)),
             ParamSpec("norm", VECTOR, (d_in,)), ParamSpec("bias", VECTOR, (d_in,))]
    params = [nn.Parameter(torch.zeros(s.shape)) for s in specs]
    opt = LANTON([dict(params=params[:2], specs=specs[:2], lr=0.1, alpha=1.0),
                  dict(params=params[2:], specs=specs[2:], lr=0.01, alpha=0.3)], estimate_every=1)
    assert opt.layer_diagnostics() == []  # no state yet
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, s in zip(params, specs):
            p.grad = torch.randn(s.shape, generator=gen) * (3.0 if s.name in ("mlp", "bias") else 0.3)
        opt.step()
    rows = opt.layer_diagnostics()
    assert [r["name"] for r in rows] == ["attn.qkv:q", "attn.qkv:k", "attn.qkv:v", "mlp", "norm", "bias"]
    assert [r["geometry"] for r in rows] == ["hidden"] * 4 + ["vector"] * 2
    group_lr = [0.1] * 4 + [0.01] * 2
    group_alpha = [1.0] * 4 + [0.3] * 2
    factors = torch.cat([opt.state[p]["lr_factor"] for p in params])
    hs = torch.cat([opt.state[p]["H"] for p in params])
    for r, lr, a, f, h in zip(rows, group_lr, group_alpha, factors.tolist(), hs.tolist()):
        assert r["lr_factor"] == pytest.approx(f) and r["lr"] == pytest.approx(lr * f)
        assert r["H"] == pytest.approx(h) and r["alpha"] == pytest.approx(a / math.sqrt(a * a + h))
    assert min(r["lr_factor"] for r in rows[:4]) < 0.99 and max(r["lr_factor"] for r in rows[:4]) == pytest.approx(1.0)


# =========================================================================== checkpointing
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


def _tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    cfg = OptimConfig()
    opt = LANTON(param_groups(model, cfg), weight_decay=0.05, nesterov=True, estimate_every=2, option="I",
                 delay_lr_factor=True, nuclear_estimator="exact")
    return model, opt


def _tiny_step(model, opt, t):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randint(0, 11, (4, 6), generator=gen)
    y = torch.randint(0, 11, (4, 6), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()


def test_state_dict_round_trip_mid_training_continues_bit_identically():
    model, opt = _tiny_setup()
    for t in range(3):
        _tiny_step(model, opt, t)
    assert any("prev_grad" in s for s in opt.state.values())  # k = 2: G₃ is kept for step 4
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for t in range(3, 6):
        _tiny_step(model, opt, t)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2 = _tiny_setup(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.t == 3
    for t in range(3, 6):
        _tiny_step(model2, opt2, t)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), model2.parameters()):
        for key, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][key]), key


@pytest.mark.parametrize("option", ["I", "II"])
def test_state_dict_round_trip_with_bf16_params_keeps_fp32_noise_state_and_continues_bit_identically(option):
    """torch's load_state_dict casts floating state to the parameter dtype; H and the rate
    factors must stay fp32 (they are created fp32 for bf16 parameters)."""
    grads = [{n: g.bfloat16() for n, g in G.items()} for G in grad_stream(6)]
    halves = {t: tuple({n: g.bfloat16() for n, g in h.items()} for h in pair) for t, pair in half_stream(grad_stream(6)).items()}

    def fresh(seed):
        params = {n: nn.Parameter(p.detach().bfloat16()) for n, p in make_params(seed).items()}
        return params, LANTON(make_groups(params), weight_decay=0.1, estimate_every=2, option=option, nuclear_estimator="exact")

    params, opt = fresh(0)
    drive(opt, params, grads[:3], halves)
    sd = io.BytesIO()
    torch.save({"w": {n: p.detach() for n, p in params.items()}, "opt": opt.state_dict()}, sd)
    drive(opt, params, grads[3:], {t - 3: h for t, h in halves.items() if t > 3})
    sd.seek(0)
    ckpt = torch.load(sd, weights_only=False)
    params2, opt2 = fresh(9)
    with torch.no_grad():
        for n, p in params2.items():
            p.copy_(ckpt["w"][n])
    opt2.load_state_dict(ckpt["opt"])
    p0 = params2["h2"]
    assert opt2.state[p0]["H"].dtype == torch.float32 and opt2.state[p0]["lr_factor"].dtype == torch.float32
    assert float(opt2.state[p0]["H"]) > 0
    drive(opt2, params2, grads[3:], {t - 3: h for t, h in halves.items() if t > 3})
    for n in SPECS:
        assert torch.equal(params[n], params2[n]), n
        for key, v in opt.state[params[n]].items():
            assert torch.equal(v, opt2.state[params2[n]][key]), (n, key)


# =========================================================================== errors and skipped steps
def _one_group():
    p = nn.Parameter(torch.zeros(2, 2))
    return [dict(params=[p], specs=[ParamSpec("w", HIDDEN, (2, 2))])]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimate_every=0), "estimate_every"),
        (dict(estimate_every=-3), "estimate_every"),
        (dict(estimate_every=2.0), "estimate_every"),
        (dict(estimate_every="10"), "estimate_every"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(option="III"), "option"),
        (dict(ratio_anchor="mean"), "ratio_anchor"),
        (dict(wd_lr="both"), "wd_lr"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=-0.1), "beta2"),
        (dict(nuclear_estimator="svd"), "nuclear_estimator"),
    ],
)
def test_bad_hyper_parameters_raise_clear_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LANTON(_one_group(), **kwargs)


def test_group_level_alpha_must_be_positive():
    groups = _one_group()
    groups[0]["alpha"] = 0.0
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LANTON(groups)


def test_param_groups_without_specs_raise():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="specs"):
        LANTON(lin.parameters())
    with pytest.raises(ValueError, match="specs"):
        LANTON([dict(params=[lin.weight, lin.bias], specs=[ParamSpec("w", HIDDEN, (2, 2))])])


def test_spec_shape_must_match_parameter_shape():
    with pytest.raises(ValueError, match="shape"):
        LANTON([dict(params=[nn.Parameter(torch.zeros(2, 3))], specs=[ParamSpec("w", HIDDEN, (3, 2))])])


def _state_copy(opt, params):
    return ({n: p.detach().clone() for n, p in params.items()},
            {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()},
            [dict((k, v) for k, v in g.items() if k not in ("params", "specs")) for g in opt.param_groups])


def _assert_same_state(opt, params, snapshot):
    w, st, groups = snapshot
    for n, p in params.items():
        assert torch.equal(p.detach(), w[n]), n
        assert set(opt.state[p]) == set(st[n]), n
        for k, v in st[n].items():
            assert torch.equal(opt.state[p][k], v), (n, k)
    assert [dict((k, v) for k, v in g.items() if k not in ("params", "specs")) for g in opt.param_groups] == groups


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_step_and_touches_nothing(bad):
    params = make_params()
    opt = LANTON(make_groups(params), weight_decay=0.1, estimate_every=2, option="I")
    grads = grad_stream(4)
    drive(opt, params, grads[:3])
    snapshot = _state_copy(opt, params)
    poisoned = {n: g.clone() for n, g in grads[3].items()}
    poisoned["g2"][1] = bad
    for n, p in params.items():
        p.grad = poisoned[n]
    opt.step()
    assert opt.skipped_steps == 1 and opt.t == 3
    _assert_same_state(opt, params, snapshot)
    # and training goes on exactly as if the bad batch had never been seen
    clean_params = make_params()
    clean = LANTON(make_groups(clean_params), weight_decay=0.1, estimate_every=2, option="I")
    drive(clean, clean_params, grads)
    drive(opt, params, grads[3:])
    for n in SPECS:
        assert torch.equal(params[n].detach(), clean_params[n].detach()), n


def test_option_II_estimation_step_without_stash_raises_and_changes_nothing():
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=2, option="II")
    grads = grad_stream(2)
    drive(opt, params, grads[:1])
    assert opt.needs_two_half_batches()
    snapshot = _state_copy(opt, params)
    for n, p in params.items():
        p.grad = grads[1][n].clone()
    with pytest.raises(RuntimeError, match="stash_half_gradient"):
        opt.step()
    _assert_same_state(opt, params, snapshot)
    assert opt.t == 1


def test_option_II_asks_for_two_half_batches_exactly_on_estimation_steps():
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=3, option="II")
    asked = []
    grads = grad_stream(6)
    halves = half_stream(grads)
    for t in range(1, 7):
        asked.append(opt.needs_two_half_batches())
        drive(opt, params, [grads[t - 1]], {1: halves[t]})
    assert asked == [False, False, True, False, False, True]


def test_state_after_training_holds_only_documented_tensors():
    got, _, opt, params = run_both(2, option="I", k=1)
    for p in params.values():
        st = opt.state[p]
        assert set(st) <= {"momentum_buffer", "H", "lr_factor", "prev_grad", "estimated", "n_estimates"}
        assert st["estimated"].dtype == torch.bool
        assert st["n_estimates"].dtype == torch.float32 and st["n_estimates"].tolist() == [1.0]
        assert st["H"].dtype == torch.float32 and st["H"].shape == (1,)


# =========================================================================== parameters that miss a step
def _drive_missing(opt, params, grads, missing):
    """Step with ``grads``, leaving ``p.grad`` None for the (step, name) pairs in ``missing``."""
    for t, G in enumerate(grads, 1):
        for n, p in params.items():
            p.grad = None if (t, n) in missing else G[n].clone()
        opt.step()


def test_option_I_never_compares_with_a_gradient_older_than_the_previous_step():
    """k = 1, h1 misses step 2: at step 3 its H is NOT updated (G₃ − G₁ would mix two steps);
    at step 4 it is, from G₄ − G₃. Until then it has no estimate and runs at factor 1."""
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=1, nuclear_estimator="exact")
    grads = grad_stream(4)
    _drive_missing(opt, params, grads[:3], {(2, "h1")})
    st = opt.state[params["h1"]]
    assert float(st["H"][0]) == 0.0 and not bool(st["estimated"][0]) and float(st["lr_factor"][0]) == 1.0
    assert bool(opt.state[params["h2"]]["estimated"][0])
    prev = grads[2]["h1"]
    _drive_missing(opt, params, grads[3:], set())
    d = grads[3]["h1"] - prev
    want = 0.1 * (torch.linalg.svdvals(d).sum().item() * math.sqrt(2 / 2)) ** 2  # (1 − β₂)·‖D‖², d_out = d_in
    assert float(st["H"][0]) == pytest.approx(want, rel=1e-5) and bool(st["estimated"][0])


def test_an_unestimated_layer_runs_at_factor_one_and_does_not_pin_its_groups_anchor():
    alphas = torch.tensor([0.5, 0.8, 1.0, 0.3])
    gids = torch.tensor([0, 0, 0, 1])
    est = torch.tensor([True, True, False, False])
    assert noise.lr_factors(alphas, gids, "max", est).tolist() == pytest.approx([math.sqrt(0.5 / 0.8), 1, 1, 1])
    assert noise.lr_factors(alphas, gids, "min", est).tolist() == pytest.approx([1, math.sqrt(0.8 / 0.5), 1, 1])
    # In the optimizer: h1 gets a gradient on odd steps only, so it is never estimated (k = 1);
    # h2 is the only estimated hidden layer, hence its own anchor: factor 1, not √(α_h2 / 1).
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=1, nuclear_estimator="exact")
    _drive_missing(opt, params, grad_stream(5), {(t, "h1") for t in (2, 4)})
    h1, h2 = opt.state[params["h1"]], opt.state[params["h2"]]
    assert not bool(h1["estimated"][0]) and float(h1["H"][0]) == 0.0
    assert float(h2["H"][0]) > 0 and float(h2["lr_factor"][0]) == pytest.approx(1.0)


def test_lr_factors_reads_nothing_back_to_the_host():
    """Meta tensors hold no values, so any .item() / bool() on them raises."""
    a = torch.rand(5, device="meta")
    g = torch.zeros(5, dtype=torch.long, device="meta")
    assert noise.lr_factors(a, g, "max", torch.ones(5, dtype=torch.bool, device="meta")).shape == (5,)
    assert noise.lr_factors(a, g, "min").shape == (5,)


def test_estimated_mask_survives_state_dict_and_old_checkpoints_fall_back_to_H_positive():
    params = make_params()
    opt = LANTON(make_groups(params), estimate_every=1, nuclear_estimator="exact")
    _drive_missing(opt, params, grad_stream(3), {(2, "h1")})
    sd = opt.state_dict()
    fresh = LANTON(make_groups(make_params()), estimate_every=1, nuclear_estimator="exact")
    fresh.load_state_dict(sd)
    for (n, p), q in zip(params.items(), [p for g in fresh.param_groups for p in g["params"]]):
        got = fresh.state[q]["estimated"]
        assert got.dtype == torch.bool and torch.equal(got, opt.state[p]["estimated"]), n
    for st in sd["state"].values():
        st.pop("estimated")
    old = LANTON(make_groups(make_params()), estimate_every=1, nuclear_estimator="exact")
    old.load_state_dict(sd)
    for q in [p for g in old.param_groups for p in g["params"]]:
        assert torch.equal(old.state[q]["estimated"], old.state[q]["H"] > 0)
