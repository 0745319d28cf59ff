"""LANTON, the single-process reference optimizer (Algorithm 1 of arXiv 2510.14009).

Per logical layer ℓ (a :class:`~lanton_dist.groups.Block`), at step t = 1, 2, …::

    B  ← β₁·B + (1−β₁)·G                         EMA momentum (Nesterov: lmo(β₁B + (1−β₁)G))
    O  = lmo_g(B)                                 spectral / sign / RMS (``lanton_dist.lmo``)
    if t mod k == 0:  H ← β₂·H + (1−β₂)·‖G − G̃‖_*²     (Option I: G̃ = G_{t−1};
                                                         Option II: second half-batch gradient)
    α^ℓ = α/√(α² + H),   η^ℓ = η·√(α^ℓ/α^m)        m = max-α layer of the group (``ratio_anchor``)
    W  ← W·(1 − η·λ) + η^ℓ·O                      decoupled weight decay (``wd_lr``)

The update is Scion's (Pethick et al. 2025) plus the noise-adaptive rate;
``noise_adaptive=False`` is the Scion ablation (fixed rate within each group, no estimation
work). Points the spec marks [verify] — the paper's full text could not be read — are named
options, with the spec's reading as default: momentum form (EMA, ``nesterov=False``),
``ratio_anchor='max'``, ``wd_lr='group'`` (η_t multiplies λ), ``sign_scale='scion'``
(head sign scaled by 1/d_in). β₂'s value is not given in any readable source; 0.9 per
estimation is ours. Where the paper is silent: ``alpha_mode`` (``fixed`` | ``auto``: each
geometry group's α from its own first estimate) and ``bias_correction`` (H/(1 − β₂ⁿ)), per
group; their rule is :func:`lanton_dist.noise.rate_factors`, shared with the sharded core.
Each layer's dual norm is the dual of its LMO's norm, scale included
(:func:`lanton_dist.lmo.pair_scale`).

``delay_lr_factor=True`` makes step t use the rate factors computed at step t−1 — exactly
what the sharded engine and adapters do when they overlap the variance reduction with the
next step — so the reference can be compared with them bit for bit.

A parameter without ``.grad`` is skipped for the step, as torch's optimizers do (no momentum
decay, no weight decay, no update, no tracker update); Option I never compares with a gradient
older than t−1 (a parameter that missed step t−1 keeps its H at t), and the group anchor runs
only over layers with a noise estimate (state ``estimated``): unestimated layers run at factor 1.

Parameters come in torch param groups whose ``"specs"`` list (parallel to ``"params"``)
holds each parameter's :class:`~lanton_dist.groups.ParamSpec`; build them with
:func:`lanton_dist.factory.param_groups`. Non-finite gradients skip the whole step
(``skipped_steps`` counts them, and is saved in ``state_dict``) and leave every state
untouched; a stashed Option II half-gradient is discarded with the skipped batch.

``clip_grad_norm`` c > 0 clips the step's gradient G to global L2 norm c before the momentum
reads it, as ``torch.nn.utils.clip_grad_norm_``: G ← min(1, c/(‖G‖₂ + 1e-6))·G, ‖G‖₂ over every
parameter with a gradient (Option II: G = g_A + g_B, and D is scaled by the same factor; the
Option I stored gradient is the clipped G). ``p.grad`` itself is left as it was. A non-finite
‖G‖₂ skips the step. The rule, shared by every optimizer, is :mod:`lanton_dist.clipping`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lanton_dist import clipping, noise
from lanton_dist import lmo as lmo_mod
from lanton_dist.groups import Geometry, ParamSpec, block_scale
from lanton_dist.lmo import LMOConfig
from lanton_dist.names import ALPHA_MODES, OPTIONS
from lanton_dist.nuclear import resolve_estimator


_EXACT_STATE = ("H", "lr_factor", "estimated", "n_estimates")  # state that must not take the parameter's dtype


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """The loss of ``closure`` re-evaluated with gradients enabled (torch's ``step(closure)``
    convention; ``step`` itself runs under ``no_grad``), or ``None`` without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_param_groups(groups: list[dict[str, Any]]) -> None:
    """Every group must carry a ``specs`` list matching its params' shapes."""
    for g in groups:
        specs = g.get("specs")
        if specs is None or len(specs) != len(g["params"]):
            raise ValueError(
                "each param group needs a 'specs' list of ParamSpec parallel to 'params'; "
                "build the groups with lanton_dist.param_groups(model, ...)"
            )
        for p, spec in zip(g["params"], specs):
            if tuple(p.shape) != spec.shape:
                raise ValueError(f"{spec.name}: parameter shape {tuple(p.shape)} != spec shape {spec.shape}")


