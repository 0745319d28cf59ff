"""Specification of the baselines: D-Muon (Moonlight), the AdamW kernel, and the factory.

D-Muon (spec "Baselines"): hidden matrices use sum momentum M ← μM + G with the Nesterov
direction G + μM, Newton–Schulz, Moonlight's scale 0.2·√max(d_out, d_in), and decoupled
weight decay with the *unadjusted* rate: W ← W(1 − ηλ) − η·0.2√max·NS(·). Embedding, head and
vectors use AdamW (0.9, 0.95) at their group's own rate. Expected values are written here
from those formulas (Newton–Schulz by hand, AdamW = ``torch.optim.AdamW``).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lanton_dist.adamw import adamw_step_
from lanton_dist.config import GroupValues, OptimConfig
from lanton_dist.dmuon import DMuon
from lanton_dist.factory import OPTIMIZERS, build_optimizer, param_groups
from lanton_dist.groups import Geometry, ParamSpec
from lanton_dist.lanton import LANTON

HIDDEN, EMBED_HEAD, VECTOR = Geometry.HIDDEN, Geometry.EMBED_HEAD, Geometry.VECTOR


def ns5(b: torch.Tensor) -> torch.Tensor:
    """Moonlight's zeropower_via_newtonschulz5 (fp64 here): transpose if tall, X/‖X‖, 5 quintic steps."""
    tall = b.shape[0] > b.shape[1]
    x = (b.T if tall else b).double()
    x = x / (x.norm() + 1e-7)
    a_, b_, c_ = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        a = x @ x.T
        x = a_ * x + (b_ * a + c_ * a @ a) @ x
    return x.T if tall else x


LAYOUT = [("w1", HIDDEN, (4, 6), ""), ("w2", HIDDEN, (6, 4), ""), ("emb", EMBED_HEAD, (5, 4), "embed"),
          ("head", EMBED_HEAD, (5, 4), "head"), ("g", VECTOR, (4,), "")]
SPECS = {n: ParamSpec(n, geo, shape, role) for n, geo, shape, role in LAYOUT}
LR = {HIDDEN: 0.02, EMBED_HEAD: 0.003, VECTOR: 0.001}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: nn.Parameter(torch.randn(*s.shape, generator=gen)) for n, s in SPECS.items()}


def _groups(params):
    return [dict(params=[params[n] for n in SPECS if SPECS[n].geometry is geo],
                 specs=[SPECS[n] for n in SPECS if SPECS[n].geometry is geo], lr=LR[geo])
            for geo in (HIDDEN, EMBED_HEAD, VECTOR)]


def _grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(*s.shape, generator=gen) for n, s in SPECS.items()} for _ in range(steps)]


# --------------------------------------------------------------------------- D-Muon
@pytest.mark.parametrize("nesterov", [True, False])
def test_dmuon_equals_hand_written_moonlight_update(nesterov):
    mu, wd, steps = 0.95, 0.1, 4
    params = _params()
    w0 = {n: p.detach().clone() for n, p in params.items()}
    opt = DMuon(_groups(params), weight_decay=wd, momentum=mu, nesterov=nesterov)
    grads = _grads(steps)

    # hand reference: hidden by the formulas above, the rest by torch.optim.AdamW
    W = {n: w0[n].double() for n in ("w1", "w2")}
    M = {n: torch.zeros_like(W[n]) for n in W}
    adam_params = {n: nn.Parameter(w0[n].clone()) for n in ("emb", "head", "g")}
    adam = torch.optim.AdamW([dict(params=[adam_params[n]], lr=LR[SPECS[n].geometry]) for n in adam_params],
                             betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=False)
    for G in grads:
        for n, p in params.items():
            p.grad = G[n].clone()
        opt.step()
        for n in W:
            g = G[n].double()
            M[n] = mu * M[n] + g
            u = g + mu * M[n] if nesterov else M[n]
            scale = 0.2 * math.sqrt(max(SPECS[n].shape))
            W[n] = W[n] * (1 - LR[HIDDEN] * wd) - LR[HIDDEN] * scale * ns5(u)
        for n, p in adam_params.items():
            p.grad = G[n].clone()
        adam.step()
        for n in W:
            assert torch.allclose(params[n].detach().double(), W[n], atol=1e-5), n
            assert torch.allclose(opt.state[params[n]]["momentum_buffer"].double(), M[n], atol=1e-5), n
        for n, p in adam_params.items():
            assert torch.allclose(params[n].detach(), p.detach(), rtol=1e-6, atol=1e-7), n


