"""The profiler (lanton_dist.profiling) on CPU: NVML absent and faked, phase timers, reports, CLI."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import pytest
import torch

from lanton_dist import profiling as prof
from lanton_dist.cli import main
from lanton_dist.config import ModelConfig
from lanton_dist.plan import OptimSettings, ParallelLayout, StepPlanner

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)


class NVMLError_LibraryNotFound(Exception):  # noqa: N801 - the name NVML gives this error
    pass


class FakeNVML:
    """Two GPUs: GPU g draws (300 + g) W, energy counters grow accordingly, NVLink moves 1e6 KiB/s,
    GPU 1 does not report PCIe throughput."""

    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139

    class NVMLError_NotSupported(Exception):  # noqa: N801
        pass

    def __init__(self, fail: Exception | None = None) -> None:
        self.t0, self.fail, self.inits, self.shutdowns = time.time(), fail, 0, 0

    def nvmlInit(self):
        self.inits += 1
        if self.fail:
            raise self.fail

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetPowerUsage(self, h):
        return (300 + h) * 1000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return (time.time() - self.t0) * (300 + h) * 1000

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + h, memory=20)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=10 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        if h == 1:
            raise self.NVMLError_NotSupported("Not Supported")
        return 1000 + counter

    def nvmlDeviceGetFieldValues(self, h, ids):
        kib = (time.time() - self.t0) * 1e6
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(ullVal=int(kib))) for _ in ids]


def test_missing_nvml_is_reported_once_and_profiling_goes_on(capsys, monkeypatch):
    monkeypatch.setattr(prof.sampler, "_NOTICES", set())
    fake = FakeNVML(fail=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    a = prof.NVMLSampler(nvml=fake).start()
    b = prof.NVMLSampler(nvml=fake).start()
    a.stop(), b.stop()
    err = capsys.readouterr().err
    assert err.count("NVML unavailable") == 1, err
    assert "NVMLError_LibraryNotFound: NVML Shared Library Not Found" in err
    assert not a.available and not b.available and a.samples == [] and fake.inits == 2
    assert a.to_json()["reason"].startswith("NVMLError_LibraryNotFound")


def test_this_machine_has_no_nvml_and_says_why(capsys, monkeypatch):
    """On the CPU machines: the real nvidia-ml-py raises NVMLError_LibraryNotFound (or is missing)."""
    monkeypatch.setattr(prof.sampler, "_NOTICES", set())
    s = prof.NVMLSampler()
    if s.available:
        s.stop()
        pytest.skip("NVML works here (a GPU machine)")
    assert "NVMLError_LibraryNotFound" in s.reason or "nvidia-ml-py is not installed" in s.reason
    assert capsys.readouterr().err.count("NVML unavailable") == 1
    prof.NVMLSampler()
    assert "NVML unavailable" not in capsys.readouterr().err


def test_nvml_sampler_reads_power_energy_utilisation_memory_pcie_and_nvlink():
    fake = FakeNVML()
    with prof.NVMLSampler(interval_s=0.01, nvml=fake) as s:
        time.sleep(0.15)
    assert fake.shutdowns == 1
    by_gpu = {g: [x for x in s.samples if x["gpu"] == g] for g in (0, 1)}
    assert all(len(v) >= 5 for v in by_gpu.values())
    last = by_gpu[1][-1]
    assert last["power_W"] == 301 and last["sm_util_pct"] == 51 and last["mem_used_bytes"] == 10 * 2**30
    assert last["pcie_tx_Bps"] is None and "pcie" in s.unsupported[1] and by_gpu[0][-1]["pcie_tx_Bps"] == 1000 * 1024
    energies = [x["energy_J"] for x in by_gpu[0]]
    assert energies[0] == 0 and energies == sorted(energies)
    assert energies[-1] == pytest.approx(300 * (by_gpu[0][-1]["t"] - by_gpu[0][0]["t"]), rel=0.05)
    rates = [x["nvlink_tx_Bps"] for x in by_gpu[0][1:]]
    assert sum(rates) / len(rates) == pytest.approx(1.024e9, rel=0.1)


def test_phase_timer_and_report_with_energy_per_step(tmp_path):
    """A plain torch optimizer (no meter): step and user phases are timed; with NVML samples the
    report has energy per step = power × (previous step end → this step end)."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    profiler = prof.Profiler(rank=0, world=1).attach(opt)
    fake = FakeNVML()
    with prof.NVMLSampler(interval_s=0.01, nvml=fake) as sampler:
        for _ in range(4):
            with profiler.phase("forward_backward"):
                time.sleep(0.03)
                p.grad = torch.ones(3)
            opt.step()
    records = profiler.finalize()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["phases"]["forward_backward"]["time_s"] >= 0.03
        assert r["phases"]["optimizer_step"]["count"] == 1 and r["bytes"] == {}
    assert all(r["compute_s"] >= 0.03 for r in records[1:])
    report = prof.build_report(records, sampler.to_json(), {"kind": "test"})
    energy = report["summary"]["energy"]
    spans = [r["t_end"] - r["t_start"] + (r["compute_s"] or 0.0) for r in records]
    assert energy["J_per_step"] == pytest.approx(601 * sum(spans) / len(spans), rel=0.02)
    paths = prof.write_report(report, tmp_path)
    assert (tmp_path / "nvml.png") in paths
    assert mpimg.imread(tmp_path / "nvml.png").shape[0] > 0
    profiler.detach()
    opt.step()
    assert len(profiler.records) == 4


