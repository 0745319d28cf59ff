"""The sharding engine: LANTON over data-parallel ranks (torch.distributed only, no framework).

* :mod:`.ownership`  — which rank owns (runs Newton–Schulz and the nuclear norm for) each matrix.
* :mod:`.meter`      — every collective issued, with its bytes, phase and group.
* :mod:`.layout`     — the owner-aligned flat bucket layout (ZeRO-1/2 with whole matrices on owners).
* :mod:`.core`       — the optimizer math over this rank's pieces; adapters reuse it.
* :mod:`.zero`       — :class:`ShardedLANTON`, the data-parallel engine.
* :mod:`.checkpoint` — sharded save/load with ``torch.distributed.checkpoint``, reshardable.
"""
from lanton_dist.engine.core import LocalExchange, LocalPiece, MatrixExchange, ShardedCore
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.engine.ownership import OwnershipPlan, plan_ownership
from lanton_dist.engine.zero import ShardedLANTON, build_sharded_optimizer

__all__ = ["CommMeter", "Collectives", "OwnershipPlan", "plan_ownership", "ShardedLANTON", "build_sharded_optimizer", "ShardedCore",
           "LocalPiece", "MatrixExchange", "LocalExchange"]
