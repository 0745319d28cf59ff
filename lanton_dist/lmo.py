"""Linear minimization oracles and dual norms of the three geometry groups (spec table 1).

Each layer steps along ``O = lmo(B) = −c·u(B)``, u the unit direction of a base norm
(polar factor, sign, B/‖B‖₂) and c the layer's scale; its dual norm is the dual of exactly the
norm whose unit-ball LMO that is, every scale factor included, so that
``⟨G, lmo(G)⟩ = −‖G‖_*`` (spec, "Rule for dual norms"):

===========  ==========================================  ==============================
group        direction O = lmo(B)                        dual norm ‖G‖_*
===========  ==========================================  ==============================
hidden       −s·polar(B), s = √(d_out/d_in) (spectral)   s·‖G‖_nuclear
             or 0.2·√max(d_out, d_in) (moonlight)
embed_head   −c·sign(B), c = 1 (embed); 1/d_in for the    c·Σ|G_ij|
             head when ``sign_scale='scion'``
vector       −√d·B/‖B‖₂                                  √d·‖G‖₂
===========  ==========================================  ==============================

The scale c of each pair has one owner, :func:`pair_scale` (hidden: :func:`hidden_scale`, sign:
:func:`sign_scale`, vector: :func:`vector_scale`); directions and dual norms both read it, so
they cannot drift apart. Sharded ℓ1/ℓ2 sums are per-shard partials (:func:`sign_dual_partial`,
:func:`sq_partial`) of the same scaled quantity.

Hidden parameters act per logical :class:`~lanton_dist.groups.Block`; same-shape blocks
are stacked and orthogonalised in one batched Newton–Schulz call. d_out, d_in and the blocks
are those of the logical matrix whatever the storage (``ParamSpec.transposed``, e.g. GPT-2's
``Conv1D``); tensors come in and go out in storage layout. Everything here takes
whole tensors except the ``*_partial`` helpers, which return per-shard sums that a caller
adds over shards (the only reductions ℓ1 and ℓ2 norms need).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from lanton_dist.groups import Block, Geometry, ParamSpec
from lanton_dist.newton_schulz import DEFAULT_STEPS, STARTS, newton_schulz
from lanton_dist.nuclear import Estimator, nuclear_norm

SCALE_MODES = ("spectral", "moonlight")
SIGN_SCALES = ("scion", "unit")


@dataclass(frozen=True)
class LMOConfig:
    """How directions are computed. ``ns_dtype=None`` → bf16 on GPU, fp32 on CPU.

    ``ns_start``: ``frobenius`` (Muon's) or ``gram`` (the tighter ‖(BBᵀ)²‖_F^¼ scale of
    :mod:`lanton_dist.newton_schulz`; with ``ns_steps=4`` it saves a step — measured in
    ``launch/bench_ns.py``, not the default). ``ns_symmetric``: one-triangle XXᵀ/A·A kernel where
    Triton runs. ``ns_compile``: a ``torch.compile`` backend for the iteration, or None.
    """

    scale_mode: str = "spectral"
    sign_scale: str = "scion"
    ns_steps: int = DEFAULT_STEPS
    ns_dtype: torch.dtype | None = None
    ns_start: str = "frobenius"
    ns_symmetric: bool = False
    ns_compile: str | None = None

    def __post_init__(self) -> None:
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if self.sign_scale not in SIGN_SCALES:
            raise ValueError(f"sign_scale must be one of {SIGN_SCALES}, got {self.sign_scale!r}")
        if self.ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {self.ns_steps}")
        if self.ns_start not in STARTS:
            raise ValueError(f"ns_start must be one of {STARTS}, got {self.ns_start!r}")

    def ns_options(self) -> dict[str, object]:
        """The keyword options of :func:`~lanton_dist.newton_schulz.newton_schulz` this config
        changes from their defaults (empty for Muon's plain kernel)."""
        opts = {"start": self.ns_start, "symmetric": self.ns_symmetric, "compile_backend": self.ns_compile}
        defaults = {"start": "frobenius", "symmetric": False, "compile_backend": None}
        return {k: v for k, v in opts.items() if v != defaults[k]}


def hidden_scale(d_out: int, d_in: int, mode: str) -> float:
    """Scale of the polar factor: Scion's √(d_out/d_in) or Moonlight's 0.2·√max(d_out, d_in)."""
    if mode == "spectral":
        return math.sqrt(d_out / d_in)
    if mode == "moonlight":
        return 0.2 * math.sqrt(max(d_out, d_in))
    raise ValueError(f"unknown scale_mode {mode!r}")


def sign_scale(spec: ParamSpec, mode: str) -> float:
    """Radius of the sign LMO: 1, or 1/d_in (logical) for the LM head under ``'scion'`` (Scion's normalised Sign)."""
    return 1.0 / spec.d_in if (mode == "scion" and spec.role == "head") else 1.0


def vector_scale(spec: ParamSpec) -> float:
    """Scale of the RMS LMO of a vector: √d (d = ``spec.numel``)."""
    return math.sqrt(spec.numel)


def pair_scale(spec: ParamSpec, cfg: LMOConfig, block: Block | None = None) -> float:
    """The scale c shared by a layer's LMO direction ``−c·u(B)`` and its dual norm
    ``c·‖G‖_base`` (module table): hidden block ``block`` (default: the parameter's first) —
    :func:`hidden_scale` of ``cfg.scale_mode``; embed_head — :func:`sign_scale` of
    ``cfg.sign_scale``; vector — :func:`vector_scale`."""
    if spec.geometry is Geometry.HIDDEN:
        blk = block if block is not None else spec.blocks[0]
        return hidden_scale(blk.d_out, spec.d_in, cfg.scale_mode)
    if spec.geometry is Geometry.EMBED_HEAD:
        return sign_scale(spec, cfg.sign_scale)
    return vector_scale(spec)


def polar_batched(mats: list[torch.Tensor], cfg: LMOConfig, refine_steps: int = 0) -> list[torch.Tensor]:
    """Newton–Schulz of each matrix, one batched call per distinct shape. Returns in input order."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        by_shape[tuple(m.shape)].append(i)
    for idx in by_shape.values():
        polar = newton_schulz(torch.stack([mats[i] for i in idx]), cfg.ns_steps, refine_steps, cfg.ns_dtype,
                              **cfg.ns_options())
        for j, i in enumerate(idx):
            out[i] = polar[j]
    return out  # type: ignore[return-value]


def hidden_directions(specs: list[ParamSpec], moms: list[torch.Tensor], cfg: LMOConfig) -> list[torch.Tensor]:
    """O = −s·polar(B) per logical block of each whole hidden parameter (``moms`` in storage
    layout); returns one storage-layout tensor per parameter."""
    blocks = [(k, blk) for k, spec in enumerate(specs) for blk in spec.blocks]
    polars = polar_batched([blk.gather(specs[k].logical(moms[k])) for k, blk in blocks], cfg)
    outs = [torch.empty_like(m) for m in moms]
    for (k, blk), pol in zip(blocks, polars):
        scatter_block_direction(specs[k], blk, pol, outs[k], cfg.scale_mode)
    return outs


def scatter_block_direction(spec: ParamSpec, blk: Block, pol: torch.Tensor, out: torch.Tensor, mode: str) -> None:
    """Write O = −s·``pol`` of logical block ``blk`` of ``spec`` into ``out`` (the whole
    parameter, storage layout): ``pol`` is the block's polar factor, logical ``(d_out_b, d_in)``
    orientation, scaled in place by s of :func:`hidden_scale` (``mode``)."""
    blk.scatter_(spec.logical(out), pol.mul_(-hidden_scale(blk.d_out, spec.d_in, mode)))


def sign_direction(spec: ParamSpec, b: torch.Tensor, cfg: LMOConfig) -> torch.Tensor:
    """O = −c·sign(B), elementwise: valid on any shard of ``b`` (c: :func:`pair_scale`)."""
    return torch.sign(b).mul_(-pair_scale(spec, cfg))


def vector_direction(b: torch.Tensor, norm: torch.Tensor, numel: int) -> torch.Tensor:
    """O = −√d·B/‖B‖₂ with ``norm`` the whole tensor's ‖B‖₂ (so ``b`` may be a shard); 0 if B = 0.
    √d is :func:`vector_scale` of a ``numel``-element vector."""
    scale = torch.where(norm > 0, -math.sqrt(numel) / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return b * scale.to(b.dtype)


def hidden_dual_norms(
    specs: list[ParamSpec], diffs: list[torch.Tensor], estimator: Estimator, refine_steps: int | None = None,
    lmo: LMOConfig | None = None,
) -> list[torch.Tensor]:
    """s·‖D_b‖_nuclear for every logical block b of every whole hidden parameter (``diffs`` in
    storage layout), s the block's :func:`pair_scale` under ``lmo`` (default
    :class:`LMOConfig`: spectral, √(d_out/d_in)), flattened in (parameter, block) order; fp32
    scalars. Same-shape blocks are estimated in one batch."""
    cfg = lmo or LMOConfig()
    blocks = [(k, blk) for k, spec in enumerate(specs) for blk in spec.blocks]
    mats = [blk.gather(specs[k].logical(diffs[k])) for k, blk in blocks]
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        by_shape[tuple(m.shape)].append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for idx in by_shape.values():
        nuc = nuclear_norm(torch.stack([mats[i] for i in idx]), estimator, refine_steps=refine_steps)
        for j, i in enumerate(idx):
            k, blk = blocks[i]
            out[i] = nuc[j] * pair_scale(specs[k], cfg, blk)
    return out  # type: ignore[return-value]


def _acc(d: torch.Tensor) -> torch.Tensor:
    """``d`` in an accumulation dtype of at least fp32 (fp64 stays fp64)."""
    return d.to(torch.promote_types(d.dtype, torch.float32))


def l1_partial(d: torch.Tensor) -> torch.Tensor:
    """Σ|D| over this shard (≥ fp32); the embed_head dual norm is the sum over shards."""
    return _acc(d).abs().sum()


def sign_dual_partial(spec: ParamSpec, d: torch.Tensor, lmo: LMOConfig) -> torch.Tensor:
    """c·Σ|D| over this shard of an embed_head parameter (c: :func:`pair_scale`); its dual norm
    is the sum over shards."""
    return l1_partial(d) * pair_scale(spec, lmo)


def sq_partial(d: torch.Tensor) -> torch.Tensor:
    """Σ D² over this shard (≥ fp32); ‖D‖₂² of the whole tensor is the sum over shards."""
    return _acc(d).pow(2).sum()


def dual_norm(spec: ParamSpec, d: torch.Tensor, estimator: Estimator = "exact", lmo: LMOConfig | None = None) -> torch.Tensor:
    """The dual norm of a whole tensor ``d`` of parameter ``spec`` under ``lmo`` (default
    :class:`LMOConfig`), the dual of the norm :func:`direction` minimises over (sum over its
    blocks for hidden): ``⟨d, direction(spec, d, lmo)⟩ = −dual_norm(spec, d, lmo)``."""
    cfg = lmo or LMOConfig()
    if spec.geometry is Geometry.HIDDEN:
        return torch.stack(hidden_dual_norms([spec], [d], estimator, lmo=cfg)).sum()
    if spec.geometry is Geometry.EMBED_HEAD:
        return sign_dual_partial(spec, d, cfg)
    return vector_scale(spec) * sq_partial(d).sqrt()


def direction(spec: ParamSpec, b: torch.Tensor, cfg: LMOConfig) -> torch.Tensor:
    """lmo(B) of a whole tensor ``b`` of parameter ``spec``."""
    if spec.geometry is Geometry.HIDDEN:
        return hidden_directions([spec], [b], cfg)[0]
    if spec.geometry is Geometry.EMBED_HEAD:
        return sign_direction(spec, b, cfg)
    return vector_direction(b, sq_partial(b).sqrt(), spec.numel)
