"""CPU/CI-only shim: run Megatron-core (0.16.x) on CPU under the gloo backend.

Megatron-core assumes CUDA in a handful of places that are not about compute: it asks for the
current CUDA device to place small tensors, creates a few tensors on a literal ``"cuda"``
device, synchronizes after pipeline sends, and its tensor-parallel RNG tracker
(``megatron.core.tensor_parallel.random``) snapshots, seeds and restores the *CUDA* generator.
On a CPU-only torch build each of those raises. :func:`install` replaces exactly these
entry points; everything else (the model, the TP collectives, the pipeline schedules) is
Megatron's own code running on CPU tensors.

Patches (each one is reverted by :func:`uninstall`):

``torch.cuda.current_device``
    Returns ``torch.device("cpu")`` instead of raising. Megatron passes the result as a
    ``device=`` argument (RoPE frequencies, attention masks, pipeline receive buffers), so
    those tensors are simply created on the CPU.
``torch.cuda.synchronize``
    A no-op: CPU kernels are synchronous. The pipeline's batched point-to-point exchange
    (``batch_p2p_comm`` with ``batch_p2p_sync``, Megatron's defaults) calls it after every
    ``batch_isend_irecv``.
``torch.cuda.get_rng_state`` / ``torch.cuda.manual_seed``
    Map to ``torch.get_rng_state`` / ``torch.manual_seed``: on CPU the generator that the
    model's random ops draw from *is* the CPU default generator, so the "CUDA" RNG is the CPU
    one. ``model_parallel_cuda_manual_seed(seed)`` therefore leaves the CPU generator seeded
    with ``seed`` on every rank (Megatron's data-parallel seed).
``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
    The tracker's private get/set helpers, mapped to ``torch.get_rng_state`` /
    ``torch.set_rng_state``. With them ``get_cuda_rng_tracker().fork()`` really forks the
    CPU generator (tensor-parallel regions draw from the per-TP-rank stream and the outer
    stream is restored afterwards), i.e. the same semantics as on GPU.
``torch`` as seen by ``megatron.core.pipeline_parallel.schedules`` and ``megatron.core.transformer.utils``
    Those two modules create a few tensors with a literal ``device="cuda"`` (the token
    counter ``total_num_tokens`` of every forward/backward schedule, and the default causal
    mask used when ``attention_mask`` is None). Their module-global ``torch`` is replaced by
    :class:`_CpuTorch`, a proxy that forwards every attribute to the real ``torch`` but
    rewrites a CUDA ``device=`` to ``"cpu"`` in the tensor factories ``zeros``, ``ones``,
    ``empty``, ``full``, ``tensor`` and ``arange``. No other module sees the proxy.
A logging filter on ``megatron.core.tensor_parallel.random``
    Drops the tracker's "CPU RNG state changed within GPU RNG context" warning, which is
    expected here: inside a fork the CPU generator *is* the forked generator.

Use it only in tests and CPU smoke runs: ``parallel.backend: megatron`` with ``train.device:
cpu`` on a machine without CUDA installs it (:mod:`lanton_dist.megatron_backend`), tests call
:func:`install` / :func:`uninstall` themselves. It is never used for training on GPUs (it
refuses to install where CUDA exists). Models must be built with
``use_cpu_initialization=True`` and ``params_dtype=torch.float32`` (see
``lanton_dist.integrations.megatron_model``).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

_SAVED: dict[tuple[Any, str], Any] = {}
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


_FILTER = _DropForkWarning()


def _to_cpu_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs = dict(kwargs, device="cpu")
    return kwargs


class _CpuTorch:
    """``torch`` with CUDA ``device=`` arguments of tensor factories mapped to the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in self._FACTORIES:
            def factory(*args: Any, **kwargs: Any) -> Any:
                return attr(*args, **_to_cpu_kwargs(kwargs))
            return factory
        return attr


_PROXIED_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.utils")


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise RuntimeError("megatron_cpu: graph-safe (CUDA graph) RNG states do not exist on CPU")
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise RuntimeError("megatron_cpu: graph-safe (CUDA graph) RNG states do not exist on CPU")
    torch.set_rng_state(new_state)


def _synchronize(device: Any = None) -> None:
    return None


def _cuda_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cuda_manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _patch(obj: Any, name: str, value: Any) -> None:
    key = (obj, name)
    if key not in _SAVED:
        _SAVED[key] = getattr(obj, name)
    setattr(obj, name, value)


def installed() -> bool:
    """Whether the patches are in place."""
    return bool(_SAVED)


def install() -> None:
    """Apply the patches (idempotent). Refuses to run where CUDA is available: use the GPU."""
    if torch.cuda.is_available():
        raise RuntimeError("lanton_dist.integrations.megatron_cpu is for CPU-only runs; CUDA is available here")
    from megatron.core.tensor_parallel import random as mrandom

    _patch(torch.cuda, "current_device", _cpu_device)
    _patch(torch.cuda, "synchronize", _synchronize)
    _patch(torch.cuda, "get_rng_state", _cuda_get_rng_state)
    _patch(torch.cuda, "manual_seed", _cuda_manual_seed)
    _patch(mrandom, "_get_cuda_rng_state", _get_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", _set_rng_state)
    for module_name in _PROXIED_MODULES:
        module = importlib.import_module(module_name)
        if not isinstance(module.torch, _CpuTorch):
            _patch(module, "torch", _CpuTorch(torch))
    logger = logging.getLogger(mrandom.__name__)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def uninstall() -> None:
    """Restore every patched attribute."""
    for (obj, name), value in _SAVED.items():
        setattr(obj, name, value)
    _SAVED.clear()
    logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_FILTER)
