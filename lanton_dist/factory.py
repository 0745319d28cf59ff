"""Build LANTON / Scion / D-Muon / AdamW for a model from one :class:`OptimConfig`.

All four share the same param groups (one per geometry, each with its ParamSpecs), so
benchmarks compare like with like.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lanton_dist.config import OPTIMIZERS, OptimConfig
from lanton_dist.dmuon import DMuon
from lanton_dist.groups import Block, Geometry, ParamSpec, classify_parameters
from lanton_dist.lanton import LANTON
from lanton_dist.lmo import LMOConfig


def check_not_zero_init(params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse parameters created under ``deepspeed.zero.Init``: they are already partitioned
    (``ds_id`` set, local shape ``(0,)``), so their geometry is lost and every matrix would be
    stepped as a vector."""
    partitioned = [n for n, p in params if hasattr(p, "ds_id")]
    if partitioned:
        raise ValueError(
            f"{len(partitioned)} parameters (e.g. {partitioned[0]!r}) were created under deepspeed.zero.Init and are "
            "already partitioned (shape (0,), DeepSpeed issue #8438): LANTON cannot see their matrix shapes. Build the model without "
            "zero.Init and pass it to lanton_dist.integrations.deepspeed.initialize (ZeRO-3 partitions it there), "
            "or run launch/train.py with parallel.backend deepspeed.")


def param_groups(
    model: nn.Module,
    cfg: OptimConfig,
    fused: dict[str, tuple[Block, ...]] | None = None,
    specs: dict[str, ParamSpec] | None = None,
    orientation: dict[str, str] | None = None,
    every_geometry: bool = False,
) -> list[dict[str, Any]]:
    """One torch param group per non-empty geometry: ``params``, ``specs``, ``names``, ``lr``,
    ``alpha``, ``geometry`` (its label). With ``cfg.lr.head`` set, the LM head (role ``head``)
    gets its own group, labelled ``head``, at that rate (its geometry stays embed_head).
    ``every_geometry``: also an empty group for each label with no local parameter — a pipeline
    stage that holds no embedding or head still carries those groups' hyper-parameters for the
    layers other stages hold (the group-wide rate anchor runs over the whole model).

    ``specs`` (name → ParamSpec) replaces classification, for integrations whose local
    parameters are shards of the logical ones. ``orientation`` declares storage orientations
    (pattern → ``'out_in'`` | ``'in_out'``, see :func:`~lanton_dist.groups.classify_parameters`).
    """
    check_not_zero_init(list(model.named_parameters()))
    specs = specs or classify_parameters(model, cfg.overrides, fused, orientation)
    params = dict(model.named_parameters())
    head_lr = getattr(cfg.lr, "head", None)  # a plain GroupValues (no head rate) is accepted
    groups = []
    for geometry in Geometry:
        names = [n for n in params if n in specs and specs[n].geometry is geometry]
        split = geometry is Geometry.EMBED_HEAD and head_lr is not None
        head = [n for n in names if specs[n].role == "head"] if split else []
        for label, members, lr in ((geometry.value, [n for n in names if n not in head], cfg.lr.get(geometry.value)),
                                   ("head", head, head_lr)):
            if members or (every_geometry and (label != "head" or split)):
                groups.append(dict(params=[params[n] for n in members], specs=[specs[n] for n in members],
                                   names=members, geometry=label, lr=lr, alpha=cfg.alpha.get(geometry.value)))
    return groups


def hyper_parameters(cfg: OptimConfig) -> dict[str, Any]:
    """Per-group defaults of ``cfg.name`` (what every implementation — reference, engine,
    adapters — reads from its param groups)."""
    if cfg.name in ("lanton", "scion"):
        return dict(weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2, nesterov=cfg.nesterov,
                    alpha_mode=cfg.alpha_mode, bias_correction=cfg.bias_correction)
    if cfg.name == "dmuon":
        return dict(weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=True,
                    adam_betas=tuple(cfg.adam_betas), adam_eps=cfg.adam_eps)
    return dict(weight_decay=cfg.weight_decay, adam_betas=tuple(cfg.adam_betas), adam_eps=cfg.adam_eps)


def lanton_options(cfg: OptimConfig) -> dict[str, Any]:
    """Optimizer-wide options shared by the LANTON reference and the sharded engine and adapters
    (every algorithm there), gradient clipping (``clip_grad_norm``) included."""
    return dict(estimate_every=cfg.estimate_every, option=cfg.option, ratio_anchor=cfg.ratio_anchor,
                nuclear_estimator=cfg.nuclear_estimator, wd_lr=cfg.wd_lr,
                lmo=LMOConfig(scale_mode=cfg.scale_mode, sign_scale=cfg.sign_scale, ns_steps=cfg.ns_steps),
                clip_grad_norm=cfg.clip_grad_norm)


def build_optimizer(model: nn.Module, cfg: OptimConfig, groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """The single-process optimizer ``cfg.name`` over ``groups`` (default :func:`param_groups` of ``model``).

    LANTON, Scion and D-Muon clip at ``cfg.clip_grad_norm`` inside their step; ``adamw`` is
    ``torch.optim.AdamW``, which does not clip: the training loop's backend clips its gradients
    (:meth:`lanton_dist.backends.Backend.clip_gradients`)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}")
    if groups is not None:
        check_not_zero_init((f"param_groups[{i}].params[{j}]", p) for i, g in enumerate(groups) for j, p in enumerate(g["params"]))
    groups = groups if groups is not None else param_groups(model, cfg)
    hyper = hyper_parameters(cfg)
    if cfg.name in ("lanton", "scion"):
        return LANTON(groups, **hyper, noise_adaptive=cfg.name == "lanton", delay_lr_factor=cfg.delay_lr_factor,
                      **lanton_options(cfg))
    if cfg.name == "dmuon":
        return DMuon(groups, **hyper, ns_steps=cfg.ns_steps, clip_grad_norm=cfg.clip_grad_norm)
    for g in groups:
        g.pop("specs"), g.pop("alpha")
    return torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
