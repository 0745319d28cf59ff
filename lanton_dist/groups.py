"""Which geometry each parameter belongs to, and the logical matrices inside fused ones.

Every trainable tensor is put in exactly one geometry group (spec table 1):

* ``hidden``     — 2-D weights of attention/MLP projections: spectral LMO (Newton–Schulz).
* ``embed_head`` — token embedding and LM head: sign LMO, ℓ1 dual norm.
* ``vector``     — 1-D gains and biases: RMS-normalised LMO, √d·ℓ2 dual norm.

A parameter may hold several *logical matrices* (a fused QKV or gate|up weight); each is a
:class:`Block` — a set of row ranges of the ``(d_out, d_in)`` weight — and each block is one
LANTON "layer" ℓ with its own noise tracker H. Unfused parameters have one block covering
all rows. This module is framework-free; integrations build :class:`ParamSpec` for their
own fused layouts with :func:`qkv_blocks` / :func:`stacked_blocks`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so the planner's imports stay torch-free
    import torch
    from torch import nn


class Geometry(str, Enum):
    HIDDEN = "hidden"
    EMBED_HEAD = "embed_head"
    VECTOR = "vector"


HEAD_NAMES: tuple[str, ...] = ("lm_head", "output", "output_layer", "head")


@dataclass(frozen=True)
class Block:
    """One logical matrix: rows ``∪ [start, stop)`` of its parameter (dim 0), all columns."""

    name: str
    rows: tuple[tuple[int, int], ...]

    @property
    def d_out(self) -> int:
        return sum(stop - start for start, stop in self.rows)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t[rows]`` as a ``(d_out, ...)`` tensor (a view when the rows are contiguous)."""
        if len(self.rows) == 1:
            start, stop = self.rows[0]
            return t[start:stop]
        import torch

        return torch.cat([t[a:b] for a, b in self.rows], dim=0)

    def scatter_(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``value`` (``(d_out, ...)``) back into rows of ``t`` in place."""
        offset = 0
        for start, stop in self.rows:
            t[start:stop].copy_(value[offset : offset + stop - start])
            offset += stop - start


@dataclass(frozen=True)
class ParamSpec:
    """Geometry, shape, role and logical blocks of one parameter (the same on every rank)."""

    name: str
    geometry: Geometry
    shape: tuple[int, ...]
    role: str = ""  # "embed" or "head" for embed_head; "" otherwise
    blocks: tuple[Block, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.blocks:
            object.__setattr__(self, "blocks", (Block(self.name, ((0, self.shape[0] if self.shape else 1),)),))
        if self.geometry is Geometry.HIDDEN and len(self.shape) != 2:
            raise ValueError(f"{self.name}: hidden parameters must be 2-D, got shape {self.shape}")
        covered = sorted(r for b in self.blocks for r in b.rows)
        pos = 0
        for start, stop in covered:
            if start != pos or stop <= start:
                raise ValueError(f"{self.name}: blocks must tile rows 0..{self.shape[0]} exactly, got {covered}")
            pos = stop
        if self.shape and pos != self.shape[0]:
            raise ValueError(f"{self.name}: blocks cover {pos} of {self.shape[0]} rows")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def d_in(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else 1


def stacked_blocks(name: str, sizes: list[int], labels: list[str] | None = None) -> tuple[Block, ...]:
    """Blocks of a weight made by stacking matrices of ``sizes`` rows along dim 0 (e.g. gate|up)."""
    labels = labels or [str(i) for i in range(len(sizes))]
    blocks, pos = [], 0
    for label, size in zip(labels, sizes, strict=True):
        blocks.append(Block(f"{name}:{label}", ((pos, pos + size),)))
        pos += size
    return tuple(blocks)


def qkv_blocks(name: str, num_heads: int, num_kv_heads: int, head_dim: int, interleaved: bool) -> tuple[Block, ...]:
    """The Q, K and V blocks of a fused QKV weight.

    ``interleaved=False``: rows are ``[Q (num_heads·hd); K (kv·hd); V (kv·hd)]``.
    ``interleaved=True`` (Megatron ``linear_qkv``): rows are grouped per KV head,
    ``[q_g (heads/kv · hd); k_g (hd); v_g (hd)]`` for each group g.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not divisible by num_kv_heads {num_kv_heads}")
    if not interleaved:
        return stacked_blocks(name, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], ["q", "k", "v"])
    q_per = num_heads // num_kv_heads * head_dim
    group = q_per + 2 * head_dim
    q = tuple((g * group, g * group + q_per) for g in range(num_kv_heads))
    k = tuple((g * group + q_per, g * group + q_per + head_dim) for g in range(num_kv_heads))
    v = tuple((g * group + q_per + head_dim, (g + 1) * group) for g in range(num_kv_heads))
    return (Block(f"{name}:q", q), Block(f"{name}:k", k), Block(f"{name}:v", v))


