"""Newton–Schulz polar factor: the whole-matrix kernel of the hidden-group LMO and of the
nuclear-norm estimator.

polar(X) = U Vᵀ for X = U Σ Vᵀ. Every step is an odd polynomial of X applied through its Gram
matrix, ``X ← aX + (b·A + c·A²)X`` with ``A = XXᵀ``:

* **schedules** (``schedule=``): ``"muon"`` repeats Keller Jordan's quintic
  :data:`QUINTIC_COEFFS`, which drives the singular values of X/‖X‖_F into roughly
  [0.7, 1.2] in 5 steps (the Muon/Scion update); ``"polar_express"`` is the Polar Express
  schedule :data:`POLAR_EXPRESS_COEFFS` (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932,
  Algorithm 1: minimax degree-5 polynomials for σ ∈ [1e-3, 1], each but the last divided by
  the paper's safety factor 1.01, 1.01³, 1.01⁵), which converges to σ = 1.
  ``refine_steps`` cubic steps ``X ← 1.5X − 0.5(XXᵀ)X`` may follow either.
* **starts** (``start=``): ``"frobenius"`` scales X by 1/‖X‖_F (overshoots ‖X‖₂ by up to
  √rank); ``"gram"`` scales by 1/‖(XXᵀ)²‖_F^¼ = 1/(Σσ⁸)^⅛ ≥ 1/‖X‖₂, an upper bound of σ_max that
  is 1.4–1.8× tight on LLM-like spectra, computed from the first step's own XXᵀ and A² (no
  extra matmul: A and A² are rescaled by s⁻² and s⁻⁴).
* **kernel**: updates are fused into ``baddbmm`` (``B = bA + cA·A``, ``X = aX + B·X``); the two
  symmetric products XXᵀ and A·A go through :func:`lanton_dist.kernels.symmetric_gram` when
  ``symmetric=True`` and a Triton backend is available (one triangle computed, the other
  mirrored), else ``bmm``/``baddbmm``. ``compile_backend`` runs the iteration under
  ``torch.compile(fullgraph=True)``.

:func:`newton_schulz` is process-local: callers hand in whole matrices, batched over leading
dimensions (same shape). The iteration runs on the wide orientation (a transpose when m > n).
:func:`newton_schulz_columns` runs the same iteration on one column block X_i of the wide
orientation X = [X_1 … X_c] held by each of c processes (the split Newton–Schulz of
:mod:`lanton_dist.engine.splitns`): the Gram matrix XXᵀ = Σ_i X_i X_iᵀ is summed through a
callable, the m × m polynomials (bA + cA², and A² of the Gram start) are computed on this
member's rows and gathered through another, and the Frobenius start reads ‖X‖²_F off the
trace of the first summed Gram matrix — the reference's numbers up to rounding, two m × m
collectives per quintic step (one per cubic step) and nothing else.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the FLOP count and constants are torch-free
    import torch

Coeffs = tuple[float, float, float]

QUINTIC_COEFFS: Coeffs = (3.4445, -4.7750, 2.0315)
DEFAULT_STEPS = 5
#: The ``ns`` nuclear-norm estimate's run (:data:`lanton_dist.nuclear.NS_ESTIMATE`): Gram start,
#: this many Polar Express steps, then this many cubic steps; torch-free for the planner.
ESTIMATE_STEPS = 6
ESTIMATE_REFINE_STEPS = 1
CUBIC_COEFFS: tuple[float, float] = (1.5, -0.5)

_POLAR_EXPRESS_RAW: tuple[Coeffs, ...] = (  # arXiv 2505.16932, Algorithm 1 (l = 1e-3, degree 5)
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
#: The published schedule with its safety factor (all but the last polynomial, as in the paper);
#: steps past the eighth repeat the last, (15/8, −5/4, 3/8): p(1) = 1, p'(1) = p''(1) = 0.
POLAR_EXPRESS_COEFFS: tuple[Coeffs, ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

SCHEDULES = ("muon", "polar_express")
STARTS = ("frobenius", "gram")
_EPS = 1e-7


def default_ns_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 on GPU (tensor-core rate); on CPU fp32, or fp64 for fp64 input (CPU bf16 is slow and inexact)."""
    import torch

    if x.device.type == "cuda":
        return torch.bfloat16
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def schedule_coeffs(schedule: str, steps: int) -> tuple[Coeffs, ...]:
    """The ``(a, b, c)`` of each of ``steps`` quintic steps of ``schedule`` (see :data:`SCHEDULES`)."""
    if schedule == "muon":
        return (QUINTIC_COEFFS,) * steps
    if schedule == "polar_express":
        n = len(POLAR_EXPRESS_COEFFS)
        return POLAR_EXPRESS_COEFFS[:steps] + (POLAR_EXPRESS_COEFFS[-1],) * max(0, steps - n)
    raise ValueError(f"unknown Newton–Schulz schedule {schedule!r}; choose one of {SCHEDULES}")


