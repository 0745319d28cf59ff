"""The sharding engine: LANTON over data-parallel ranks (torch.distributed only, no framework).

* :mod:`.ownership`  — which rank owns (runs Newton–Schulz and the nuclear norm for) each matrix.
* :mod:`.meter`      — every collective issued, with its bytes, phase and group.
* :mod:`.layout`     — the owner-aligned flat bucket layout (ZeRO-1/2 with whole matrices on owners).
* :mod:`.buckets`    — the engine's two flat buffers (parameters and ``p.grad`` are views of them),
  backward-hook reduce-scatters and in-flight all-gathers.
* :mod:`.core`       — the optimizer math over this rank's pieces, and its state dict; adapters reuse it.
* :mod:`.device_lists` — the step's small host lists (indices, per-layer constants) kept on the device.
* :mod:`.optimizer`  — :class:`ShardedOptimizer`, the base of every front end, and
  :class:`PieceOptimizer`, the framework adapters' base.
* :mod:`.exchange`   — :class:`AllToAllExchange`: pieces of hidden matrices to their owners and back.
* :mod:`.phases`     — the phases a step announces (``record_function`` + :func:`subscribe`).
* :mod:`.zero`       — :class:`ShardedLANTON`, the data-parallel engine.
* :mod:`.checkpoint` — sharded save/load with ``torch.distributed.checkpoint``, reshardable.

The names below are loaded on first access (PEP 562): importing the pure-Python submodules
(``ownership``, ``layout``, ``meter.sent_bytes``) does not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lanton_dist.lazy import lazy_exports

if TYPE_CHECKING:
    from lanton_dist.engine.core import LocalExchange, LocalPiece, MatrixExchange, ShardedCore
    from lanton_dist.engine.exchange import AllToAllExchange
    from lanton_dist.engine.meter import Collectives, CommMeter
    from lanton_dist.engine.optimizer import DEFAULTS, PieceOptimizer, ShardedOptimizer
    from lanton_dist.engine.ownership import OwnershipPlan, plan_ownership
    from lanton_dist.engine.phases import subscribe
    from lanton_dist.engine.zero import ShardedLANTON, build_sharded_optimizer

#: public name -> the submodule that defines it.
_LAZY: dict[str, str] = {
    "LocalExchange": "lanton_dist.engine.core", "LocalPiece": "lanton_dist.engine.core",
    "MatrixExchange": "lanton_dist.engine.core", "ShardedCore": "lanton_dist.engine.core",
    "Collectives": "lanton_dist.engine.meter", "CommMeter": "lanton_dist.engine.meter",
    "AllToAllExchange": "lanton_dist.engine.exchange", "DEFAULTS": "lanton_dist.engine.optimizer",
    "PieceOptimizer": "lanton_dist.engine.optimizer", "ShardedOptimizer": "lanton_dist.engine.optimizer",
    "subscribe": "lanton_dist.engine.phases",
    "OwnershipPlan": "lanton_dist.engine.ownership", "plan_ownership": "lanton_dist.engine.ownership",
    "ShardedLANTON": "lanton_dist.engine.zero", "build_sharded_optimizer": "lanton_dist.engine.zero",
}
#: submodules an eager ``import lanton_dist.engine`` used to load, still reachable as attributes.
_SUBMODULES = frozenset({"core", "layout", "meter", "ownership", "zero", "optimizer", "exchange", "phases"})

__all__ = ["CommMeter", "Collectives", "OwnershipPlan", "plan_ownership", "ShardedLANTON", "build_sharded_optimizer", "ShardedCore",
           "LocalPiece", "MatrixExchange", "LocalExchange", "AllToAllExchange", "DEFAULTS", "PieceOptimizer",
           "ShardedOptimizer", "subscribe"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, _SUBMODULES)
