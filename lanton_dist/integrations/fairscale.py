"""LANTON (and Scion, D-Muon, AdamW) under fairscale's OSS (``fairscale.optim.OSS``, ZeRO-1).

Verified with fairscale 0.4.13 on torch 2.13 (CPU, gloo): OSS constructs, steps,
broadcasts and consolidates state. OSS shards optimizer state by **whole parameters**
(greedy by numel over the ranks) and builds the wrapped optimizer on each rank with only
that rank's parameters; after its ``step`` it broadcasts every parameter from its owner.
That is an owner scheme already: each hidden matrix's Newton–Schulz and nuclear norm run on
its OSS owner, with no tensor traffic at all (the
:class:`~lanton_dist.engine.exchange.AllToAllExchange` sees every piece on its owner and
posts no collective). The ownership is OSS's numel-greedy one, not the FLOP-balanced plan.
What LANTON adds is the scalar all-reduces (skip vote, vector norms, variance); the
gradients must be averaged by the caller (``DistributedDataParallel`` or fairscale's
``ShardedDataParallel``), as with any OSS optimizer.

Usage::

    model = DistributedDataParallel(model)                   # or ShardedDataParallel
    opt = lanton_oss(model.module, OptimConfig(...))         # a fairscale OSS instance
    loss.backward(); opt.step(); opt.zero_grad()
    opt.consolidate_state_dict(0); sd = opt.state_dict()     # OSS's own checkpoint path (rank 0)
    opt.load_state_dict(sd)                                  # on every rank, before the next step

Checkpoints go through OSS's torch-format state dict: each owned parameter's LANTON state
(momentum, previous gradient, Adam moments) is its per-parameter state, and the replicated
step counter, trackers H, rate factors, "estimated" mask and per-parameter step counts ride along in every owned parameter's entry
(``lanton_meta``); after ``OSS.load_state_dict`` the next step restores them on every rank
(one all-reduce). The variance all-reduce is overlapped (consumed one step late) but the owners'
nuclear norms are computed in the step: OSS gathers state rank by rank, so its ``state_dict``
must not post a collective. Option II is not supported (the half-batch gradients would need their own
reduction hook); use Option I.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lanton_dist.engine.agree import collective_device, params_device
from lanton_dist.engine.core import LocalPiece
from lanton_dist.engine.ownership import OwnershipPlan
from lanton_dist.engine.optimizer import PieceOptimizer
from lanton_dist.engine.ranges import whole_ranges
from lanton_dist.lanton import run_closure

_META = "lanton_meta"


class LANTONOSSShard(PieceOptimizer):
    """The optimizer OSS builds on each rank (its ``optim=``); use :func:`lanton_oss`.

    Args:
        params: the param groups OSS hands this rank: this rank's parameters under ``params``;
            every group still carries the model's full ``specs`` list (OSS copies the groups), and
            every parameter its spec name as ``_lanton_name`` (set by :func:`lanton_oss`), so
            the core sees every layer of the model.
        cfg: :class:`~lanton_dist.config.OptimConfig`.
        group: OSS's process group (``None``: world).
        meter, overlap: see :class:`~lanton_dist.engine.optimizer.PieceOptimizer`.
    """

    def __init__(self, params, cfg=None, group: dist.ProcessGroup | None = None, meter=None,
                 overlap: bool = True) -> None:
        from lanton_dist.factory import hyper_parameters, lanton_options

        if cfg is None:
            raise ValueError("LANTONOSSShard needs cfg=OptimConfig(...): build it with lanton_oss(model, cfg)")
        if cfg.name == "lanton" and cfg.option == "II":
            raise ValueError("Option II is not supported under fairscale OSS; use option='I'")
        local_groups = list(params)
        mine: dict[str, torch.Tensor] = {}
        for g in local_groups:
            for p in g["params"]:
                if not hasattr(p, "_lanton_name"):
                    raise ValueError("OSS handed over a parameter without a LANTON spec: build the optimizer with "
                                     "lanton_oss(model, cfg)")
                mine[p._lanton_name] = p
        # Every parameter of the model, this rank's as themselves and the others as meta
        # placeholders (no memory), so the core's layer list is the whole model's.
        full = [dict({k: v for k, v in g.items() if k != "params"},
                     params=[mine.get(s.name, torch.empty(s.shape, device="meta")) for s in g["specs"]])
                for g in local_groups]
        # defer_variance=False: OSS calls state_dict() on one rank at a time while the others wait in
        # a broadcast, so finishing the variance there must not post a collective (the overlapped
        # all-reduce is already posted; waiting for it is local). With whole parameters on their
        # owners there is no gather to defer anyway.
        super().__init__(full, cfg.name, process_group=group, meter=meter, overlap=overlap, defer_variance=False,
                         **lanton_options(cfg), **hyper_parameters(cfg))
        self._mine = mine
        owner = self._oss_owners(mine)
        numel = [0] * self.world
        for s in self.specs:
            numel[owner[s.name]] += s.numel
        hidden = {s.name for s in self.specs if s.geometry.value == "hidden"}
        plan = OwnershipPlan(self.world, {n: r for n, r in owner.items() if n in hidden}, (0,) * self.world, tuple(numel))
        dtype = next(iter(mine.values())).dtype if mine else torch.float32
        self._setup({s.name: whole_ranges(s.numel, owner[s.name], self.world) for s in self.specs}, dtype, plan)
        self._empty = torch.empty(0, dtype=dtype)
        self._first = True
        # OSS expects its wrapped optimizer to list this rank's parameters only.
        for g, lg in zip(self.param_groups, local_groups):
            g["params"] = list(lg["params"])

    def _oss_owners(self, mine: dict[str, torch.Tensor]) -> dict[str, int]:
        """The OSS owner of every parameter: ONE SUM all-reduce of two int64 per parameter (how
        many ranks hold it, and their rank + 1) — O(parameters) bytes per rank, none per rank
        of the group. Raises unless each parameter has exactly one owner."""
        device = collective_device(params_device(mine.values()), self.coll.group)
        held = torch.tensor([[1, self.rank + 1] if s.name in mine else [0, 0] for s in self.specs],
                            dtype=torch.int64, device=device).reshape(-1, 2)
        dist.all_reduce(held, group=self.coll.group)
        owner = {}
        for s, (count, rank1) in zip(self.specs, held.tolist()):
            if count != 1:
                raise ValueError(f"OSS assigned {s.name} to {count} ranks (each parameter needs exactly one)")
            owner[s.name] = rank1 - 1
        return owner

    # ------------------------------------------------------------------ pieces
    def _local_pieces(self) -> list[LocalPiece]:
        out = []
        for s, gi in self.named:
            p = self._mine.get(s.name)
            if p is None:
                out.append(self._piece(s, gi, self._empty, None))  # presence is the owner's to report
            else:
                out.append(self._piece(s, gi, p.data.view(-1), None if p.grad is None else p.grad.reshape(-1)))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        self._import_loaded_state()
        self._run_core(self._local_pieces())
        return loss

    # ------------------------------------------------------------------ OSS checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch-format state of this rank's parameters (what ``OSS.consolidate_state_dict``
        gathers): per-parameter LANTON state plus the replicated ``lanton_meta``."""
        # finish_variance inside waits for the already-posted all-reduce: no new collective
        sd = self._require_core().state_dict(self._local_pieces())
        meta = {"t": torch.tensor(sd["t"]), "skipped": torch.tensor(sd["skipped"]), "H": sd["H"], "F": sd["F"],
                "E": sd["E"], "steps": sd["steps"], "N": sd["N"], "A": sd["A"]}
        by_name = {name: st for (name, _, _), st in sd["pieces"].items()}
        state, groups, i = {}, [], 0
        for g in self.param_groups:
            idx = []
            for p in g["params"]:
                st = {k: v.clone() for k, v in by_name.get(p._lanton_name, {}).items()}
                st[_META] = meta
                state[i] = st
                idx.append(i)
                i += 1
            groups.append({**{k: v for k, v in g.items() if k not in ("params", "specs", "names")},
                           "params": idx})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Per-rank load (OSS itself fills ``self.state`` instead; both paths meet at the next step)."""
        flat = [p for g in self.param_groups for p in g["params"]]
        for i, st in state_dict["state"].items():
            self.state[flat[int(i)]] = st
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self._first = True

    def _import_loaded_state(self) -> None:
        """Hand state OSS loaded into ``self.state`` to the core; on the first step after
        construction or a load, agree on the replicated scalars across ranks (one MAX all-reduce:
        a rank owning no parameter has no ``lanton_meta`` of its own and sends zeros; every entry
        is ≥ 0 and the ranks that loaded hold the same copy, so the maximum is that copy, bit for
        bit — a mean over the ranks would not be)."""
        core = self._require_core()
        loaded = [(p, st) for p, st in self.state.items() if st]
        if loaded and not self._first:
            raise RuntimeError("OSS loaded optimizer state after training steps on this rank only; call "
                               "load_state_dict on every rank before the next step")
        meta, states = None, {}
        for p, st in loaded:
            meta = st.pop(_META, meta)
            states[p._lanton_name] = st
        self.state.clear()
        if not self._first:
            return
        self._first = False
        L = core.n_layers
        P = len(core.specs)
        G = core.A.numel()
        x = 4 + 3 * L + P  # then: has N, N (L), auto α set (G), auto α (G; unset: 0, every set α is > 0)
        vec = torch.zeros(x + 1 + L + 2 * G, dtype=core.acc_dtype)
        if meta is not None:  # [loaded, t, skipped, H, F, E, has step counts, step counts, …]
            vec[0], vec[1], vec[2] = 1.0, float(meta["t"]), float(meta["skipped"])
            vec[3 : 3 + L], vec[3 + L : 3 + 2 * L] = meta["H"], meta["F"]
            vec[3 + 2 * L : 3 + 3 * L] = meta["E"] if "E" in meta else meta["H"] > 0  # older checkpoints: H > 0
            if "steps" in meta:
                vec[3 + 3 * L], vec[4 + 3 * L : x] = 1.0, meta["steps"]
            if "N" in meta:  # older checkpoints: the core's fallbacks
                vec[x], vec[x + 1 : x + 1 + L] = 1.0, meta["N"]
                A = meta["A"].to(vec.dtype)
                vec[x + 1 + L : x + 1 + L + G] = ~torch.isnan(A)
                vec[x + 1 + L + G :] = torch.nan_to_num(A, nan=0.0)
        self.coll.all_reduce(vec, "finite", op=dist.ReduceOp.MAX).wait()
        if states and meta is None:
            raise ValueError(f"OSS loaded state without {_META!r}: not a LANTONOSSShard state dict")
        if vec[0] > 0:
            pieces = self._local_pieces()
            core.load_state_dict(
                {"t": round(float(vec[1])), "skipped": round(float(vec[2])), "H": vec[3 : 3 + L],
                 "F": vec[3 + L : 3 + 2 * L], "E": vec[3 + 2 * L : 3 + 3 * L] > 0.5,
                 "steps": vec[4 + 3 * L : x].round().long() if vec[3 + 3 * L] > 0.5 else None,
                 "N": vec[x + 1 : x + 1 + L] if vec[x] > 0.5 else None,
                 "A": torch.where(vec[x + 1 + L : x + 1 + L + G] > 0.5, vec[x + 1 + L + G :],
                                  torch.full((G,), float("nan"), dtype=vec.dtype)) if vec[x] > 0.5 else None,
                 "pieces": {(pc.name, pc.start, pc.stop): states[pc.name] for pc in pieces if pc.name in states}},
                pieces)


def lanton_oss(model: nn.Module, cfg, *, group: dist.ProcessGroup | None = None, overlap: bool = True,
               meter=None, **oss_kwargs: Any):
    """A ``fairscale.optim.OSS`` wrapping :class:`LANTONOSSShard` for ``model`` (``cfg.name``:
    lanton/scion/dmuon/adamw; ``overlap``: variance one step late, overlapped). Raises
    ``ImportError`` naming the package if fairscale is absent."""
    try:
        from fairscale.optim import OSS
    except ImportError as exc:  # pragma: no cover - exercised only without fairscale
        raise ImportError("lanton_oss needs fairscale (pip install fairscale==0.4.13)") from exc
    from lanton_dist.factory import param_groups

    groups = param_groups(model, cfg)
    for g in groups:
        for p, spec in zip(g["params"], g["specs"]):
            p._lanton_name = spec.name
    return OSS(
        groups, optim=functools.partial(LANTONOSSShard, cfg=cfg, group=group, overlap=overlap, meter=meter), group=group, **oss_kwargs
    )
