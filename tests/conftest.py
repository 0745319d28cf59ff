"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest
import torch
from engine_cases import svd_polar


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny matmuls gain nothing from more, and shared CPUs lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def exact_polar(monkeypatch):
    """Replace the Newton–Schulz kernel inside ``lanton_dist.lmo`` by an exact SVD polar factor."""
    import lanton_dist.lmo as lmo

    monkeypatch.setattr(lmo, "newton_schulz", svd_polar)