def test_dmuon_weight_decay_uses_the_unadjusted_rate():
    """With a zero gradient the NS direction is 0, so one step is pure decay W·(1 − ηλ)."""
    p = nn.Parameter(torch.randn(4, 6))
    w0 = p.detach().clone()
    opt = DMuon([dict(params=[p], specs=[SPECS["w1"]], lr=0.5)], weight_decay=0.2)
    p.grad = torch.zeros(4, 6)
    opt.step()
    assert torch.allclose(p.detach(), w0 * (1 - 0.5 * 0.2), atol=1e-7)


def test_dmuon_hidden_update_has_moonlight_rms_not_spectral_scale():
    p = nn.Parameter(torch.zeros(6, 24))
    opt = DMuon([dict(params=[p], specs=[ParamSpec("w", HIDDEN, (6, 24))], lr=1.0)], momentum=0.0, nesterov=False)
    p.grad = torch.randn(6, 24, generator=torch.Generator().manual_seed(3))
    opt.step()
    s = torch.linalg.svdvals(p.detach().double())
    scale = 0.2 * math.sqrt(24)
    assert (s / scale).min() >= 0.6 and (s / scale).max() <= 1.25  # Muon band times 0.2·√max


def test_dmuon_adam_state_and_steps_count_from_one():
    params = _params()
    opt = DMuon(_groups(params))
    for G in _grads(2):
        for n, p in params.items():
            p.grad = G[n].clone()
        opt.step()
    assert all(g["step"] == 2 for g in opt.param_groups)
    assert set(opt.state[params["emb"]]) == {"exp_avg", "exp_avg_sq", "step"} and opt.state[params["emb"]]["step"] == 2
    assert set(opt.state[params["w1"]]) == {"momentum_buffer"}


def test_dmuon_skips_nonfinite_steps_and_touches_nothing():
    params = _params()
    opt = DMuon(_groups(params), weight_decay=0.1)
    grads = _grads(2)
    for n, p in params.items():
        p.grad = grads[0][n].clone()
    opt.step()
    before = {n: p.detach().clone() for n, p in params.items()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads[1][n].clone()
    params["head"].grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and all(g["step"] == 1 for g in opt.param_groups)
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n])
        for k, v in state[n].items():
            assert torch.equal(opt.state[p][k], v)


def test_dmuon_requires_specs():
    with pytest.raises(ValueError, match="specs"):
        DMuon(nn.Linear(2, 2).parameters())


