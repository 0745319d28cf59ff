"""LANTON (and Scion, D-Muon, AdamW) in torchtitan (0.3.0): an ``OptimizersContainer`` its
configuration can name, over :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2`.

torchtitan builds the optimizer from ``Trainer.Config.optimizer`` (``config.optimizer.build(
model_parts=...)``) after parallelising the model (FSDP2, HSDP, FSDP × TP: every mesh
:class:`LANTONFSDP2` supports), steps it with ``step()`` / ``zero_grad()``, schedules the rate
through each inner optimizer's ``param_groups`` (``LRSchedulersContainer``) and checkpoints it
as a ``Stateful`` in its DCP checkpoint (``CheckpointManager``). Usage in a config registry::

    from lanton_dist.config import OptimConfig
    from lanton_dist.integrations.torchtitan import LANTONOptimizersContainer

    optimizer=LANTONOptimizersContainer.Config(lanton=OptimConfig(name="lanton", estimate_every=10))

``state_dict()`` is DCP-native, so checkpoints reshard across FSDP/HSDP sizes: under
``lanton/state/<param>/<key>``, a hidden matrix's state (held whole by its owner,
:mod:`lanton_dist.engine.core`) is a plain tensor of the parameter's shape on the owner alone,
and every other per-element state tensor is a DTensor with the parameter's mesh and placements
(its local block is this rank's piece); the replicated scalars (step, trackers, rate factors,
per-parameter step counts, learning rates) are plain tensors under ``lanton/meta/...``. Every
key the algorithm can hold is always present on the rank that holds it (zeros where the state
does not exist yet), with a replicated presence table, so the template torchtitan hands to
``dcp.load`` matches the checkpoint before the first step. A checkpoint whose hidden-matrix
state was saved as DTensors (each rank its piece) loads too: DCP assembles the owner's whole
tensor from those shards.

Not supported: pipeline parallelism (one model part; LANTON's group-wide rate anchor spans
the whole model) and torchtitan's ``param_groups`` (LANTON groups parameters by geometry).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.optimizer import OptimizersContainer

from lanton_dist.config import OptimConfig
from lanton_dist.groups import Geometry
from lanton_dist.integrations.fsdp2 import LANTONFSDP2

#: Prefixes of this container's keys in torchtitan's checkpoint.
_STATE, _META = "lanton/state/", "lanton/meta/"


class LANTONOptimizersContainer(OptimizersContainer):
    """torchtitan's optimizer container holding one :class:`LANTONFSDP2` (see module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        lanton: OptimConfig = field(default_factory=OptimConfig)
        """The algorithm and its hyper-parameters (``OptimConfig.name``: lanton/scion/dmuon/adamw)."""

        bucket_mb: float = 25.0
        """All-to-all bucket size (see :class:`~lanton_dist.engine.exchange.AllToAllExchange`)."""

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if len(model_parts) != 1:
            raise ValueError(f"LANTON needs the whole model in one part, got {len(model_parts)} (pipeline parallelism "
                             "is not supported: the group-wide rate anchor spans every layer)")
        if config.param_groups:
            raise ValueError("LANTONOptimizersContainer groups parameters by geometry; leave param_groups empty "
                             "(set the hyper-parameters in config.lanton)")
        self.model_parts = model_parts
        self.optimizers = [LANTONFSDP2(model_parts[0], config.lanton, bucket_mb=config.bucket_mb)]
        params = [p for g in self.optimizers[0].param_groups for p in g["params"]]
        self._validate_params(params)
        self._specs = {s.name: s for s in self.optimizers[0].specs}
        self._post_init(params)

    @property
    def _lanton(self) -> LANTONFSDP2:
        return self.optimizers[0]

    def _slot(self, name: str) -> tuple[int, int, bool] | None:
        """Where this rank holds ``name``'s state: ``(0, numel, True)`` on the owner of an
        owner-held matrix, ``(start, stop, False)`` for a piece of elementwise state, ``None``
        for a matrix owned elsewhere (no state here)."""
        opt = self._lanton
        spec = self._specs[name]
        if not opt.core.owner_held(spec):
            return (*opt.held[name][opt.rank], False)
        return (0, spec.numel, True) if opt.plan.owner[name] == opt.rank else None

    def _schema(self) -> list[tuple[str, str]]:
        """``(parameter, key)`` of every per-element state tensor the algorithm can hold."""
        opt = self._lanton
        core = opt.core
        keys: list[tuple[str, str]] = []
        for s in opt.specs:
            if opt.algorithm in ("lanton", "scion"):
                names = ["momentum"] + (["prev_grad"] if core.noise_adaptive and core.option == "I" else [])
            elif opt.algorithm == "dmuon" and s.geometry is Geometry.HIDDEN:
                names = ["momentum"]
            else:
                names = ["exp_avg", "exp_avg_sq"]
            keys.extend((s.name, k) for k in names)
        return keys

    def state_dict(self) -> dict[str, Any]:
        opt = self._lanton
        local = opt.local_state_dict()["lanton_core"]  # finishes a variance reduction in flight
        schema = self._schema()
        present = torch.zeros(len(schema), dtype=torch.float64)
        sd: dict[str, Any] = {}
        for j, (name, key) in enumerate(schema):
            slot = self._slot(name)
            if slot is None:
                continue
            a, b, whole = slot
            value = local["state"].get(f"{name}|{a}|{b}", {}).get(key)
            present[j] = value is not None
            sd[f"{_STATE}{name}/{key}"] = opt.as_whole(name, value) if whole else opt.as_dtensor(name, value)
        unknown = {k for st in local["state"].values() for k in st} - {k for _, k in schema}
        if unknown:
            raise RuntimeError(f"optimizer state keys {sorted(unknown)} are not in the checkpoint schema")
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=opt.coll.group)
        sd.update({f"{_META}{k}": torch.as_tensor(local[k]).clone() for k in ("t", "skipped", "H", "F", "E", "steps")})
        sd[f"{_META}present"] = present
        sd[f"{_META}lr"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        opt = self._lanton
        schema = self._schema()
        present = state_dict[f"{_META}present"]
        if present.numel() != len(schema):
            raise ValueError(f"checkpoint has {present.numel()} optimizer state entries, {type(self).__name__} "
                             f"for {opt.algorithm} expects {len(schema)} (another algorithm or model?)")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for j, (name, key) in enumerate(schema):
            slot = self._slot(name)
            if slot is None:
                continue
            a, b, whole = slot
            entry = state.setdefault(f"{name}|{a}|{b}", {})
            if present[j] > 0:
                value = state_dict[f"{_STATE}{name}/{key}"]
                entry[key] = (value if whole else value.to_local()).reshape(-1)
        meta = {k: state_dict[f"{_META}{k}"] for k in ("t", "skipped", "H", "F", "E", "steps")}
        core = dict(meta, state={k: v for k, v in state.items() if v}, world=opt.world, rank=opt.rank,
                    ranges=opt.ranges)
        lrs = state_dict[f"{_META}lr"].tolist()
        opt.load_local_state_dict({"lanton_core": core, "param_groups": [{"lr": lr} for lr in lrs]})
