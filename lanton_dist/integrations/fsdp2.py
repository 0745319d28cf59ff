"""LANTON (and Scion, D-Muon, AdamW) on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps every parameter as a DTensor ``Shard(0)`` over a 1-D device mesh: rank r holds
rows ``[r·c, (r+1)·c) ∩ [0, d0)``, ``c = ⌈d0/W⌉`` (uneven and empty shards allowed), and after
``backward`` the gradient is reduce-scattered (averaged) into the same layout. The optimizer
works directly on those local shards:

* momentum, sign/RMS LMOs, AdamW and weight decay are elementwise on the shards; the
  embed_head and vector groups never gather anything (their norms are scalar all-reduces);
* each hidden matrix's shards go to its owner (FLOP-balanced plan) through the bucketed
  :class:`~lanton_dist.engine.exchange.AllToAllExchange` — one all-to-all per bucket
  each way, Newton–Schulz of bucket i overlapping the transfer of bucket i+1 — so every
  Newton–Schulz runs once per matrix per step across the job, and nothing is all-gathered;
* on estimation steps (``defer_variance=True``, the default) the D = G_t − G̃_t all-to-all is
  posted at the end of step t, the owners compute the nuclear norms on a background thread
  while the next forward runs, and step t+1 starts by all-reducing them — the one-step delay
  of the engine's ``overlap=True`` (the reference with ``delay_lr_factor=True``).

Extra traffic over FSDP2+AdamW per step: ≈ 2 × the owned hidden bytes (the all-to-all
optimum), plus D on estimation steps and scalar all-reduces.

Usage::

    for block in model.layers: fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = LANTONFSDP2(model, OptimConfig(...))
    loss.backward(); opt.step(); opt.zero_grad()
    opt.save(path, model) / opt.load(path, model)      # torch.distributed.checkpoint

Parameters without a gradient: FSDP2 leaves ``.grad`` None for a parameter no rank used;
a parameter only some ranks use needs FSDP2's ``model.set_reduce_scatter_unused_params(True)``
(otherwise its reduce-scatters mismatch across ranks), which reduces zeros for the others
and zero-fills the gradient even where no rank used it. Presence is therefore recorded by
a post-accumulate-grad hook on each unsharded parameter (installed by a forward pre-hook of
its FSDP module) and the core skips a parameter no rank had a gradient for.

Process group: the FSDP mesh's (1-D; HSDP or FSDP+TP meshes are refused) unless
``process_group`` is given (it must span the same ranks in the same order).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lanton_dist.engine.checkpoint import model_tensors
from lanton_dist.engine.core import LocalPiece
from lanton_dist.engine.meter import CommMeter
from lanton_dist.engine.optimizer import PieceOptimizer
from lanton_dist.engine.ranges import row_ranges
from lanton_dist.lanton import run_closure


def _dtensor_cls():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


class LANTONFSDP2(PieceOptimizer):
    """The sharded optimizer for an FSDP2 model (see module doc).

    Args:
        model: wrapped with ``fully_shard`` (every trainable parameter a ``Shard(0)`` DTensor).
        cfg: :class:`~lanton_dist.config.OptimConfig` (``cfg.name`` picks the algorithm).
        process_group: default the FSDP mesh's group.
        meter: a :class:`~lanton_dist.engine.meter.CommMeter` (new by default).
        bucket_mb, pad, window: exchange buckets (see :class:`AllToAllExchange`).
        overlap, defer_variance: variance reduction one step late (default), and its gather and
            nuclear norms overlapped with the next forward (default).
        groups: param groups to use instead of ``param_groups(model, cfg)``.
    """

    def __init__(self, model: nn.Module, cfg, *, process_group: dist.ProcessGroup | None = None,
                 meter: CommMeter | None = None, bucket_mb: float = 25.0, pad: bool = False, window: int = 2,
                 overlap: bool = True, defer_variance: bool = True, groups: list[dict[str, Any]] | None = None) -> None:
        from lanton_dist.factory import hyper_parameters, lanton_options, param_groups

        DTensor, Shard = _dtensor_cls()
        groups = groups if groups is not None else param_groups(model, cfg)
        mesh = None
        for g in groups:
            for p, s in zip(g["params"], g["specs"]):
                if not isinstance(p, DTensor):
                    raise ValueError(f"{s.name} is not a DTensor: wrap the model with torch.distributed.fsdp.fully_shard "
                                     "(per block and the root) before building LANTONFSDP2")
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise ValueError(f"{s.name}: placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                                     "LANTONFSDP2 supports plain FSDP2 (Shard(0) on a 1-D mesh), not HSDP/TP/Shard(d>0)")
                if mesh is None:
                    mesh = p.device_mesh
                elif p.device_mesh != mesh:
                    raise ValueError(f"{s.name} lives on another device mesh than the first parameter")
        if mesh is None:
            raise ValueError("the model has no trainable parameters")
        pg = process_group if process_group is not None else mesh.get_group()
        if dist.get_world_size(pg) != mesh.size() or dist.get_rank(pg) != mesh.get_local_rank():
            raise ValueError("process_group must span the FSDP mesh's ranks in mesh order")
        super().__init__(groups, cfg.name, process_group=pg, meter=meter, bucket_mb=bucket_mb, pad=pad, window=window,
                         overlap=overlap, defer_variance=defer_variance, **lanton_options(cfg), **hyper_parameters(cfg))
        self._params = [p for g in self._groups for p in g["params"]]
        ranges = {s.name: row_ranges(s.shape, self.world) for s in self.specs}
        for p, s in zip(self._params, self.specs):
            a, b = ranges[s.name][self.rank]
            if p.to_local().numel() != b - a:
                raise ValueError(f"{s.name}: local shard has {p.to_local().numel()} elements, the torch.chunk row "
                                 f"layout gives {b - a}: unsupported FSDP2 sharding")
        self._setup(ranges, self._params[0].dtype)
        self._seen: set[int] = set()  # parameters with a gradient this step (presence hooks)
        self._hooked: dict[int, int] = {}  # id of an unsharded parameter → its index
        from torch.distributed.fsdp import FSDPModule

        index = {id(p): k for k, p in enumerate(self._params)}
        self._presence_hooks = []
        for fsdp_module in model.modules():
            if isinstance(fsdp_module, FSDPModule):
                owned = [(m, attr, index[id(q)]) for m in fsdp_module.modules()
                         for attr, q in m.named_parameters(recurse=False) if id(q) in index]
                self._presence_hooks.append(fsdp_module.register_forward_pre_hook(functools.partial(self._watch, owned)))

    # ------------------------------------------------------------------ presence
    def _watch(self, params: list[tuple[nn.Module, str, int]], _module: nn.Module, _args: Any) -> None:
        """Forward pre-hook of an FSDP module, after FSDP2's own (which put its parameters'
        unsharded tensors on their modules): hook each unsharded parameter once. Parameters of
        nested FSDP modules are still sharded here; their own module's hook takes them."""
        for module, attr, k in params:
            q = module._parameters.get(attr)
            if q is not None and q is not self._params[k] and q.requires_grad and id(q) not in self._hooked:
                q.register_post_accumulate_grad_hook(functools.partial(self._mark, k))
                self._hooked[id(q)] = k

    def _mark(self, k: int, _param: torch.Tensor) -> None:
        self._seen.add(k)

    def _present(self) -> list[str]:
        """Parameters with a gradient on this rank this step: those whose unsharded parameter
        accumulated one (FSDP2's ``set_reduce_scatter_unused_params(True)`` zero-fills the
        others), plus any with a gradient whose FSDP module never ran a forward here."""
        hooked = set(self._hooked.values())
        return [s.name for k, (p, s) in enumerate(zip(self._params, self.specs))
                if k in self._seen or (k not in hooked and (p.grad is not None or self._has_half(s.name)))]

    # ------------------------------------------------------------------ pieces
    def _local_pieces(self) -> list[LocalPiece]:
        out = []
        for p, (s, gi) in zip(self._params, self.named):
            local = p._local_tensor
            grad = None if p.grad is None else p.grad._local_tensor.reshape(-1)
            out.append(self._piece(s, gi, local.view(-1), grad))
        return out

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(s.name, p) for p, s in zip(self._params, self.specs)]

    def _local_grad(self, p: torch.Tensor) -> torch.Tensor:
        """Option II stash: the (reduce-scattered) local gradient shard, flat."""
        return p.grad._local_tensor.reshape(-1)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        try:
            self._run_core(self._local_pieces(), self._present())
        finally:
            self._seen = set()
        return loss

    def save(self, path: str, model: nn.Module | None = None) -> None:
        """Save optimizer state (and the FSDP2 model's sharded state dict) with
        ``torch.distributed.checkpoint`` to directory ``path``; each rank writes its shards."""
        sd = self.dcp_state_dict()
        if model is not None:
            sd.update(model_tensors(model))
        dcp.save(sd, checkpoint_id=path, process_group=self.coll.group)

    def load(self, path: str, model: nn.Module | None = None) -> None:
        """Load :meth:`save`'s checkpoint (optimizer state reshards to any world size; the model's
        DTensor shards are loaded in place)."""
        extra = {}
        if model is not None:
            extra = {k: v.detach() for k, v in model_tensors(model).items()}
        loaded = self.load_dcp_state(path, extra)
        if model is not None:
            model.load_state_dict({k[len("model/"):]: v for k, v in loaded.items() if k.startswith("model/")})

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("LANTONFSDP2 state is sharded: use opt.save(path, model) (torch.distributed.checkpoint)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("LANTONFSDP2 state is sharded: use opt.load(path, model) (torch.distributed.checkpoint)")


def build_fsdp2_optimizer(model: nn.Module, cfg, **kwargs: Any) -> LANTONFSDP2:
    """:class:`LANTONFSDP2` for ``cfg.name`` (any of lanton/scion/dmuon/adamw)."""
    return LANTONFSDP2(model, cfg, **kwargs)
