"""Sharded, reshardable checkpoints of the engine's optimizer state with ``torch.distributed.checkpoint``.

Each rank writes only the state it holds (:meth:`~lanton_dist.engine.core.ShardedCore.state_slots`):
optimizer-state tensor ``key`` of elements ``[start, stop)`` of parameter ``name`` is stored under
``optim/<name>/<key>/<start>_<stop>`` (flattened), so a hidden matrix's state is written whole
(``0_<numel>``, row-major) by its owner alone and elementwise pieces by whoever holds them. The
replicated scalars (step, trackers H, rate factors, the "estimated" mask E, each parameter's
step count, skipped steps) and, optionally, the model's parameters are stored once (DCP
de-duplicates replicated keys).

Loading reads the stored chunk list from the checkpoint's metadata and assembles each state
slot of the *new* layout (owned matrices whole, elementwise pieces) from the chunks that
overlap it, so a checkpoint written on 4 ranks loads on 2 or 3, and one written when every
rank kept its piece of a hidden matrix's state loads into that matrix's owner. A pending
variance reduction is completed before saving (it would be waited for at the next step
anyway; the result is the same). After loading, parameters are copied into the engine's
buffers on every rank: no rank resumes from stale weights. Checkpoints written before E and
the step counts existed load with E = (H > 0) (a layer whose tracker is exactly 0 counts as
never estimated) and every parameter stepped ``t`` times.
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
    """Flat DCP state dict of ``core``'s state (:meth:`ShardedCore.state_dict`) for this rank's
    ``pieces`` (every one: an owner may hold no elements of its matrix); empty chunks are left out."""
    sd = core.state_dict(pieces)
    flat: dict[str, Any] = {
        "meta/t": torch.tensor(sd["t"]),
        "meta/skipped": torch.tensor(sd["skipped"]),
        "meta/H": sd["H"],
        "meta/F": sd["F"],
        "meta/E": sd["E"],
        "meta/N": sd["N"],
        "meta/A": sd["A"],
        "meta/steps": sd["steps"],
    }
    for (name, start, stop), st in sd["pieces"].items():
        if stop == start:
            continue
        for key, value in st.items():
            flat[f"optim/{name}/{key}/{start}_{stop}"] = value.reshape(-1)
    return flat


def load_core_state(core: ShardedCore, pieces: list[LocalPiece], path: str, extra: dict[str, Any] | None = None) -> None:
    """Fill ``core``'s state for this rank's ``pieces`` from the checkpoint at ``path`` (any world
    size; :meth:`ShardedCore.load_state_dict` assembles each of its state slots from the stored
    chunks that overlap it, reading only those); ``extra`` entries (e.g. model tensors) are
    loaded in the same pass. An empty piece gets empty state under its parameter's stored keys."""
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
    for key, like in (("meta/E", core.E), ("meta/N", core.N), ("meta/A", core.A)):
        if key in meta:  # absent from older checkpoints: core.load_state_dict's fallbacks
            request[key] = torch.empty_like(like)
    if "meta/steps" in meta:
        request["meta/steps"] = torch.empty(len(core.specs), dtype=torch.long)
    wanted: dict[tuple[str, int, int], dict[str, str]] = defaultdict(dict)  # chunk -> state key -> request key
    empty: dict[tuple[str, int, int], dict[str, torch.Tensor]] = defaultdict(dict)
    for slot in core.state_slots(pieces):
        for start, stop, key, k in chunks.get(slot.name, []):
            if slot.stop == slot.start:  # only the parameter's keys matter: a zero-length chunk carries them
                empty[(slot.name, slot.start, slot.start)][key] = slot.like.new_empty(0)
            elif start < slot.stop and stop > slot.start:
                if k not in request:
                    request[k] = torch.empty(stop - start, dtype=slot.like.dtype, device=slot.like.device)
                wanted[(slot.name, start, stop)][key] = k
    if extra:
        request.update(extra)
    dcp.load(request, checkpoint_id=path)
    stored = {chunk: {key: request[k] for key, k in keys.items()} for chunk, keys in wanted.items()}
    core.load_state_dict({"t": request["meta/t"], "skipped": request["meta/skipped"], "H": request["meta/H"],
                          "F": request["meta/F"], "E": request.get("meta/E"), "N": request.get("meta/N"),
                          "A": request.get("meta/A"), "steps": request.get("meta/steps"),
                          "pieces": {**stored, **empty}}, pieces)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model/{k}": v for k, v in model.state_dict().items()}


def save(optimizer, path: str, model: nn.Module | None = None, extra: dict[str, Any] | None = None) -> None:
    """Save a :class:`~lanton_dist.engine.ShardedLANTON` (and a replicated ``model``, and
    ``extra`` tensors such as tensor-parallel shards under rank-specific keys) to ``path``.
    Collective over the whole job."""
    sd = optimizer.dcp_state_dict()
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
    request = dict(extra or {})
    if model is not None:
        request.update({k: v.detach().clone() for k, v in model_tensors(model).items()})
    loaded = optimizer.load_dcp_state(path, request)
    if model is not None:
        model.load_state_dict({k[len("model/"):]: v for k, v in loaded.items() if k.startswith("model/")})
        optimizer.sync_from_model()
