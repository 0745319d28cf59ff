"""The estimator's side stream: off the critical path on GPU, the same numbers everywhere.

On CPU the side stream runs inline; ``LANTON_SIDE_STREAM=deferred`` emulates the worst a CUDA
stream allows (the nuclear norms are computed only when the next step waits for them), so a
sharded run under it that still equals the reference proves every consumer waits first.
"""
from __future__ import annotations

import os

import pytest
import torch
from distributed import run
from engine_cases import make_model, max_rel_err, reference_run, sharded_run

from lanton_dist.config import OptimConfig
from lanton_dist.engine import build_sharded_optimizer
from lanton_dist.engine.streams import ENV, SideStream, side_stream_mode

STEPS = 8


def test_side_stream_runs_inline_on_cpu_and_on_a_stream_on_cuda(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert side_stream_mode(torch.device("cpu")) == "inline"
    assert side_stream_mode(torch.device("cuda", 0)) == "stream"
    assert not SideStream(torch.device("cpu")).defers


def test_side_stream_mode_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv(ENV, "sideways")
    with pytest.raises(ValueError, match="sideways"):
        side_stream_mode(torch.device("cpu"))
    monkeypatch.setenv(ENV, "stream")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        side_stream_mode(torch.device("cpu"))


def test_deferred_work_runs_only_when_its_result_is_asked_for(monkeypatch):
    monkeypatch.setenv(ENV, "deferred")
    calls = []
    side = SideStream(torch.device("cpu"))
    work = side.launch(lambda: calls.append(1) or 42, keep=[torch.ones(2)])
    assert side.defers and calls == []
    assert work.result() == 42 and calls == [1]
    assert work.result() == 42 and calls == [1]  # once


def _engine_worker(rank, world, mode, k):
    if mode:
        os.environ[ENV] = mode
    model = make_model(torch.float64)
    cfg = OptimConfig(name="lanton", estimate_every=k, nuclear_estimator="exact")
    opt = build_sharded_optimizer(model, cfg, overlap=True)
    out = sharded_run(rank, world, opt, model, STEPS)
    return out, opt.meter.by_phase(k) if world > 1 else None


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_sharded_step_with_deferred_estimates_equals_reference_on_3_ranks(k):
    """fp64, 3 ranks, overlap on: the nuclear norms left pending until the next step waits for
    them give the reference's delayed-rate-factor run, and the variance all-reduce moves to the
    step after the estimate (it waits for the owners' norms)."""
    ref = reference_run(OptimConfig(name="lanton", estimate_every=k, nuclear_estimator="exact"), STEPS,
                        dtype=torch.float64, delay=True)
    deferred = run(_engine_worker, 3, "deferred", k)
    inline = run(_engine_worker, 3, "", k)
    for r in range(3):
        assert max_rel_err(deferred[r][0], ref) <= 1e-6, f"rank {r}"
        assert max_rel_err(inline[r][0], ref) <= 1e-6, f"rank {r}"
    assert "variance" in inline[0][1] and "variance" not in deferred[0][1]  # step k: in the step / at the next


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_side_stream_on_cuda_equals_inline_estimates(monkeypatch, tmp_path):
    """One GPU, NCCL world 1: estimates on the side stream give the inline run's parameters."""
    import torch.distributed as dist
    from engine_cases import backward_step, batches

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        results = {}
        for mode in ("stream", "inline"):
            monkeypatch.setenv(ENV, mode)
            model = make_model(torch.float32).cuda()
            opt = build_sharded_optimizer(model, OptimConfig(name="lanton", estimate_every=2, nuclear_estimator="ns"),
                                          overlap=True)
            for x in batches(6):
                backward_step(model, opt, x.cuda())
            results[mode] = {n: p.detach().cpu() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    assert max_rel_err(results["stream"], results["inline"]) <= 1e-6
