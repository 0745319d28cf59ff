"""Which geometry each parameter belongs to, and the logical matrices inside fused ones.

Every trainable tensor is put in exactly one geometry group (spec table 1):

* ``hidden``     — 2-D weights of attention/MLP projections: spectral LMO (Newton–Schulz).
* ``embed_head`` — token embedding and LM head: sign LMO, ℓ1 dual norm.
* ``vector``     — 1-D gains and biases: RMS-normalised LMO, √d·ℓ2 dual norm.

A parameter may hold several *logical matrices* (a fused QKV or gate|up weight); each is a
:class:`Block` — a set of row ranges of the logical ``(d_out, d_in)`` weight — and each block
is one LANTON "layer" ℓ with its own noise tracker H. Unfused parameters have one block
covering all rows. This module is framework-free; integrations build :class:`ParamSpec` for
their own fused layouts with :func:`qkv_blocks` / :func:`stacked_blocks`.

**Storage orientation.** The LMO, its scales and the dual norms use the logical
``(d_out, d_in)`` matrix (spec, "storage orientation"). ``torch.nn.Linear`` stores exactly
that (orientation ``"out_in"``); Hugging Face's ``Conv1D`` (GPT-2 family) stores its transpose
``(d_in, d_out)`` (``"in_out"``, ``ParamSpec.transposed``). :func:`classify_parameters`
recognises the types in :data:`TRANSPOSED_MODULES` by name, without importing their
framework, splits GPT-2's fused ``c_attn`` into its q, k, v blocks, and takes a declared
orientation for any other parameter (``orientation={'<pattern>': 'in_out'}``).
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

#: Storage orientations of a 2-D weight: ``out_in`` stores the logical (d_out, d_in) matrix
#: (``nn.Linear``), ``in_out`` its transpose (Hugging Face ``Conv1D``).
ORIENTATIONS: tuple[str, ...] = ("out_in", "in_out")

#: Module classes (``module.qualname``, matched over the MRO) whose ``weight`` is stored ``in_out``.
TRANSPOSED_MODULES: tuple[str, ...] = ("transformers.pytorch_utils.Conv1D",)

#: Fused ``in_out`` weights split into equal stacked blocks, by module name and number of
#: logical rows per d_in: GPT-2's ``c_attn`` holds [q; k; v] (self-attention) or [k; v]
#: (cross-attention, whose q is the separate ``q_attn``).
FUSED_IN_OUT: dict[str, dict[int, tuple[str, ...]]] = {"c_attn": {3: ("q", "k", "v"), 2: ("k", "v")}}


@dataclass(frozen=True)
class Block:
    """One logical matrix: rows ``∪ [start, stop)`` of its parameter's logical ``(d_out, d_in)``
    matrix (:meth:`ParamSpec.logical`), all columns."""

    name: str
    rows: tuple[tuple[int, int], ...]

    @property
    def d_out(self) -> int:
        return sum(stop - start for start, stop in self.rows)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t[rows]`` as a ``(d_out, ...)`` tensor (a view when the rows are contiguous);
        ``t`` is a logical-orientation tensor (a view from :meth:`ParamSpec.logical`)."""
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
    """Geometry, shape, role and logical blocks of one parameter (the same on every rank).

    ``shape`` is the storage shape (the tensor's); ``transposed=True`` means the storage is
    the transpose of the logical ``(d_out, d_in)`` matrix (``in_out``, e.g. ``Conv1D``), and
    then ``blocks`` are rows of the logical matrix, i.e. columns of the storage.
    """

    name: str
    geometry: Geometry
    shape: tuple[int, ...]
    role: str = ""  # "embed" or "head" for embed_head; "" otherwise
    blocks: tuple[Block, ...] = field(default=())
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.transposed and len(self.shape) != 2:
            raise ValueError(f"{self.name}: only 2-D parameters can be stored transposed ('in_out'), got shape {self.shape}")
        rows = self.logical_shape[0] if self.shape else 1
        if not self.blocks:
            object.__setattr__(self, "blocks", (Block(self.name, ((0, rows),)),))
        if self.geometry is Geometry.HIDDEN and len(self.shape) != 2:
            raise ValueError(f"{self.name}: hidden parameters must be 2-D, got shape {self.shape}")
        covered = sorted(r for b in self.blocks for r in b.rows)
        pos = 0
        for start, stop in covered:
            if start != pos or stop <= start:
                raise ValueError(f"{self.name}: blocks must tile rows 0..{rows} of the logical matrix exactly, got {covered}")
            pos = stop
        if self.shape and pos != rows:
            raise ValueError(f"{self.name}: blocks cover {pos} of {rows} rows of the logical matrix")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the logical matrix: ``shape`` reversed when stored transposed."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    @property
    def d_in(self) -> int:
        """Logical input dimension (columns of the logical matrix)."""
        return self.logical_shape[1] if len(self.shape) >= 2 else 1

    def logical(self, t: torch.Tensor) -> torch.Tensor:
        """The logical ``(d_out, d_in)`` view of a storage-layout tensor ``t`` (``t.T`` when
        transposed); writes through the view land in ``t``."""
        return t.mT if self.transposed else t


