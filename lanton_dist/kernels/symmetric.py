"""One-triangle symmetric product ``C = alpha·Y Yᵀ + beta·Z`` in Triton (a batched SYRK).

Y is ``(b, s, k)``; Z (optional) is ``(b, s, s)`` and must be symmetric. The s×s output is
cut into ``BLOCK × BLOCK`` tiles; one program per tile (i, j) with j ≤ i computes the tile
(fp32 accumulation) and writes it to (i, j) and its transpose to (j, i). Off-diagonal work is
halved: for Newton–Schulz, XXᵀ and A·A (A = XXᵀ symmetric, so A·A = A·Aᵀ) are 29–33% of a
step's FLOPs that the full products waste.

Backend rule: the Triton kernel runs on CUDA tensors, and on CPU tensors when Triton's
interpreter is on (``TRITON_INTERPRET=1`` set before the kernel is first built — tests do this
in a subprocess). Anywhere else :func:`triton_usable` is False and callers use
:func:`lanton_dist.newton_schulz.torch_gram`, which computes the same product with cuBLAS/BLAS.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

BLOCK_GPU, BLOCK_K_GPU = 64, 64
BLOCK_INTERPRET = 16  # tl.dot's minimum tile; keeps interpreter runs fast


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton() -> Any:
    """The ``triton`` module, or None when it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def triton_usable(t: torch.Tensor) -> bool:
    """Whether :func:`symmetric_gram` can run on tensors like ``t`` (Triton installed, and CUDA or interpreter)."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return _triton() is not None and (t.is_cuda or (t.device.type == "cpu" and _interpreting()))


@functools.cache
def _kernel() -> Any:
    """Build the jitted kernel on first use (so the interpreter flag is read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def syrk(Y, Z, C, TI, TJ, s, k, syb, sys_, syk, szb, szm, szn, scb, scm, scn, alpha, beta,
             HAS_Z: tl.constexpr, IEEE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        ti = tl.load(TI + t)
        tj = tl.load(TJ + t)
        rm = ti * BLOCK + tl.arange(0, BLOCK)
        rn = tj * BLOCK + tl.arange(0, BLOCK)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + rk
            a = tl.load(Y + bi * syb + rm[:, None] * sys_ + kk[None, :] * syk,
                        mask=(rm[:, None] < s) & (kk[None, :] < k), other=0.0)
            bt = tl.load(Y + bi * syb + rn[None, :] * sys_ + kk[:, None] * syk,
                         mask=(rn[None, :] < s) & (kk[:, None] < k), other=0.0)
            if IEEE:
                acc += tl.dot(a, bt, input_precision="ieee")
            else:
                acc += tl.dot(a, bt)
        acc = acc * alpha
        mask = (rm[:, None] < s) & (rn[None, :] < s)
        if HAS_Z:
            z = tl.load(Z + bi * szb + rm[:, None] * szm + rn[None, :] * szn, mask=mask, other=0.0)
            acc += beta * z.to(tl.float32)
        out = acc.to(C.dtype.element_ty)
        tl.store(C + bi * scb + rm[:, None] * scm + rn[None, :] * scn, out, mask=mask)
        if ti != tj:  # the mirrored tile: C[j-tile, i-tile] = C[i-tile, j-tile]ᵀ (Z symmetric)
            tl.store(C + bi * scb + rn[None, :] * scm + rm[:, None] * scn, out, mask=mask)

    return syrk


@functools.cache
def _tiles(n_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column tile index of every lower-triangle tile (j ≤ i), int32 on ``device``."""
    ij = torch.tril_indices(n_tiles, n_tiles, device=device).to(torch.int32)
    return ij[0].contiguous(), ij[1].contiguous()


def symmetric_gram(Y: torch.Tensor, Z: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """``alpha·Y Yᵀ + beta·Z`` for ``(b, s, k)`` Y and symmetric ``(b, s, s)`` Z; ``(b, s, s)`` in Y's dtype.

    Only tiles on or below the diagonal are computed (fp32 accumulation, IEEE fp32 products for
    fp32 input); the result is exactly symmetric. Raises ``RuntimeError`` where
    :func:`triton_usable` is False.
    """
    if not triton_usable(Y):
        raise RuntimeError("symmetric_gram needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if Y.ndim != 3 or (Z is not None and Z.shape != (Y.shape[0], Y.shape[1], Y.shape[1])):
        raise ValueError(f"symmetric_gram needs Y (b, s, k) and Z (b, s, s), got {tuple(Y.shape)}, "
                         f"{None if Z is None else tuple(Z.shape)}")
    b, s, k = Y.shape
    block, block_k = (BLOCK_GPU, BLOCK_K_GPU) if Y.is_cuda else (BLOCK_INTERPRET, BLOCK_INTERPRET)
    n_tiles = -(-s // block)
    ti, tj = _tiles(n_tiles, Y.device)
    C = torch.empty(b, s, s, dtype=Y.dtype, device=Y.device)
    Zt = C if Z is None else Z
    _kernel()[(ti.numel(), b)](
        Y, Zt, C, ti, tj, s, k, *Y.stride(), *Zt.stride(), *C.stride(), float(alpha), float(beta),
        HAS_Z=Z is not None, IEEE=Y.dtype == torch.float32, BLOCK=block, BLOCK_K=block_k,
    )
    return C