def test_detach_undoes_attach_so_the_optimizer_can_be_profiled_again():
    """Every attribute the instrumentation set (the one-profiler mark included) is gone after detach."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    before = dict(vars(opt))
    first = prof.Profiler(rank=0, world=1).attach(opt)
    with pytest.raises(RuntimeError, match="already has a profiler"):
        prof.Profiler(rank=0, world=1).attach(opt)
    first.detach()
    assert vars(opt).keys() == before.keys()
    second = prof.Profiler(rank=0, world=1).attach(opt)
    p.grad = torch.ones(3)
    opt.step()
    assert [r["step"] for r in second.finalize()] == [1] and first.finalize() == []


def _check_pngs(out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = out / name
        assert path.stat().st_size > 0, name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (name, img.shape)


@pytest.mark.slow
def test_engine_profile_on_cpu_writes_a_valid_report_whose_bytes_equal_the_planner(tmp_path, monkeypatch):
    monkeypatch.setattr(prof.sampler, "_NOTICES", set())
    cfg = prof.EngineRun(world=2, steps=4, estimate_every=2, option="II", batch=4, seq_len=16, model=SMALL, bucket_mb=0.02)
    report = prof.run_engine_profile(cfg, nvml=FakeNVML(fail=NVMLError_LibraryNotFound("NVML Shared Library Not Found")))
    paths = prof.write_report(report, tmp_path)
    assert {p.name for p in paths} == {"profile.json", "steps.jsonl", "timeline.png", "bytes.png"}
    data = json.loads((tmp_path / "profile.json").read_text())
    assert set(data) == {"version", "meta", "nvml", "steps", "summary"}
    assert not data["nvml"]["available"] and "NVMLError_LibraryNotFound" in data["nvml"]["reason"]
    s = data["summary"]
    assert s["ranks"] == [0, 1] and s["steps"] == [1, 2, 3, 4] and s["estimation_steps"] == [2, 4] and s["energy"] is None
    for phase in ("optimizer_step", "grad_reduce", "core", "lmo", "param_gather", "variance_estimate", "forward_backward",
                  "wait:grad_reduce", "wait:param_gather"):
        assert s["phases"][phase]["time_s_per_step"] > 0, phase
    assert 0.0 <= s["hidden_fraction"]["grad_reduce"] <= 1.0
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["rank"] in (0, 1)
    planner = StepPlanner(SMALL, ParallelLayout(nodes=1, gpus_per_node=2, bucket_mb=0.02),
                          OptimSettings(estimate_every=2, option="II", device="cpu"))
    for r in data["steps"]:
        pred = planner.rank_step(0, r["rank"], 0, r["step"])
        assert r["bytes"] == pred.bytes_by_phase() and r["tensor_bytes"] == pred.bytes_by_phase("tensor_bytes")
        assert ("grad_reduce_half" in r["bytes"]) == (r["step"] % 2 == 0)
    _check_pngs(tmp_path, ("timeline.png", "bytes.png"))
    # re-render from the saved JSON through the CLI
    out2 = tmp_path / "again"
    assert main(["profile", "--report", str(tmp_path / "profile.json"), "--out", str(out2)]) == 0
    _check_pngs(out2, ("timeline.png", "bytes.png"))
    assert json.loads((out2 / "profile.json").read_text())["summary"] == s


SCRIPT = """
import os, sys, tempfile
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F
from lanton_dist.config import ModelConfig, OptimConfig
from lanton_dist.engine import build_sharded_optimizer
from lanton_dist.model import Transformer

def worker(rank, init):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16))
    opt = build_sharded_optimizer(model, OptimConfig(name="dmuon"))
    for step in range(3):
        x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(step))
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"),), nprocs=2)
"""


@pytest.mark.slow
def test_profile_wraps_a_training_command_and_its_spawned_ranks(tmp_path, capsys):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "prof"
    assert main(["profile", "--out", str(out), "--", sys.executable, str(script)]) == 0
    data = prof.load_report(out)
    assert data["meta"]["command"][-1] == str(script) and data["meta"]["exit_status"] == 0
    assert sorted((r["rank"], r["step"]) for r in data["steps"]) == [(r, s) for r in (0, 1) for s in (1, 2, 3)]
    planner = StepPlanner(SMALL, ParallelLayout(nodes=1, gpus_per_node=2), OptimSettings(algorithm="dmuon", device="cpu"))
    for r in data["steps"]:
        assert r["optimizer"].startswith("ShardedLANTON")
        assert r["bytes"] == planner.rank_step(0, r["rank"], 0, r["step"]).bytes_by_phase()
        assert {"optimizer_step", "grad_reduce", "core", "lmo", "param_gather"} <= set(r["phases"])
    _check_pngs(out, ("timeline.png", "bytes.png"))
    assert "grad_reduce" in capsys.readouterr().out


def test_profile_cli_needs_exactly_one_mode_and_a_real_report():
    with pytest.raises(SystemExit) as exc:
        main(["profile"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--report", "/nonexistent/profile.json"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="batch must be even"):
        prof.EngineRun(option="II", batch=3)
