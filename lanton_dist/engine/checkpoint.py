"""Sharded, reshardable checkpoints of the engine's optimizer state with ``torch.distributed.checkpoint``.

Each rank writes only its own pieces: optimizer-state tensor ``key`` of elements
``[start, stop)`` of parameter ``name`` is stored under ``optim/<name>/<key>/<start>_<stop>``
(flattened), so whole matrices are written by their owner alone and elementwise pieces by
whoever holds them. The replicated scalars (step, trackers H, rate factors, the "estimated"
mask E, each parameter's step count, skipped steps) and, optionally, the model's parameters are stored once (DCP
de-duplicates replicated keys).

Loading reads the stored chunk list from the checkpoint's metadata and assembles each local
piece of the *new* layout from the chunks that overlap it, so a checkpoint written on 4
ranks loads on 2 or 3. A pending variance reduction is completed before saving (it would
be waited for at the next step anyway; the result is the same). After loading, parameters
are copied into the engine's buffers on every rank: no rank resumes from stale weights.
Checkpoints written before E and the step counts existed load with E = (H > 0) (a layer whose
tracker is exactly 0 counts as never estimated) and every parameter stepped ``t`` times.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from lanton_dist.engine.core import LocalPiece, ShardedCore

_KEY = re.compile(r"^optim/(?P<name>.+)/(?P<key>[^/]+)/(?P<start>\d+)_(?P<stop>\d+)$")


def core_state_dict(core: ShardedCore, pieces: list[LocalPiece]) -> dict[str, Any]:
    """Flat DCP state dict of ``core``'s state for this rank's ``pieces``."""
    core.finish_variance()
    sd: dict[str, Any] = {
        "meta/t": torch.tensor(core.t),
        "meta/skipped": torch.tensor(core.skipped_steps),
        "meta/H": core.H.clone(),
        "meta/F": core.F.clone(),
        "meta/E": core.E.clone(),
        "meta/steps": core.stepped_counts(),
    }
    for pc in pieces:
        for key, value in core.state.get((pc.name, pc.start), {}).items():
            sd[f"optim/{pc.name}/{key}/{pc.start}_{pc.stop}"] = value.reshape(-1)
    return sd


def load_core_state(core: ShardedCore, pieces: list[LocalPiece], path: str, extra: dict[str, Any] | None = None) -> None:
    """Fill ``core``'s state for this rank's ``pieces`` from the checkpoint at ``path``
    (any world size); ``extra`` entries (e.g. model tensors) are loaded in the same pass."""
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    chunks: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
    for k in meta:
        m = _KEY.match(k)
        if m:
            chunks[m["name"]].append((int(m["start"]), int(m["stop"]), m["key"], k))
    request: dict[str, Any] = {
        "meta/t": torch.tensor(0), "meta/skipped": torch.tensor(0),
        "meta/H": torch.empty_like(core.H), "meta/F": torch.empty_like(core.F),
    }
    if "meta/E" in meta:
        request["meta/E"] = torch.empty_like(core.E)
    if "meta/steps" in meta:
        request["meta/steps"] = torch.empty(len(core.specs), dtype=torch.long)
    wanted: list[tuple[LocalPiece, int, int, str, str]] = []
    for pc in pieces:
        if pc.name not in core.specs:
            continue
        for start, stop, key, k in chunks.get(pc.name, []):
            if start < pc.stop and stop > pc.start:
                if k not in request:
                    request[k] = torch.empty(stop - start, dtype=pc.param.dtype, device=pc.param.device)
                wanted.append((pc, start, stop, key, k))
    if extra:
        request.update(extra)
    dcp.load(request, checkpoint_id=path)
    if request["meta/H"].numel() != core.n_layers:
        raise ValueError(f"checkpoint has {request['meta/H'].numel()} layers, this model has {core.n_layers}")
    core.t, core.skipped_steps = int(request["meta/t"]), int(request["meta/skipped"])
    core.H.copy_(request["meta/H"])
    core.F.copy_(request["meta/F"])
    core.E = request["meta/E"].clone() if "meta/E" in request else core.H > 0  # older checkpoints: H > 0
    core.load_stepped_counts(request.get("meta/steps"))
    core.drop_pending()
    core.state.clear()
    filled: dict[tuple[str, int, str], int] = defaultdict(int)
    for pc, start, stop, key, k in wanted:
        st = core.state_of(pc)
        if key not in st:
            st[key] = torch.zeros_like(pc.param)
        lo, hi = max(start, pc.start), min(stop, pc.stop)
        st[key][lo - pc.start : hi - pc.start].copy_(request[k][lo - start : hi - start])
        filled[(pc.name, pc.start, key)] += hi - lo
    for (name, start, key), n in filled.items():
        pc = next(p for p in pieces if p.name == name and p.start == start)
        if n != pc.stop - pc.start:
            raise ValueError(f"checkpoint covers {n} of {pc.stop - pc.start} elements of {name}/{key}")


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model/{k}": v for k, v in model.state_dict().items()}


def save(optimizer, path: str, model: nn.Module | None = None, extra: dict[str, Any] | None = None) -> None:
    """Save a :class:`~lanton_dist.engine.ShardedLANTON` (and a replicated ``model``, and
    ``extra`` tensors such as tensor-parallel shards under rank-specific keys) to ``path``.
    Collective over the whole job."""
    sd = core_state_dict(optimizer.core, optimizer.pieces)
    sd["meta/lr"] = torch.tensor([g["lr"] for g in optimizer.param_groups], dtype=torch.float64)
    if model is not None:
        sd.update(model_tensors(model))
    sd.update(extra or {})
    dcp.save(sd, checkpoint_id=path)


def load(optimizer, path: str, model: nn.Module | None = None, extra: dict[str, Any] | None = None) -> None:
    """Load into a :class:`~lanton_dist.engine.ShardedLANTON` built for any data-parallel size;
    ``extra`` is filled in place: tensors are copied into, and non-tensor values must sit in a
    nested dict (``{"loop": {"rank0": None}}``) — DCP sets those inside nested dicts only. With ``model`` the parameters are
    restored and copied into the engine; otherwise call ``optimizer.sync_from_model()`` after
    restoring them yourself."""
    request = {"meta/lr": torch.zeros(len(optimizer.param_groups), dtype=torch.float64), **(extra or {})}
    if model is not None:
        request.update({k: v.detach().clone() for k, v in model_tensors(model).items()})
    load_core_state(optimizer.core, optimizer.pieces, path, request)
    for g, lr in zip(optimizer.param_groups, request["meta/lr"].tolist()):
        g["lr"] = lr
    if model is not None:
        model.load_state_dict({k[len("model/"):]: v for k, v in request.items() if k.startswith("model/")})
        optimizer.sync_from_model()
