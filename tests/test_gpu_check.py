"""``launch/gpu_check.py --device cpu --tiny`` runs the GPU check's code end to end on CPU.

One run (gloo instead of NCCL, no NVML: the profiler's fallback) writes one JSON file with every
section filled and no section in error: the bf16 matmul rate; textbook NS5 over ours with the
two agreeing to bf16 tolerance; the default ``ns`` estimator within 1e-3 of fp64 svdvals on the
three spectra in fp32 and bf16; step times of LANTON, Scion, D-Muon and AdamW on the engine at
world 1 (k = 10); host syncs marked unavailable on CPU; the profile's report files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import gpu_check


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_section_ran_without_error(tiny_run):
    _, r = tiny_run
    for name in ("matmul", "ns_kernel", "estimator", "optimizer_step", "profile"):
        assert "result" in r[name] and not (isinstance(r[name]["result"], dict) and "error" in r[name]["result"]), r[name]
    assert r["matmul"]["result"]["tflops"] > 0


def test_ns_kernel_rows_compare_ours_with_the_textbook_on_three_shapes(tiny_run):
    _, r = tiny_run
    rows = r["ns_kernel"]["result"]
    assert {tuple(x["shape"]) for x in rows} == set(gpu_check.TINY_SHAPES)
    for x in rows:
        assert x["speedup"] > 0 and x["max_abs_diff"] < 0.1  # bf16 outputs of entries ~ 1/√n


def test_default_estimator_is_within_1e3_in_both_dtypes_and_svdvals_is_timed(tiny_run):
    _, r = tiny_run
    rows = r["estimator"]["result"]["rows"]
    default = [x for x in rows if x["estimator"].startswith("ns default")]
    assert {(x["dtype"], x["spectrum"]) for x in default} == {
        (d, s) for d in ("bf16", "fp32") for s in ("gaussian", "decaying", "lowrank_noise")
    }
    assert all(abs(x["rel_err"]) <= 1e-3 for x in default)
    assert any(x["estimator"].startswith("exact") and x["time_s"] > 0 for x in rows)


def test_optimizer_step_times_cover_four_algorithms_at_k_10_and_syncs_say_cpu(tiny_run):
    _, r = tiny_run
    o = r["optimizer_step"]["result"]
    assert o["k"] == 10 and set(o["times"]) == {"lanton", "scion", "dmuon", "adamw"}
    for t in o["times"].values():
        assert len(t["step_s"]) == o["steps"] and t["mean_s"] > 0
    assert all(v == {"available": False, "reason": "CPU: no CUDA stream"} for v in r["host_syncs"].values())


def test_profile_writes_its_report_files_with_the_nvml_fallback(tiny_run):
    out, r = tiny_run
    files = r["profile"]["result"]["files"]
    assert {"profile/profile.json", "profile/timeline.png"} <= set(files)
    assert all((out / f).exists() for f in files)
    assert r["profile"]["result"]["summary"]["records"] == 3


def test_budget_skips_sections_that_would_start_late(tmp_path):
    """--budget-s -1: nothing starts, every section says so, and the JSON is still written."""
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--budget-s", "-1"]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(r[s] == {"skipped": "budget"} for s in ("matmul", "ns_kernel", "estimator", "optimizer_step", "profile"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_sync_counter_sees_an_item_call():
    x = torch.ones(4, device="cuda")
    assert gpu_check.count_host_syncs(lambda: x.sum().item(), torch.device("cuda")) >= 1
    assert gpu_check.count_host_syncs(lambda: x.mul_(2), torch.device("cuda")) == 0
