"""The model of a training checkpoint, read in one process without the run's process group
(for ``lanton-dist export-hf`` and ``lanton-dist eval``).

A checkpoint is named by a ``checkpoints/step_N`` directory, the ``checkpoints`` directory or
the run's ``train.out_dir`` (both: the newest complete checkpoint,
:func:`lanton_dist.checkpoint_dir.latest_complete`). Its ``loop.json`` gives the run config (the
model's shape) and the backend that wrote it, which fixes the format:

* ``none`` and ``ddp`` — ``state.pt`` (``torch.load(weights_only=True)``, its ``"model"`` entry);
* ``zero`` and ``fsdp2`` — a ``torch.distributed.checkpoint`` directory whose ``model/<name>``
  entries are the parameters (replicated under ``zero``, ``Shard(0)`` DTensors under
  ``fsdp2``; DCP assembles the whole tensors from any world size, ``no_dist``).

``deepspeed`` and ``megatron`` checkpoints are refused with a message naming the backend
(their weights are in DeepSpeed's / Megatron's own layouts).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lanton_dist import checkpoint_dir
from lanton_dist.backends import STATE_FILE
from lanton_dist.config import ModelConfig, RunConfig, from_dict

#: ``parallel.backend`` values whose checkpoints :func:`read_checkpoint_model` reads.
READABLE_BACKENDS: tuple[str, ...] = ("none", "ddp", "zero", "fsdp2")
DCP_MODEL_PREFIX = "model/"


@dataclass
class CheckpointModel:
    """A checkpoint's model: where it came from, the run config it was trained with, its step
    and the parameters (name → fp32 CPU tensor, :class:`~lanton_dist.model.Transformer` names)."""

    path: Path
    config: RunConfig
    step: int
    backend: str
    state_dict: dict[str, torch.Tensor]

    @property
    def model(self) -> ModelConfig:
        return self.config.model


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint directory ``path`` names (module doc); ValueError when none."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / checkpoint_dir.LOOP_STATE).is_file():
        if not checkpoint_dir.is_complete(p):
            raise ValueError(f"checkpoint {p} is not complete (no {checkpoint_dir.MARKER} marker): a save that did not finish")
        return p
    root = p if p.name == checkpoint_dir.CHECKPOINTS else checkpoint_dir.root_of(p)
    found = checkpoint_dir.latest_complete(root, lambda _msg: None)
    if found is None:
        raise ValueError(f"no complete checkpoint in {p} (give a checkpoints/step_N directory, the checkpoints "
                         "directory or the run's train.out_dir)")
    return found


def read_checkpoint_model(path: str | Path) -> CheckpointModel:
    """The model of the checkpoint ``path`` names, on CPU (module doc for the formats)."""
    where = resolve_checkpoint(path)
    loop = checkpoint_dir.read_loop_state(where)
    cfg = from_dict(RunConfig, loop["config"])
    backend = loop.get("backend", cfg.parallel.backend)
    if backend in ("none", "ddp"):
        ckpt = torch.load(where / STATE_FILE, map_location="cpu", weights_only=True)
        sd = dict(ckpt["model"])
    elif backend in ("zero", "fsdp2"):
        sd = _read_dcp_model(where)
    else:
        raise ValueError(f"checkpoint {where} was written by parallel.backend {backend!r}; this reads the checkpoints "
                         f"of {', '.join(READABLE_BACKENDS)}")
    return CheckpointModel(where, cfg, int(loop["step"]), backend, {k: v.float() for k, v in sd.items()})


def _read_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    """The ``model/<name>`` tensors of the DCP checkpoint ``path``, whole, in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    request = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if k.startswith(DCP_MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    if not request:
        raise ValueError(f"checkpoint {path} holds no model tensors ({DCP_MODEL_PREFIX}* entries)")
    dcp.load(request, checkpoint_id=str(path), no_dist=True)
    return {k[len(DCP_MODEL_PREFIX):]: v for k, v in request.items()}
