"""NVML sampling: a background thread reading every GPU of the node (torch-free).

:class:`NVMLSampler` (package ``nvidia-ml-py``, verified pin ``nvidia-ml-py==13.615.71``) records
power (W), cumulative energy (J, ``nvmlDeviceGetTotalEnergyConsumption``; the integral of power
where unsupported), SM and memory-controller utilisation (%), memory used (bytes), PCIe TX/RX
(bytes/s, NVML's 20 ms window, reported in KiB/s) and NVLink TX/RX (bytes/s, from the cumulative
``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_*`` counters summed over links) — each only where the device
reports it. Without NVML (no GPU driver: ``NVMLError_LibraryNotFound``; or the package missing)
it says so **once per process** (:func:`notice_once`) and the profiler carries on with timings
and bytes.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

NVML_PIN = "nvidia-ml-py==13.615.71"
_UINT_MAX = 0xFFFFFFFF

# ============================================================================ say once
_NOTICES: set[str] = set()


def notice_once(key: str, message: str, log: Callable[[str], None] | None = None) -> bool:
    """Print ``message`` (to stderr, or through ``log``) the first time ``key`` is seen in this
    process; return whether it was printed."""
    if key in _NOTICES:
        return False
    _NOTICES.add(key)
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(f"lanton_dist.profiling: {message}")
    return True


# ============================================================================ NVML
def _import_nvml() -> Any:
    import pynvml  # nvidia-ml-py

    return pynvml


class NVMLSampler:
    """Background sampling of every NVML device of this node (see module doc).

    Args:
        interval_s: seconds between samples.
        devices: NVML indices to sample (default: all).
        nvml: an NVML module (default: ``import pynvml``); tests pass a fake.
        log: where the one-time "NVML unavailable" notice goes (default: stderr).

    Attributes:
        available: whether NVML initialised. reason: why not (e.g.
            ``"NVMLError_LibraryNotFound: NVML Shared Library Not Found"``).
        samples: one dict per device and sample: ``t`` (epoch s), ``gpu``, ``power_W``,
            ``energy_J`` (since the first sample), ``sm_util_pct``, ``mem_util_pct``,
            ``mem_used_bytes``, ``pcie_tx_Bps``, ``pcie_rx_Bps``, ``nvlink_tx_Bps``,
            ``nvlink_rx_Bps`` (None where not reported).
    """

    def __init__(self, interval_s: float = 0.1, devices: Sequence[int] | None = None, nvml: Any = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.available, self.reason = False, None
        self.samples: list[dict[str, Any]] = []
        self.gpus: list[dict[str, Any]] = []
        self.unsupported: dict[int, dict[str, str]] = defaultdict(dict)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._prev: dict[int, dict[str, float]] = {}
        self._energy0: dict[int, float] = {}
        try:
            self._nvml = nvml if nvml is not None else _import_nvml()
        except ImportError:
            self._nvml = None
            self.reason = f"nvidia-ml-py is not installed (pip install {NVML_PIN})"
        if self._nvml is not None:
            try:
                self._nvml.nvmlInit()
                count = self._nvml.nvmlDeviceGetCount()
                idx = list(range(count)) if devices is None else list(devices)
                bad = [i for i in idx if not 0 <= i < count]
                if bad:
                    raise ValueError(f"NVML devices {bad} do not exist (this node has {count})")
                self._handles = {i: self._nvml.nvmlDeviceGetHandleByIndex(i) for i in idx}
                for i, h in self._handles.items():
                    name = self._nvml.nvmlDeviceGetName(h)
                    self.gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name)})
                self.available = count > 0 and bool(idx)
                if not self.available:
                    self.reason = "NVML reports no GPU on this node"
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
                self.reason = f"{type(exc).__name__}: {exc}"
        if not self.available:
            notice_once("nvml", f"NVML unavailable ({self.reason}); profiling CPU timings and bytes only", log)

    # ------------------------------------------------------------------ control
    def start(self) -> "NVMLSampler":
        if not self.available or self._thread is not None:
            return self
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="lanton-nvml", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        if self.available:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self.available = bool(self.samples)

    def __enter__(self) -> "NVMLSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # ------------------------------------------------------------------ reading
    def _get(self, gpu: int, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.unsupported[gpu]:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported and friends: stop asking
            self.unsupported[gpu][key] = f"{type(exc).__name__}: {exc}"
            return None

    def _nvlink_kib(self, h: Any) -> tuple[float, float] | None:
        n = self._nvml
        tx = getattr(n, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", 138)
        rx = getattr(n, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", 139)
        vals = n.nvmlDeviceGetFieldValues(h, [(tx, _UINT_MAX), (rx, _UINT_MAX)])
        if any(int(v.nvmlReturn) != 0 for v in vals):
            raise RuntimeError(f"NVLink throughput fields returned {[int(v.nvmlReturn) for v in vals]}")
        return float(vals[0].value.ullVal), float(vals[1].value.ullVal)

    def sample(self) -> list[dict[str, Any]]:
        """Read every device once; append to :attr:`samples` and return the new samples."""
        if not self.available:
            return []
        n, out = self._nvml, []
        for i, h in self._handles.items():
            t = time.time()
            rec: dict[str, Any] = {"t": t, "gpu": i}
            power = self._get(i, "power", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0)
            energy = self._get(i, "energy", lambda: n.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0)
            util = self._get(i, "utilization", lambda: n.nvmlDeviceGetUtilizationRates(h))
            mem = self._get(i, "memory", lambda: n.nvmlDeviceGetMemoryInfo(h))
            tx_id = getattr(n, "NVML_PCIE_UTIL_TX_BYTES", 0)
            rx_id = getattr(n, "NVML_PCIE_UTIL_RX_BYTES", 1)
            pcie_tx = self._get(i, "pcie", lambda: n.nvmlDeviceGetPcieThroughput(h, tx_id) * 1024.0)
            pcie_rx = self._get(i, "pcie", lambda: n.nvmlDeviceGetPcieThroughput(h, rx_id) * 1024.0) if pcie_tx is not None else None
            nvlink = self._get(i, "nvlink", lambda: self._nvlink_kib(h))
            prev = self._prev.get(i)
            if energy is None and power is not None:  # integrate power where the energy counter is missing
                energy = (
                    (prev["energy_abs"] + 0.5 * (prev["power"] + power) * (t - prev["t"]))
                    if prev and prev.get("power") is not None
                    else 0.0
                )
            if energy is not None:
                self._energy0.setdefault(i, energy)
            rec.update(power_W=power, energy_J=None if energy is None else energy - self._energy0[i],
                       sm_util_pct=getattr(util, "gpu", None), mem_util_pct=getattr(util, "memory", None),
                       mem_used_bytes=getattr(mem, "used", None), pcie_tx_Bps=pcie_tx, pcie_rx_Bps=pcie_rx,
                       nvlink_tx_Bps=None, nvlink_rx_Bps=None)
            if nvlink is not None and prev and prev.get("nvlink") is not None and t > prev["t"]:
                dt = t - prev["t"]
                rec["nvlink_tx_Bps"] = (nvlink[0] - prev["nvlink"][0]) * 1024.0 / dt
                rec["nvlink_rx_Bps"] = (nvlink[1] - prev["nvlink"][1]) * 1024.0 / dt
            self._prev[i] = {"t": t, "power": power, "energy_abs": energy, "nvlink": nvlink}
            out.append(rec)
        with self._lock:
            self.samples.extend(out)
        return out

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            samples = list(self.samples)
        return {"available": bool(samples) or self.available, "reason": self.reason, "interval_s": self.interval_s,
                "gpus": self.gpus, "unsupported": {str(k): v for k, v in self.unsupported.items() if v},
                "samples": samples}


def nvml_unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "interval_s": None, "gpus": [], "unsupported": {}, "samples": []}

