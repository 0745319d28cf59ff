"""How each training stack is built, given gradients and measured on a meta model in a fake world.

A :class:`Stack` is what :func:`lanton_dist.rehearsal.driver.run_rank` needs of one
``parallel.backend``: ``build`` the real optimizer as training does, ``backward`` (give every
parameter a gradient; values are not modelled), and ``held`` (bytes by kind after a step).

* :class:`EngineStack` (``zero``): :func:`lanton_dist.engine.build_sharded_optimizer` with
  ``overlap_grad_reduce=True`` as :func:`lanton_dist.backends.setup_distributed_backend`; one
  real backward of ``Σ p.sum()`` fires every gradient hook (bucket launches, early owner steps).
* :class:`FSDP2Stack` (``fsdp2``): ``fully_shard`` refuses meta parameters, so FSDP2 itself does
  not run. Instead every parameter becomes the DTensor ``Shard(0)`` over a 1-D mesh that
  ``fully_shard`` would make (torch's own local-shape rule), each step's gradients are such
  synthesised shards (what FSDP2's reduce-scatter leaves), and the real
  :class:`~lanton_dist.integrations.fsdp2.LANTONFSDP2` — its all-to-all exchange and the core —
  is built and stepped on them. Not covered: FSDP2's own all-gathers/reduce-scatters
  (``fsdp_*`` phases, a planner model) and their buffers, the presence hooks (installed by
  FSDP modules' forward), HSDP and FSDP × TP meshes.
  The fake backend's ``all_gather_object`` would hand the adapter W copies of this rank's block
  layout; :func:`peer_blocks` supplies each rank's own (its mesh coordinate in torch's rule).
* :class:`MegatronStack` (``megatron``): Megatron-core's GPT of this rank's stage and TP shard
  on meta, and the engine with its TP exchange (``build_megatron_optimizer``); every stage's
  logical parameter list supplied to the engine's job-wide gather (:meth:`MegatronStack.stage_specs`).

:func:`stack_for` picks the stack of a config; :attr:`Stack.note` says what of it is not run.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lanton_dist.config import RunConfig
from lanton_dist.engine.meter import CommMeter
from lanton_dist.groups import ParamSpec


def storage_bytes(tensors: Any) -> dict[int, int]:
    """``{storage id: bytes}`` of distinct storages (meta storages have no data pointer: the id
    of the storage itself, shared by views)."""
    out = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            out[st._cdata] = st.nbytes()
    return out


def reachable_bytes(root: Any, skip: set[int], skip_storages: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through attributes, dicts
    and sequences of lanton_dist objects (objects in ``skip`` and storages in
    ``skip_storages`` left out; a DTensor counts as its local tensor)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        x = stack.pop()
        if id(x) in seen or id(x) in skip:
            continue
        seen.add(id(x))
        local = getattr(x, "_local_tensor", None)   # a DTensor: its bytes are its local tensor's
        if isinstance(local, torch.Tensor):
            stack.append(local)
        elif isinstance(x, torch.Tensor):
            storages.update({k: v for k, v in storage_bytes([x]).items() if k not in skip_storages})
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type) and type(x).__module__.startswith(("lanton_dist", "collections")):
            stack += list(vars(x).values())
    return sum(storages.values())


def core_state_bytes(core: Any) -> tuple[int, int]:
    """(state bytes without Option I's ``prev_grad``, plus the trackers ``H``, ``F``; ``prev_grad`` bytes)."""
    state = sum(t.untyped_storage().nbytes() for st in core.state.values() for k, t in st.items() if k != "prev_grad")
    prev = sum(t.untyped_storage().nbytes() for st in core.state.values() for k, t in st.items() if k == "prev_grad")
    return state + core.H.untyped_storage().nbytes() + core.F.untyped_storage().nbytes(), prev


class Stack:
    """One training stack on a meta model (module doc). ``strategy``: its planner strategy."""

    strategy = ""
    note = ""                                          # what of this stack the rehearsal does not run
    peers: Callable[[Any, int], Any] | None = None

    def check(self, cfg: RunConfig, world: int) -> None:
        """``ValueError`` if ``cfg`` cannot run on ``world`` ranks (checked before any rank runs)."""

    def make_model(self, cfg: RunConfig) -> nn.Module:
        """This rank's model on ``meta`` (the fake world is initialised)."""
        from lanton_dist.rehearsal.fakeworld import meta_model

        return meta_model(cfg.model)

    def position(self, world: int) -> tuple[int, int, int]:
        """This rank's (pipeline stage, data-parallel rank, tensor-parallel rank)."""
        return 0, dist.get_rank(), 0

    def build(self, cfg: RunConfig, model: nn.Module, meter: CommMeter) -> Any:
        raise NotImplementedError

    def backward(self, model: nn.Module) -> None:
        raise NotImplementedError

    def grad_storages(self, model: nn.Module, opt: Any) -> dict[int, int]:
        """Gradient storages right after backward."""
        raise NotImplementedError

    def param_storages(self, model: nn.Module, opt: Any) -> dict[int, int]:
        raise NotImplementedError

    def held(self, opt: Any, model: nn.Module, grads: dict[int, int]) -> dict[str, int]:
        """Bytes after a step: ``parameters``, ``gradients`` (``grads``, measured after
        backward), ``buffers`` (any other storage the optimizer reaches, the core apart),
        ``state`` (:func:`core_state_bytes`) and ``prev_grad``."""
        params = self.param_storages(model, opt)
        state, prev = core_state_bytes(opt.core)
        return {"parameters": sum(params.values()), "gradients": sum(grads.values()),
                "buffers": reachable_bytes(opt, {id(opt.core)}, set(params) | set(grads)), "state": state, "prev_grad": prev}


class EngineStack(Stack):
    """The ZeRO engine (module doc)."""

    strategy = "zero2"
    note = "gradients come from one backward of Σ p.sum() (every parameter gets one; the hooks fire in reverse order)"

    def build(self, cfg: RunConfig, model: nn.Module, meter: CommMeter) -> Any:
        from lanton_dist.engine import build_sharded_optimizer

        return build_sharded_optimizer(model, cfg.optim, bucket_mb=cfg.parallel.bucket_mb, overlap=cfg.parallel.overlap,
                                       meter=meter, overlap_grad_reduce=True)

    def backward(self, model: nn.Module) -> None:
        sum(p.sum() for p in model.parameters()).backward()

    def grad_storages(self, model: nn.Module, opt: Any) -> dict[int, int]:
        return storage_bytes([p.grad for p in model.parameters()]) | storage_bytes([opt.storage.grad_buffer])

    def param_storages(self, model: nn.Module, opt: Any) -> dict[int, int]:
        return storage_bytes([*model.parameters(), opt.storage.param_buffer])


def _shard_rule(mesh: Any) -> Callable[[torch.Size, int], tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(global shape, rank) → (local shape, global offset)`` of a ``Shard(0)`` DTensor on the
    1-D ``mesh``, torch's rule at that rank's coordinate."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    def rule(shape: torch.Size, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        local, offset = _compute_local_shape_and_global_offset(shape, mesh.shape, [rank], [Shard(0)])
        return tuple(local), tuple(offset)

    return rule


def peer_blocks(params: list[torch.Tensor], mesh: Any) -> Callable[[Any, int], Any]:
    """For the adapter's one construction-time ``all_gather_object`` of ``[(offset, shape)]``
    per parameter: rank ``q``'s contribution, computed as rank ``q`` computes it."""
    rule = _shard_rule(mesh)

    def blocks(q: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(rule(p.shape, q)[1], rule(p.shape, q)[0]) for p in params]

    def contribution(mine: Any, q: int) -> Any:
        return blocks(q) if mine == blocks(dist.get_rank()) else None

    return contribution


class FSDP2Stack(Stack):
    """LANTONFSDP2 on synthesised FSDP2 shards (module doc)."""

    strategy = "fsdp2"
    note = ("FSDP2 itself does not run (fully_shard refuses meta parameters): parameters and gradients are synthesised "
            "Shard(0) DTensor shards; FSDP2's own all-gathers/reduce-scatters (fsdp_* phases), their buffers (hence the "
            "peak), its presence hooks, HSDP and FSDP x TP are not rehearsed")

    def __init__(self) -> None:
        self.mesh: Any = None
        self.peers: Callable[[Any, int], Any] | None = None

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        local, _ = _shard_rule(self.mesh)(t.shape, self.mesh.get_local_rank())
        return DTensor.from_local(torch.empty(local, device="meta", dtype=t.dtype), self.mesh, [Shard(0)], run_check=False,
                                  shape=t.shape, stride=t.stride())

    def build(self, cfg: RunConfig, model: nn.Module, meter: CommMeter) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        from lanton_dist.factory import param_groups
        from lanton_dist.integrations.fsdp2 import build_fsdp2_optimizer

        self.mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(self._shard(p.detach()), requires_grad=p.requires_grad))
        groups = param_groups(model, cfg.optim)
        self.peers = peer_blocks([p for g in groups for p in g["params"]], self.mesh)
        return build_fsdp2_optimizer(model, cfg.optim, bucket_mb=cfg.parallel.bucket_mb, overlap=cfg.parallel.overlap,
                                     meter=meter, groups=groups)

    def backward(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.grad = self._shard(p.detach())

    def grad_storages(self, model: nn.Module, opt: Any) -> dict[int, int]:
        return storage_bytes([p.grad.to_local() for p in model.parameters() if p.grad is not None])

    def param_storages(self, model: nn.Module, opt: Any) -> dict[int, int]:
        return storage_bytes([p.to_local() for p in model.parameters()])


_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


class MegatronStack(EngineStack):
    """:func:`lanton_dist.integrations.megatron.build_megatron_optimizer` on Megatron-core's GPT
    model of this rank's pipeline stage and TP shard, built on ``meta`` with Megatron's parallel
    state over the fake world (its CPU shim, :mod:`lanton_dist.integrations.megatron_cpu`).

    The engine gathers every stage's logical parameter list once (``all_gather_object``):
    :meth:`stage_specs` gives each rank's as that rank computes it — this stage's layers
    renumbered, the embedding on the first stage, the final norm and output layer on the last
    (their specs from a meta model holding both ends)."""

    note = ("Megatron's forward, backward and pipeline sends are not run or metered; gradients come from one backward "
            "of Σ p.sum() over the stage's parameters")

    def check(self, cfg: RunConfig, world: int) -> None:
        from lanton_dist.integrations.megatron_model import check_parallel_layout

        check_parallel_layout(cfg, world)

    def make_model(self, cfg: RunConfig) -> nn.Module:
        from lanton_dist.integrations import megatron_cpu
        from lanton_dist.integrations.megatron_model import build_gpt_model, initialize_model_parallel, logical_param_specs

        if not torch.cuda.is_available():
            megatron_cpu.install()
        initialize_model_parallel(cfg)
        self.tp, self.pp = cfg.parallel.tp, cfg.parallel.pp
        self.per_stage = cfg.model.n_layers // self.pp
        with torch.device("meta"):
            model = build_gpt_model(cfg)
            ends = build_gpt_model(cfg, pre_process=True, post_process=True) if self.pp > 1 else model
        self.ends = [i.spec for i in logical_param_specs(ends, cfg).values() if not _LAYER.match(i.spec.name)]
        self.peers = self.stage_specs
        return model

    def position(self, world: int) -> tuple[int, int, int]:
        from megatron.core import parallel_state as ps

        return (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())

    def build(self, cfg: RunConfig, model: nn.Module, meter: CommMeter) -> Any:
        from lanton_dist.integrations.megatron import build_megatron_optimizer

        return build_megatron_optimizer(model, cfg, meter=meter)

    def stage_specs(self, mine: Any, q: int) -> Any:
        """Rank ``q``'s logical parameter list, given this rank's ``mine`` (None: not that call)."""
        if not (isinstance(mine, list) and mine and all(isinstance(x, ParamSpec) for x in mine)
                and any(_LAYER.match(x.name) for x in mine)):
            return None
        stage, mine_stage = q // (dist.get_world_size() // self.pp), dist.get_rank() // (dist.get_world_size() // self.pp)
        shift = (stage - mine_stage) * self.per_stage
        out = []
        for x in mine:
            m = _LAYER.match(x.name)
            if m:
                name = f"{m.group(1)}{int(m.group(2)) + shift}{m.group(3)}"
                out.append(replace(x, name=name, blocks=tuple(replace(b, name=b.name.replace(x.name, name))
                                                                for b in x.blocks)))
        first = [x for x in self.ends if x.name.startswith("embedding.")]
        last = [x for x in self.ends if not x.name.startswith("embedding.")]
        return (first if stage == 0 else []) + out + (last if stage == self.pp - 1 else [])


STACKS: dict[str, type[Stack]] = {"zero": EngineStack, "fsdp2": FSDP2Stack, "megatron": MegatronStack}


def stack_for(cfg: RunConfig) -> Stack:
    """The :class:`Stack` of ``cfg.parallel.backend`` (``ValueError`` for one not rehearsed)."""
    if cfg.parallel.backend not in STACKS:
        raise ValueError(f"parallel.backend {cfg.parallel.backend!r} is not rehearsed yet; rehearsed: {', '.join(STACKS)} "
                         "(override it, e.g. --parallel.backend=zero)")
    return STACKS[cfg.parallel.backend]()