def newton_schulz(
    x: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    refine_steps: int = 0,
    dtype: torch.dtype | None = None,
    *,
    schedule: str = "muon",
    start: str = "frobenius",
    symmetric: bool = False,
    compile_backend: str | None = None,
) -> torch.Tensor:
    """Approximate polar factor of each matrix in ``x``.

    Args:
        x: ``(..., m, n)``; leading dimensions are a batch of same-shape matrices.
        steps: quintic steps of ``schedule`` (``"muon"`` | ``"polar_express"``).
        refine_steps: cubic steps after the quintic ones (0 for the Muon/Scion update).
        dtype: compute dtype; default :func:`default_ns_dtype` of ``x``.
        start: ``"frobenius"`` | ``"gram"`` — the initial scaling (module docstring).
        symmetric: compute XXᵀ and A·A with the one-triangle kernel of
            :mod:`lanton_dist.kernels` where Triton can run it (else the torch path, same result).
        compile_backend: ``None`` (eager) or a ``torch.compile`` backend (``"inductor"``).

    Returns:
        ``(..., m, n)`` in ``x.dtype``; an all-zero matrix maps to zero.
    """
    coeffs = _check(x, steps, refine_steps, schedule, start)
    out_dtype, dtype = x.dtype, dtype or default_ns_dtype(x)
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:]).to(dtype).contiguous()
    products = _WholeProducts(_gram_fn(X, symmetric))
    fn = _iterate if compile_backend is None else _compiled(compile_backend)
    X = fn(X, coeffs, refine_steps, start == "gram", products)
    X = X.reshape(*batch, *X.shape[-2:])
    return (X.mT if tall else X).to(out_dtype).contiguous()


def newton_schulz_columns(
    x: torch.Tensor,
    rows: tuple[int, int],
    gram_sum: Callable[[torch.Tensor], None],
    gather_rows: Callable[[torch.Tensor], torch.Tensor],
    steps: int = DEFAULT_STEPS,
    refine_steps: int = 0,
    dtype: torch.dtype | None = None,
    *,
    schedule: str = "muon",
    start: str = "frobenius",
    symmetric: bool = False,
    compile_backend: str | None = None,
) -> torch.Tensor:
    """This member's block of :func:`newton_schulz` of a matrix split by columns over a team.

    The whole matrix is X = [X_1 … X_c], ``(..., m, n)`` in its wide orientation (m ≤ n: the
    caller transposes a tall one); every member calls this with its block, the same options
    and the same number of collectives (module doc).

    Args:
        x: ``(..., m, k_i)``, this member's columns of X (any ``k_i ≥ 0``; leading dimensions: a
            batch of same-shape matrices split alike).
        rows: ``(r0, r1)``, this member's rows of the ``m × m`` polynomials; the members' ranges
            tile ``[0, m)`` in the order ``gather_rows`` concatenates them.
        gram_sum: sums a ``(b, m, m)`` tensor over the team in place (SUM all-reduce).
        gather_rows: ``(b, r1 − r0, m)`` → ``(b, m, m)``, every member's rows in order.
        steps, refine_steps, dtype, schedule, start, symmetric: as :func:`newton_schulz`
            (``symmetric`` applies to X_i X_iᵀ; the row products are plain ``bmm``).
        compile_backend: must be ``None`` (the iteration issues collectives).

    Returns:
        ``(..., m, k_i)`` in ``x.dtype``: the columns of ``newton_schulz(X)`` this member holds.
    """
    coeffs = _check(x, steps, refine_steps, schedule, start)
    if compile_backend is not None:
        raise ValueError("newton_schulz_columns issues collectives inside the iteration: torch.compile "
                         f"(compile_backend={compile_backend!r}) cannot trace it; use compile_backend=None")
    m = x.size(-2)
    if not 0 <= rows[0] <= rows[1] <= m:
        raise ValueError(f"rows {rows} are not a row range of the {m} x {m} Gram matrix")
    out_dtype, dtype = x.dtype, dtype or default_ns_dtype(x)
    batch = x.shape[:-2]
    X = x.reshape(math.prod(batch), *x.shape[-2:]).to(dtype).contiguous()  # k_i may be 0
    products = _ColumnProducts(_gram_fn(X, symmetric), gram_sum, rows, gather_rows)
    X = _iterate(X, coeffs, refine_steps, start == "gram", products)
    return X.reshape(*batch, *X.shape[-2:]).to(out_dtype)