def block_scale(spec: ParamSpec, factors: torch.Tensor, elements: tuple[int, int] | None = None) -> torch.Tensor:
    """The multiplier of ``spec``'s update from its per-block rate ``factors`` (``(n_blocks,)``).

    Without ``elements``: broadcastable to the storage shape ``spec.shape`` — ``factors[0]``
    (0-d) for one block, else a per-logical-row vector shaped ``(d_out, 1)`` (``(1, d_out)``
    when stored transposed). With ``elements=(start, stop)``: the multiplier of those elements
    of the row-major flattened storage, 1-D (or the 0-d ``factors[0]``); it builds only the
    storage rows the piece touches, never the whole tensor. On ``factors``' device and dtype.
    """
    if len(spec.blocks) == 1:
        return factors[0]
    import torch

    per_row = torch.empty(spec.logical_shape[0], dtype=factors.dtype, device=factors.device)
    for i, blk in enumerate(spec.blocks):
        for a, b in blk.rows:
            per_row[a:b] = factors[i]
    grid = per_row.view(1, -1) if spec.transposed else per_row.view(-1, *([1] * (len(spec.shape) - 1)))
    if elements is None:
        return grid
    start, stop = elements
    cols = spec.numel // spec.shape[0]
    first, last = start // cols, -(-stop // cols)
    rows = grid if spec.transposed else grid.view(-1, 1)[first:last]
    return rows.expand(last - first, cols).reshape(-1)[start - first * cols : stop - first * cols]


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
    orientation: dict[str, str] | None = None,
) -> dict[str, ParamSpec]:
    """Map each trainable parameter name of ``model`` to its :class:`ParamSpec`.

    Rules, first match wins: ``overrides`` (fnmatch pattern → geometry name); weights of
    ``nn.Embedding`` → embed_head/embed; 2-D weights whose module name ends in one of
    :data:`HEAD_NAMES` → embed_head/head; 1-D → vector; 2-D → hidden. Any other shape
    (3-D and up, 0-D) raises unless an override names it. ``fused`` maps a parameter name to
    its blocks (see :func:`qkv_blocks`), as rows of the logical matrix.

    Storage orientation: ``orientation`` (fnmatch pattern → ``'out_in'`` | ``'in_out'``, first
    match wins) declares it for any 2-D parameter (1-D ones have none and ignore it; ``in_out``
    on any other shape raises); otherwise the ``weight`` of a module in
    :data:`TRANSPOSED_MODULES` is ``in_out`` and everything else ``out_in``. An ``in_out``
    weight of a module named in :data:`FUSED_IN_OUT` (GPT-2's ``c_attn``) gets its blocks
    unless ``fused`` names it.
    """
    from torch import nn

    overrides = overrides or {}
    fused = fused or {}
    orientation = orientation or {}
    for pattern, value in orientation.items():
        if value not in ORIENTATIONS:
            raise ValueError(f"orientation {pattern!r}: unknown value {value!r}; use 'out_in' (nn.Linear, "
                             "stored (d_out, d_in)) or 'in_out' (stored (d_in, d_out), e.g. Conv1D)")
    embed_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    specs: dict[str, ParamSpec] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        geometry, role = infer_geometry((name,), shape, overrides, id(p) in embed_params, _is_head(name))
        module_name, _, leaf = name.rpartition(".")
        stored_in_out = leaf == "weight" and _is_transposed_module(model.get_submodule(module_name))
        transposed = len(shape) != 1 and _declared_orientation(name, orientation, stored_in_out)
        blocks = fused.get(name, ())
        if not blocks and transposed and stored_in_out and geometry is Geometry.HIDDEN:
            blocks = _fused_in_out_blocks(name, module_name, shape)
        if blocks and geometry is not Geometry.HIDDEN:
            raise ValueError(f"{name}: only hidden parameters can be fused, this one is {geometry.value}")
        specs[name] = ParamSpec(name, geometry, shape, role, blocks, transposed)
    unused = set(fused) - set(specs)
    if unused:
        raise ValueError(f"fused blocks given for unknown parameters: {sorted(unused)}")
    return specs


def _is_transposed_module(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a base) is one of :data:`TRANSPOSED_MODULES`."""
    return any(f"{c.__module__}.{c.__qualname__}" in TRANSPOSED_MODULES for c in type(module).__mro__)


def _declared_orientation(name: str, orientation: dict[str, str], detected: bool) -> bool:
    """``transposed`` of parameter ``name``: the first matching declared orientation, else ``detected``."""
    for pattern, value in orientation.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value == "in_out"
    return detected


def _fused_in_out_blocks(name: str, module_name: str, shape: tuple[int, ...]) -> tuple[Block, ...]:
    """Blocks of an ``in_out`` weight of shape ``(d_in, n·d_in)`` per :data:`FUSED_IN_OUT`; ``()`` if none applies."""
    labels_by_n = FUSED_IN_OUT.get(module_name.rpartition(".")[2])
    d_in, d_out = shape
    if labels_by_n is None or d_out % d_in:
        return ()
    labels = labels_by_n.get(d_out // d_in)
    if labels is None:
        return ()
    return stacked_blocks(name, [d_in] * len(labels), list(labels))


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