def classify_parameters(
    model: nn.Module,
    overrides: dict[str, str] | None = None,
    fused: dict[str, tuple[Block, ...]] | None = None,
) -> dict[str, ParamSpec]:
    """Map each trainable parameter name of ``model`` to its :class:`ParamSpec`.

    Rules, first match wins: ``overrides`` (fnmatch pattern → geometry name); weights of
    ``nn.Embedding`` → embed_head/embed; 2-D weights whose module name ends in one of
    :data:`HEAD_NAMES` → embed_head/head; 1-D → vector; 2-D → hidden. Any other shape
    (3-D and up, 0-D) raises unless an override names it. ``fused`` maps a parameter name to
    its blocks (see :func:`qkv_blocks`).
    """
    from torch import nn

    overrides = overrides or {}
    fused = fused or {}
    embed_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    specs: dict[str, ParamSpec] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        geometry, role = infer_geometry((name,), shape, overrides, id(p) in embed_params, _is_head(name))
        blocks = fused.get(name, ())
        if blocks and geometry is not Geometry.HIDDEN:
            raise ValueError(f"{name}: only hidden parameters can be fused, this one is {geometry.value}")
        specs[name] = ParamSpec(name, geometry, shape, role, blocks)
    unused = set(fused) - set(specs)
    if unused:
        raise ValueError(f"fused blocks given for unknown parameters: {sorted(unused)}")
    return specs


def infer_geometry(names: tuple[str, ...], shape: tuple[int, ...], overrides: dict[str, str],
                   is_embedding: bool, is_head: bool) -> tuple[Geometry, str]:
    """Geometry and role of one parameter — the rules of :func:`classify_parameters`, shared
    with integrations whose modules name embeddings and heads their own way.

    ``names``: the names ``overrides`` patterns are matched against (first match wins);
    ``is_embedding`` / ``is_head``: what the framework's module types say about it.
    """
    for pattern, geo in overrides.items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            try:
                geometry = Geometry(geo)
            except ValueError:
                raise ValueError(f"override {pattern!r}: unknown geometry {geo!r}; use hidden, embed_head or vector") from None
            role = ("head" if is_head else "embed") if geometry is Geometry.EMBED_HEAD else ""
            return geometry, role
    if is_embedding:
        return Geometry.EMBED_HEAD, "embed"
    if len(shape) == 2 and is_head:
        return Geometry.EMBED_HEAD, "head"
    if len(shape) == 1:
        return Geometry.VECTOR, ""
    if len(shape) == 2:
        return Geometry.HIDDEN, ""
    raise ValueError(
        f"parameter {names[0]!r} has shape {shape}: LANTON cannot infer its geometry; "
        "declare it with overrides={'<pattern>': 'hidden'|'embed_head'|'vector'} "
        "(a hidden parameter must be reshaped to 2-D by its module)"
    )


def _is_head(name: str) -> bool:
    module = name.rsplit(".", 1)[0] if "." in name else name
    return module.rsplit(".", 1)[-1] in HEAD_NAMES
