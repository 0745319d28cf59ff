"""Specification of the one-triangle symmetric product (``lanton_dist.kernels``).

On CPU the Triton kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set in a
subprocess before the kernel is built, so the rest of the suite never sees it). Properties:
``symmetric_gram(Y, Z, alpha, beta)`` equals ``alpha·Y Yᵀ + beta·Z`` on shapes that are and are
not multiples of the tile, batched; the output is exactly symmetric; Newton–Schulz with
``symmetric=True`` equals the torch path (Muon and Polar Express + Gram start, wide and tall);
without a Triton backend ``symmetric_gram`` refuses with a clear error and ``triton_usable`` is False.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lanton_dist.kernels import symmetric_gram, triton_usable

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0)")
ROOT = Path(__file__).resolve().parents[1]

INTERPRETED_CHECK = textwrap.dedent("""
    import torch
    from lanton_dist.kernels import symmetric_gram, triton_usable
    from lanton_dist.newton_schulz import newton_schulz, torch_gram

    g = torch.Generator().manual_seed(0)
    assert triton_usable(torch.ones(2, 2))
    for b, s, k in [(1, 5, 7), (2, 33, 20), (3, 16, 16), (1, 40, 70)]:
        Y = torch.randn(b, s, k, generator=g)
        C = symmetric_gram(Y)
        assert torch.equal(C, C.mT), "not exactly symmetric"
        assert torch.allclose(C, Y @ Y.mT, atol=1e-4), (b, s, k, (C - Y @ Y.mT).abs().max())
        Z = torch.randn(b, s, s, generator=g)
        Z = Z + Z.mT
        assert torch.allclose(symmetric_gram(Y, Z, alpha=-0.3, beta=2.0), torch_gram(Y, Z, -0.3, 2.0), atol=1e-4)
    for shape in [(24, 40), (40, 24), (2, 17, 33)]:
        x = torch.randn(*shape, generator=g)
        for kw in ({}, {"schedule": "polar_express", "start": "gram", "steps": 6, "refine_steps": 1}):
            ours, ref = newton_schulz(x, symmetric=True, **kw), newton_schulz(x, **kw)
            assert torch.allclose(ours, ref, atol=1e-4), (shape, kw, (ours - ref).abs().max())
    print("ok")
""")


def test_symmetric_gram_and_ns_equal_the_torch_path_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_without_a_triton_backend_the_kernel_refuses_and_is_not_usable():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available():
        pytest.skip("a Triton backend is available here")
    x = torch.ones(1, 4, 4)
    assert not triton_usable(x)
    with pytest.raises(RuntimeError, match="needs triton"):
        symmetric_gram(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_symmetric_gram_on_gpu_equals_cublas_in_bf16_and_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        Y = torch.randn(2, 300, 700, device="cuda", generator=g).to(dtype)
        ref = (Y.float() @ Y.float().mT)
        assert (symmetric_gram(Y).float() - ref).abs().max() / ref.abs().max() < tol
