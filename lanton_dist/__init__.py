"""lanton_dist: distributed, sharding-aware LANTON (noise-adaptive layerwise learning rates
on top of geometry-aware, Muon-style optimizers)."""
from lanton_dist.config import GroupValues, OptimConfig
from lanton_dist.dmuon import DMuon
from lanton_dist.factory import build_optimizer, param_groups
from lanton_dist.groups import Block, Geometry, ParamSpec, classify_parameters, qkv_blocks, stacked_blocks
from lanton_dist.lanton import LANTON
from lanton_dist.lmo import LMOConfig

__all__ = [
    "LANTON", "DMuon", "OptimConfig", "GroupValues", "LMOConfig", "Geometry", "ParamSpec", "Block",
    "build_optimizer", "param_groups", "classify_parameters", "qkv_blocks", "stacked_blocks",
]
