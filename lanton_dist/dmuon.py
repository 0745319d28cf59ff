"""D-Muon (Moonlight, Liu et al. 2025), the baseline LANTON is compared against.

hidden: sum momentum ``M ← μM + G``, Nesterov direction ``G + μM``, Newton–Schulz with
Moonlight's scale 0.2·√max(d_out, d_in) per logical block, ``W ← W(1 − ηλ) − η·0.2√max·NS``;
embed_head and vector: AdamW (β = (0.9, 0.95)) with their group's own rate. Same param
groups as :class:`~lanton_dist.lanton.LANTON`; single process. A parameter without ``.grad``
is skipped for the step (its AdamW bias correction counts its own steps, as torch's does).
``clip_grad_norm`` > 0 clips the step's gradient by its global L2 norm first, ``p.grad`` left
as it was (:mod:`lanton_dist.clipping`, the same rule as LANTON's).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lanton_dist import clipping
from lanton_dist.adamw import adamw_step_
from lanton_dist.groups import Geometry
from lanton_dist.lanton import check_param_groups, run_closure
from lanton_dist.lmo import LMOConfig, hidden_directions


class DMuon(Optimizer):
    """Args: lr, weight_decay (per group); momentum μ and nesterov for hidden; adam_betas,
    adam_eps for the rest; ns_steps of the Newton–Schulz iteration; clip_grad_norm (0: off)."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        *,
        ns_steps: int = 5,
        skip_nonfinite: bool = True,
        clip_grad_norm: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        adam_betas=tuple(adam_betas), adam_eps=adam_eps, step=0)
        super().__init__(params, defaults)
        check_param_groups(self.param_groups)
        self.lmo = LMOConfig(scale_mode="moonlight", ns_steps=ns_steps)
        self.skip_nonfinite = skip_nonfinite
        self.clip_grad_norm = clipping.check_max_norm(clip_grad_norm)
        self.skipped_steps = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        live = [(g, p, s) for g in self.param_groups for p, s in zip(g["params"], g["specs"]) if p.grad is not None]
        grads = {p: p.grad for _, p, _ in live}
        sq = None
        if self.clip_grad_norm and live:
            sq = clipping.sq_sum(list(grads.values()), torch.promote_types(live[0][1].grad.dtype, torch.float32))
        if self.skip_nonfinite and live:
            finite = torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()
            if not bool(finite if sq is None else finite & torch.isfinite(sq)):
                self.skipped_steps += 1
                return loss
        if sq is not None:
            coef = clipping.clip_coefficient(sq.sqrt(), self.clip_grad_norm)
            grads = {p: grad * coef for p, grad in grads.items()}
        for g in self.param_groups:
            g["step"] += 1
        hidden = [(g, p, s) for g, p, s in live if s.geometry is Geometry.HIDDEN]
        updates = []
        for g, p, s in hidden:
            st = self.state[p]
            buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(g["momentum"]).add_(grads[p])
            updates.append(grads[p].add(buf, alpha=g["momentum"]) if g["nesterov"] else buf)
        for (g, p, s), o in zip(hidden, hidden_directions([s for _, _, s in hidden], updates, self.lmo)):
            p.mul_(1 - g["lr"] * g["weight_decay"]).add_(o, alpha=g["lr"])
        for g, p, s in live:
            if s.geometry is Geometry.HIDDEN:
                continue
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"], st["exp_avg_sq"], st["step"] = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
            # Its own step count, a CPU tensor as in torch's AdamW (reading it syncs no device);
            # states saved before it existed count the group's steps.
            st["step"] = st.get("step", torch.tensor(float(g["step"] - 1))) + 1
            adamw_step_(
                p, grads[p], st["exp_avg"], st["exp_avg_sq"], int(st["step"]), g["lr"], g["adam_betas"], g["adam_eps"], g["weight_decay"]
            )
        return loss