def test_dmuon_skips_a_parameter_without_gradient_exactly_as_torch_adamw():
    """emb misses step 2: no decay, no update, and its bias correction counts its own 2 steps."""
    params = _params()
    opt = DMuon(_groups(params), weight_decay=0.1)
    twin = nn.Parameter(params["emb"].detach().clone())
    ref = torch.optim.AdamW([twin], lr=LR[EMBED_HEAD], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for t, G in enumerate(_grads(3), 1):
        for n, p in params.items():
            p.grad = None if (n == "emb" and t == 2) else G[n].clone()
        twin.grad = params["emb"].grad
        opt.step()
        ref.step()
        assert torch.equal(params["emb"].detach(), twin.detach()), t
    assert opt.state[params["emb"]]["step"] == 2


# --------------------------------------------------------------------------- AdamW kernel
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_kernel_equals_torch_adamw_over_several_steps(wd, foreach):
    """Bit-identical to the single-tensor path (as documented); tight tolerance against foreach."""
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(7, 5, generator=gen)
    grads = [torch.randn(7, 5, generator=gen) * (1 + t) for t in range(6)]
    ref = nn.Parameter(w0.clone())
    torch_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=foreach)
    p, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for step, g in enumerate(grads, 1):
        ref.grad = g.clone()
        torch_opt.step()
        adamw_step_(p, g, m, v, step, 3e-3, (0.9, 0.95), 1e-8, wd)
        st = torch_opt.state[ref]
        if not foreach:
            assert torch.equal(p, ref.detach()) and torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"]), step
        assert torch.allclose(p, ref.detach(), rtol=1e-6, atol=1e-8), step
        assert torch.allclose(m, st["exp_avg"], rtol=1e-6, atol=1e-9)
        assert torch.allclose(v, st["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(p, w0, atol=1e-3)  # it moved


def test_adamw_kernel_is_elementwise_so_shards_equal_the_whole():
    gen = torch.Generator().manual_seed(5)
    w0, g = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    whole = [w0.clone(), torch.zeros(8, 3), torch.zeros(8, 3)]
    adamw_step_(*whole[:1], g, *whole[1:], 1, 1e-2, (0.9, 0.95), 1e-8, 0.1)
    shards = [[w0[a:b].clone(), torch.zeros(b - a, 3), torch.zeros(b - a, 3)] for a, b in ((0, 3), (3, 8))]
    for (a, b), s in zip(((0, 3), (3, 8)), shards):
        adamw_step_(s[0], g[a:b], s[1], s[2], 1, 1e-2, (0.9, 0.95), 1e-8, 0.1)
    assert torch.equal(torch.cat([s[0] for s in shards]), whole[0])


# --------------------------------------------------------------------------- factory
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.up = nn.Linear(8, 12, bias=False)
        self.down = nn.Linear(12, 8, bias=True)
        self.norm = nn.RMSNorm(8)
        self.lm_head = nn.Linear(8, 13, bias=False)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


def _cfg(name, **kw):
    return OptimConfig(name=name, lr=GroupValues(hidden=0.02, embed_head=0.004, vector=0.001),
                       alpha=GroupValues(hidden=1.0, embed_head=0.5, vector=2.0), weight_decay=0.05, **kw)


def test_param_groups_one_group_per_geometry_with_its_rate_and_alpha():
    model = Tiny()
    groups = param_groups(model, _cfg("lanton"))
    assert [g["geometry"] for g in groups] == ["hidden", "embed_head", "vector"]
    assert [g["names"] for g in groups] == [["up.weight", "down.weight"], ["emb.weight", "lm_head.weight"],
                                            ["down.bias", "norm.weight"]]
    assert [g["lr"] for g in groups] == [0.02, 0.004, 0.001]
    assert [g["alpha"] for g in groups] == [1.0, 0.5, 2.0]
    for g in groups:
        assert [s.name for s in g["specs"]] == g["names"]
        assert all(p is dict(model.named_parameters())[n] for p, n in zip(g["params"], g["names"]))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizer_builds_each_baseline_and_it_trains(name):
    torch.manual_seed(0)
    model = Tiny()
    cfg = _cfg(name, estimate_every=2, option="I", ratio_anchor="min", ns_steps=4, momentum=0.9, scale_mode="spectral")
    opt = build_optimizer(model, cfg)
    expected_type = {"lanton": LANTON, "scion": LANTON, "dmuon": DMuon, "adamw": torch.optim.AdamW}[name]
    assert type(opt) is expected_type
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.004, 0.001]
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    if name in ("lanton", "scion"):
        assert opt.noise_adaptive is (name == "lanton")
        assert (opt.estimate_every, opt.option, opt.ratio_anchor, opt.lmo.ns_steps) == (2, "I", "min", 4)
    if name == "dmuon":
        assert opt.lmo.scale_mode == "moonlight" and opt.lmo.ns_steps == 4
        assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    if name == "adamw":
        assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    x = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), n
    assert losses[-1] < losses[0]


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(Tiny(), _cfg("sgd"))
