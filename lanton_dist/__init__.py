"""lanton_dist: distributed, sharding-aware LANTON (noise-adaptive layerwise learning rates
on top of geometry-aware, Muon-style optimizers).

The names below are loaded on first access (PEP 562), so ``import lanton_dist.plan`` and the
``lanton-dist plan`` command do not import torch; ``from lanton_dist import LANTON`` works as
an eager import would.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lanton_dist.lazy import lazy_exports

if TYPE_CHECKING:
    from lanton_dist.config import GroupValues, OptimConfig
    from lanton_dist.dmuon import DMuon
    from lanton_dist.factory import build_optimizer, param_groups
    from lanton_dist.groups import Block, Geometry, ParamSpec, classify_parameters, qkv_blocks, stacked_blocks
    from lanton_dist.lanton import LANTON
    from lanton_dist.lmo import LMOConfig

#: public name -> the submodule that defines it.
_LAZY: dict[str, str] = {
    "GroupValues": "lanton_dist.config", "OptimConfig": "lanton_dist.config",
    "DMuon": "lanton_dist.dmuon",
    "build_optimizer": "lanton_dist.factory", "param_groups": "lanton_dist.factory",
    "Block": "lanton_dist.groups", "Geometry": "lanton_dist.groups", "ParamSpec": "lanton_dist.groups",
    "classify_parameters": "lanton_dist.groups", "qkv_blocks": "lanton_dist.groups", "stacked_blocks": "lanton_dist.groups",
    "LANTON": "lanton_dist.lanton",
    "LMOConfig": "lanton_dist.lmo",
}
#: submodules an eager ``import lanton_dist`` used to load, still reachable as attributes.
_SUBMODULES = frozenset({"adamw", "config", "dmuon", "factory", "groups", "lanton", "lmo", "newton_schulz", "noise", "nuclear"})

__all__ = [
    "LANTON", "DMuon", "OptimConfig", "GroupValues", "LMOConfig", "Geometry", "ParamSpec", "Block",
    "build_optimizer", "param_groups", "classify_parameters", "qkv_blocks", "stacked_blocks",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, _SUBMODULES)