class LANTON(Optimizer):
    """Reference LANTON / Scion. Hyper-parameters below are per-group defaults.

    Args:
        lr: scheduled rate η_t of the group (schedulers change ``group['lr']``).
        weight_decay: λ. beta1: momentum β₁. beta2: tracker β₂ (per estimation).
        alpha: noise floor α of α^ℓ = α/√(α²+H). nesterov: Nesterov momentum.
        alpha_mode: ``"fixed"`` (α as given) | ``"auto"`` (:mod:`lanton_dist.noise`).
        bias_correction: the factors read H/(1 − β₂ⁿ), n the layer's estimates.
        estimate_every: k ≥ 1. option: ``"I"`` or ``"II"``. noise_adaptive: False → Scion.
        ratio_anchor: ``"max"`` | ``"min"``. delay_lr_factor: see module doc.
        nuclear_estimator: ``auto`` | ``exact`` | ``ns`` | ``rsvd``.
        wd_lr: ``"group"`` (W·(1−η_t λ)) or ``"layer"`` (W·(1−η^ℓ λ)).
        lmo: :class:`~lanton_dist.lmo.LMOConfig`. skip_nonfinite: skip steps with NaN/Inf grads.
        clip_grad_norm: global gradient-norm clipping threshold (0: off; see module doc).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.9,
        alpha: float = 1.0,
        nesterov: bool = False,
        alpha_mode: str = "fixed",
        bias_correction: bool = False,
        *,
        estimate_every: int = 10,
        option: str = "I",
        noise_adaptive: bool = True,
        ratio_anchor: str = "max",
        delay_lr_factor: bool = False,
        nuclear_estimator: str = "auto",
        wd_lr: str = "group",
        lmo: LMOConfig | None = None,
        skip_nonfinite: bool = True,
        clip_grad_norm: float = 0.0,
    ) -> None:
        if isinstance(estimate_every, bool) or not isinstance(estimate_every, int) or estimate_every < 1:
            raise ValueError(f"estimate_every must be an integer >= 1, got {estimate_every!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if option not in OPTIONS:
            raise ValueError(f"option must be 'I' or 'II', got {option!r}")
        if ratio_anchor not in noise.ANCHORS:
            raise ValueError(f"ratio_anchor must be one of {noise.ANCHORS}, got {ratio_anchor!r}")
        if wd_lr not in ("group", "layer"):
            raise ValueError(f"wd_lr must be 'group' or 'layer', got {wd_lr!r}")
        for name, v in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        resolve_estimator(nuclear_estimator, torch.device("cpu"))  # validates the name
        defaults = dict(lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, alpha=alpha, nesterov=nesterov,
                        alpha_mode=alpha_mode, bias_correction=bool(bias_correction), step=0)
        super().__init__(params, defaults)
        self.estimate_every = estimate_every
        self.option = option
        self.noise_adaptive = noise_adaptive
        self.ratio_anchor = ratio_anchor
        self.delay_lr_factor = delay_lr_factor
        self.nuclear_estimator = nuclear_estimator
        self.wd_lr = wd_lr
        self.lmo = lmo or LMOConfig()
        self.skip_nonfinite = skip_nonfinite
        self.clip_grad_norm = clipping.check_max_norm(clip_grad_norm)
        self.skipped_steps = 0
        #: ``(N_GROUPS,)`` auto α of each geometry group (NaN: not set yet); None before the first estimate
        self.alpha_auto: torch.Tensor | None = None
        self._stashed = False  # stash_half_gradient() ran since the last step
        #: Global L2 norm of the gradient the last step used when it combined two half-batch
        #: gradients (Option II estimation step; pre-clip, a device tensor), else None: ``p.grad``
        #: then holds only the second half, so this is what a log line can report.
        self.combined_grad_norm: torch.Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus the checks every group needs (``specs``, α > 0), also for groups added later."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_param_groups([group])
        if not group["alpha"] > 0:
            raise ValueError(f"alpha must be > 0, got {group['alpha']}")
        if group["alpha_mode"] not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {group['alpha_mode']!r}")

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        sd["alpha_auto"] = None if self.alpha_auto is None else self.alpha_auto.clone()
        return sd

    # ------------------------------------------------------------------ helpers
    @property
    def t(self) -> int:
        """Number of steps taken (skipped steps excluded)."""
        return int(self.param_groups[0]["step"])

    def needs_two_half_batches(self) -> bool:
        """True when the coming step estimates with Option II: call
        :meth:`stash_half_gradient` between the two half-batch backward passes."""
        return self.noise_adaptive and self.option == "II" and noise.is_estimation_step(self.t + 1, self.estimate_every)

    @torch.no_grad()
    def stash_half_gradient(self) -> None:
        """Option II: keep the first half-batch's gradient and clear ``p.grad``.

        Weight each half's loss by 1/2: the step then uses G = g_A + g_B (the full-batch
        mean) and D = 2(g_A − g_B) = ∇_A − ∇_B for the tracker. A parameter with a gradient in
        one half only counts the other half as zeros; one with neither is skipped (the rule of
        every sharded backend).
        """
        self._stashed = True
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.state[p]["half_grad"] = p.grad.detach().clone()
                    p.grad = None

    def _entries(self):
        for g in self.param_groups:
            for p, spec in zip(g["params"], g["specs"]):
                yield g, p, spec

    def _init_state(self, p: torch.Tensor, spec: ParamSpec) -> dict[str, torch.Tensor]:
        st = self.state[p]
        if "momentum_buffer" not in st:
            n = len(spec.blocks)
            st["momentum_buffer"] = torch.zeros_like(p)
            acc = torch.promote_types(p.dtype, torch.float32)
            st["H"] = torch.zeros(n, dtype=acc, device=p.device)
            st["lr_factor"] = torch.ones(n, dtype=acc, device=p.device)
            st["estimated"] = torch.zeros(n, dtype=torch.bool, device=p.device)
            st["n_estimates"] = torch.zeros(n, dtype=acc, device=p.device)
        return st

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        live = []
        stashed, self._stashed = self._stashed, False
        for g, p, spec in self._entries():
            half = self.state[p].pop("half_grad", None) if p in self.state else None
            if p.grad is None and half is None:
                continue
            if not stashed:
                live.append((g, p, spec, p.grad, None))
                continue
            first = half if half is not None else torch.zeros_like(p.grad)   # a missing half counts as zeros
            second = p.grad if p.grad is not None else torch.zeros_like(half)
            live.append((g, p, spec, first + second, 2.0 * (first - second)))
        sq = None
        combined = any(x[4] is not None for x in live)
        if (self.clip_grad_norm or combined) and live:
            sq = clipping.sq_sum([x[3] for x in live], torch.promote_types(live[0][3].dtype, torch.float32))
        self.combined_grad_norm = sq.sqrt() if combined else None
        if self.skip_nonfinite and live:
            finite = torch.stack([torch.isfinite(x[3]).all() for x in live]).all()
            if sq is not None and self.clip_grad_norm:
                finite = finite & torch.isfinite(sq)
            if not bool(finite):
                self.skipped_steps += 1
                return loss
        t = self.t + 1
        k = self.estimate_every
        estimate = self.noise_adaptive and noise.is_estimation_step(t, k)
        if estimate and self.option == "II" and live and not stashed:  # before any state changes: retryable
            raise RuntimeError(
                f"step {t} estimates with Option II but no half-batch gradient was stashed: "
                "call stash_half_gradient() between the two half-batch backward passes"
            )
        for g in self.param_groups:
            g["step"] = t
        if sq is not None and self.clip_grad_norm:
            coef = clipping.clip_coefficient(sq.sqrt(), self.clip_grad_norm)
            live = [(g, p, spec, grad * coef, None if diff2 is None else diff2 * coef)
                    for g, p, spec, grad, diff2 in live]

        for g, p, spec, grad, _ in live:
            self._init_state(p, spec)["momentum_buffer"].lerp_(grad, 1 - g["beta1"])

        if estimate:
            self._update_trackers(live)
        if self.noise_adaptive and self.option == "I":
            # G̃ at t+1 must be G_t: parameters without a gradient now drop any older one.
            keep = noise.keeps_previous_gradient(t, k)
            for _, p, _, grad, _ in live:
                if keep:
                    self.state[p]["prev_grad"] = grad.clone()
            present = {id(x[1]) for x in live} if keep else set()
            for _, p, _ in self._entries():
                if id(p) not in present and p in self.state:
                    self.state[p].pop("prev_grad", None)
        factors = self._rate_factors(estimate)

        hidden = [(i, x) for i, x in enumerate(live) if x[2].geometry is Geometry.HIDDEN]
        effective = [self._effective_momentum(g, p, grad) for g, p, _, grad, _ in live]
        directions: list[torch.Tensor | None] = [None] * len(live)
        for (i, _), o in zip(hidden, lmo_mod.hidden_directions([x[2] for _, x in hidden], [effective[i] for i, _ in hidden], self.lmo)):
            directions[i] = o
        for i, (g, p, spec, _, _) in enumerate(live):
            o = directions[i] if directions[i] is not None else lmo_mod.direction(spec, effective[i], self.lmo)
            scale = block_scale(spec, factors[p]).to(p.dtype)
            lr, wd = g["lr"], g["weight_decay"]
            if wd:
                p.mul_(1 - lr * wd * (scale if self.wd_lr == "layer" else 1.0))
            p.add_(o * (scale * lr))
        return loss

    def _effective_momentum(self, g: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        buf = self.state[p]["momentum_buffer"]
        return buf.lerp(grad, 1 - g["beta1"]) if g["nesterov"] else buf

    def _update_trackers(self, live) -> None:
        estimator = resolve_estimator(self.nuclear_estimator, live[0][1].device) if live else "exact"
        diffs = []
        for _, p, spec, grad, diff2 in live:
            if self.option == "II":
                diffs.append(diff2)
            else:
                prev = self.state[p].get("prev_grad")
                diffs.append(None if prev is None else grad - prev)
        hidden = [i for i, x in enumerate(live) if x[2].geometry is Geometry.HIDDEN and diffs[i] is not None]
        norms = lmo_mod.hidden_dual_norms([live[i][2] for i in hidden], [diffs[i] for i in hidden], estimator, lmo=self.lmo)
        it = iter(norms)
        for i, (g, p, spec, _, _) in enumerate(live):
            if diffs[i] is None:
                continue
            if spec.geometry is Geometry.HIDDEN:
                dual = torch.stack([next(it) for _ in spec.blocks])
            else:
                dual = lmo_mod.dual_norm(spec, diffs[i], lmo=self.lmo).reshape(1)
            st = self.state[p]
            st["H"] = noise.update_tracker(st["H"], dual.to(st["H"].dtype) ** 2, g["beta2"])
            st["estimated"].fill_(True)
            st["n_estimates"] += 1

    def _rate_factors(self, estimate: bool) -> dict[torch.Tensor, torch.Tensor]:
        """Per-parameter ``(n_blocks,)`` factors used this step; refreshes them on estimation steps."""
        entries = [(g, p, spec) for g, p, spec in self._entries() if "H" in self.state.get(p, {})]
        if not self.noise_adaptive:
            return {p: self.state[p]["lr_factor"] for _, p, _ in entries}
        if estimate and entries:
            hs = torch.cat([self.state[p]["H"] for _, p, _ in entries])
            dev = hs.device

            def per_layer(values, dtype):
                return torch.tensor([v for (_, _, s), v in zip(entries, values) for _ in s.blocks], dtype=dtype, device=dev)

            groups = [g for g, _, _ in entries]
            auto = [g["alpha_mode"] == "auto" for g in groups]
            bias = [bool(g["bias_correction"]) for g in groups]
            if self.alpha_auto is None:
                self.alpha_auto = torch.full((noise.N_GROUPS,), float("nan"), dtype=hs.dtype, device=dev)
            factors, self.alpha_auto = noise.rate_factors(
                hs, torch.cat([self.state[p]["n_estimates"] for _, p, _ in entries]),
                torch.cat([self.state[p]["estimated"] for _, p, _ in entries]),
                per_layer([noise.GEOMETRY_INDEX[s.geometry] for _, _, s in entries], torch.long),
                per_layer([g["alpha"] for g in groups], hs.dtype), per_layer([g["beta2"] for g in groups], hs.dtype),
                self.alpha_auto, anchor=self.ratio_anchor,
                auto=per_layer(auto, torch.bool) if any(auto) else None,
                bias=per_layer(bias, torch.bool) if any(bias) else None)
            new = factors.split([len(s.blocks) for _, _, s in entries])
            used = {}
            for (_, p, _), f in zip(entries, new):
                used[p] = self.state[p]["lr_factor"] if self.delay_lr_factor else f
                self.state[p]["lr_factor"] = f
            return used
        return {p: self.state[p]["lr_factor"] for _, p, _ in entries}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that ``H``, ``lr_factor``, ``estimated`` and ``n_estimates`` keep their
        dtypes (torch casts every state tensor of a floating parameter to its dtype: bf16
        rounding, bool → float), and group keys a checkpoint predates (e.g. ``alpha_mode``) keep
        this optimizer's values (torch would drop them).

        Checkpoints written before the ``estimated`` mask existed load with ``estimated = H > 0``
        (a layer whose tracker is still exactly 0 is treated as never estimated); before the
        estimate counts existed, with n = ⌊t/k⌋ for estimated layers (an upper bound: bias
        correction is then at most what it would have been); before ``alpha_auto``, unset
        (the next estimation step sets it)."""
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep = {p: {k: v for k, v in state_dict["state"].get(i, {}).items() if k in _EXACT_STATE}
                for i, p in zip(saved, params)}
        current = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, cur in zip(self.param_groups, current):
            for k, v in cur.items():
                g.setdefault(k, v)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        auto = state_dict.get("alpha_auto")
        self.alpha_auto = None if auto is None else auto.to(device=params[0].device if params else auto.device, copy=True)
        for p, tensors in keep.items():
            for k, v in tensors.items():
                self.state[p][k] = v.to(device=p.device, copy=True)
            if "H" in tensors and "estimated" not in tensors:
                self.state[p]["estimated"] = self.state[p]["H"] > 0
            if "H" in tensors and "n_estimates" not in tensors:
                est = self.state[p]["estimated"]
                self.state[p]["n_estimates"] = est.to(tensors["H"].dtype) * float(self.t // self.estimate_every)

    # ------------------------------------------------------------------ diagnostics
    def _alpha_of(self, g: dict[str, Any], spec: ParamSpec) -> float:
        """The α a layer of ``spec`` in group ``g`` uses: its group's auto α once set, else the configured one."""
        if g["alpha_mode"] == "auto" and self.alpha_auto is not None:
            a = float(self.alpha_auto[noise.GEOMETRY_INDEX[spec.geometry]])
            if a == a:  # not NaN
                return a
        return g["alpha"]

    def layer_diagnostics(self) -> list[dict[str, Any]]:
        """Per logical layer: name, geometry, H, α^ℓ, rate factor and effective lr (for logging)."""
        rows = []
        for g, p, spec in self._entries():
            st = self.state.get(p, {})
            if "H" not in st:
                continue
            used = noise.bias_corrected(st["H"], st["n_estimates"], g["beta2"]) if g["bias_correction"] else st["H"]
            a = noise.noise_alpha(used, self._alpha_of(g, spec))
            for i, blk in enumerate(spec.blocks):
                f = float(st["lr_factor"][i])
                rows.append(
                    dict(name=blk.name, geometry=spec.geometry.value, H=float(st["H"][i]), alpha=float(a[i]), lr_factor=f, lr=g["lr"] * f)
                )
        return rows