def _check(x: torch.Tensor, steps: int, refine_steps: int, schedule: str, start: str) -> tuple[Coeffs, ...]:
    """Validate the options shared by :func:`newton_schulz` and :func:`newton_schulz_columns`;
    returns the quintic coefficients."""
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs (..., m, n) matrices, got shape {tuple(x.shape)}")
    if steps < 0 or refine_steps < 0:
        raise ValueError("steps and refine_steps must be >= 0")
    if start not in STARTS:
        raise ValueError(f"unknown Newton–Schulz start {start!r}; choose one of {STARTS}")
    if start == "gram" and steps == 0:
        raise ValueError("start='gram' reuses the first quintic step's products: needs steps >= 1")
    return schedule_coeffs(schedule, steps)


def _gram_fn(X: torch.Tensor, symmetric: bool) -> Callable[..., torch.Tensor]:
    """``gram(Y, Z=None, alpha=1, beta=0)`` = ``alpha·Y Yᵀ + beta·Z`` (Z symmetric) for ``(b, s, k)`` Y."""
    if symmetric:
        from lanton_dist.kernels import symmetric_gram, triton_usable

        if triton_usable(X):
            return symmetric_gram
    return torch_gram


def torch_gram(Y: torch.Tensor, Z: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """``alpha·Y Yᵀ + beta·Z`` with ``bmm``/``baddbmm`` (both triangles computed)."""
    import torch

    if Z is None:
        return torch.bmm(Y, Y.mT) if alpha == 1.0 else torch.bmm(Y, Y.mT).mul_(alpha)
    return torch.baddbmm(Z, Y, Y.mT, beta=beta, alpha=alpha)


class _WholeProducts:
    """The iteration's products on whole ``(b, s, l)`` matrices held by this process."""

    def __init__(self, gram: Callable[..., torch.Tensor]) -> None:
        self.gram = gram

    def start(self, X: torch.Tensor, need_gram: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X/‖X‖_F (keeps bf16/fp32 products in range) and, if needed, its XXᵀ."""
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + _EPS)
        return X, (self.gram(X) if need_gram else None)

    def xxt(self, X: torch.Tensor) -> torch.Tensor:
        return self.gram(X)

    def square(self, A: torch.Tensor) -> torch.Tensor:
        """A·A (A symmetric)."""
        return self.gram(A)

    def poly(self, A: torch.Tensor, b: float, c: float) -> torch.Tensor:
        """bA + c·A·A (A symmetric, so A·Aᵀ = A·A)."""
        return self.gram(A, A, alpha=c, beta=b)


class _ColumnProducts:
    """The same products for a column block ``(b, m, k)``: XXᵀ summed over the team, the
    ``m × m`` polynomials on this member's ``rows`` then gathered (:func:`newton_schulz_columns`)."""

    def __init__(self, gram: Callable[..., torch.Tensor], gram_sum: Callable[[torch.Tensor], None],
                 rows: tuple[int, int], gather_rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.gram, self.gram_sum, self.rows, self.gather_rows = gram, gram_sum, rows, gather_rows

    def start(self, X: torch.Tensor, need_gram: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X_i/‖X‖_F with ‖X‖²_F = trace(Σ_j X_j X_jᵀ), the first summed Gram matrix, which
        rescaled by 1/‖X‖²_F is the normalised X's XXᵀ: no collective beyond the Gram's."""
        import torch

        G = self.xxt(X)
        trace = G.diagonal(dim1=-2, dim2=-1).to(torch.promote_types(G.dtype, torch.float32)).sum(-1)
        norm = trace.clamp_min(0).sqrt()[:, None, None]
        inv = 1.0 / (norm + _EPS)
        return X * inv.to(X.dtype), (G * (inv * inv).to(G.dtype) if need_gram else None)

    def xxt(self, X: torch.Tensor) -> torch.Tensor:
        A = self.gram(X)
        self.gram_sum(A)
        return A

    def square(self, A: torch.Tensor) -> torch.Tensor:
        import torch

        r0, r1 = self.rows
        return self.gather_rows(torch.bmm(A[:, r0:r1], A))

    def poly(self, A: torch.Tensor, b: float, c: float) -> torch.Tensor:
        import torch

        r0, r1 = self.rows
        R = A[:, r0:r1]
        return self.gather_rows(torch.baddbmm(R, R, A, beta=b, alpha=c))


def _iterate(X: torch.Tensor, coeffs: Sequence[Coeffs], refine_steps: int, gram_start: bool,
             products: _WholeProducts | _ColumnProducts) -> torch.Tensor:
    """The iteration on a wide ``(b, s, l)`` batch, s ≤ l (or a column block of one): every
    product that needs the whole matrix goes through ``products``."""
    import torch

    X, A = products.start(X, need_gram=bool(coeffs) or refine_steps > 0)
    for i, (a, b, c) in enumerate(coeffs):
        A = products.xxt(X) if A is None else A
        if i == 0 and gram_start:
            A2 = products.square(A)
            # s = (Σσ⁸)^⅛ ≥ σ_max; X/s, A/s², A²/s⁴ — the first step's own products, rescaled.
            inv = A2.float().norm(dim=(-2, -1), keepdim=True).pow(-0.25).nan_to_num_(0.0, 0.0, 0.0)
            inv2 = inv * inv
            B = (A * (b * inv2).to(A.dtype)).add_(A2 * (c * inv2 * inv2).to(A.dtype))
            X = X * inv.to(X.dtype)
        else:
            B = products.poly(A, b, c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
        A = None
    c1, c3 = CUBIC_COEFFS
    for _ in range(refine_steps):
        X = torch.baddbmm(X, products.xxt(X) if A is None else A, X, beta=c1, alpha=c3)
        A = None
    return X


def newton_schulz_reference(x: torch.Tensor, steps: int = DEFAULT_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Muon's textbook loop (unfused elementwise updates, full products, Frobenius start): the
    baseline :func:`newton_schulz` is tested and benchmarked against. ``(..., m, n)`` → same."""
    out_dtype, dtype = x.dtype, dtype or default_ns_dtype(x)
    tall = x.size(-2) > x.size(-1)
    X = (x.mT if tall else x).to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + _EPS)
    a, b, c = QUINTIC_COEFFS
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.mT if tall else X).to(out_dtype).contiguous()


@functools.cache
def _compiled(backend: str) -> Callable[..., torch.Tensor]:
    import torch

    return torch.compile(_iterate, backend=backend, fullgraph=True, dynamic=False)


def newton_schulz_flops(m: int, n: int, steps: int = DEFAULT_STEPS, refine_steps: int = 0, symmetric: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of :func:`newton_schulz` on one ``m × n`` matrix.

    With s = min(m, n), l = max(m, n): a quintic step is X Xᵀ (2s²l), A·A (2s³) and B·X
    (2s²l); a cubic step is X Xᵀ and A·X (4s²l). This is the cost the ownership plan balances.
    ``symmetric=True`` counts the one-triangle products at half (s²l and s³), the tile-level
    saving of :func:`lanton_dist.kernels.symmetric_gram` up to its diagonal tiles.
    """
    s, l = min(m, n), max(m, n)
    if symmetric:
        return steps * (3 * s * s * l + s**3) + refine_steps * 3 * s * s * l
    return steps * (4 * s * s * l + 2 * s**3) + refine_steps * 4 * s * s * l
