"""Phases announced by the engine (``lanton_dist.engine.phases``): a subscriber sees every phase of a
LANTON estimation step, properly nested, on the ZeRO engine and the FSDP2 adapter; the same
names reach ``torch.profiler`` as ``record_function`` ranges; nobody listening costs nothing."""
from __future__ import annotations

import pytest
import torch

from distributed import run
from engine_cases import batches, loss_fn, make_model, rows
from lanton_dist.config import OptimConfig
from lanton_dist.engine import phases

#: Every phase of a LANTON estimation step (Option II: both halves reduced) of the ZeRO engine,
#: with the variance waited for in the step (``overlap=False``).
ZERO_ESTIMATION_PHASES = {"grad_reduce", "grad_reduce_half", "core", "agree", "momentum", "lmo", "polar",
                          "variance_estimate", "dual_norms", "variance_finish", "update", "param_gather"}
#: The FSDP2 adapter's (Option I): no gradient reduction of its own (FSDP2 reduces), the all-to-all
#: exchange's gathers and scatters instead — and no ``variance_gather``: the owners, holding the
#: previous gradient whole, form the differences themselves.
FSDP2_ESTIMATION_PHASES = {"core", "agree", "momentum", "lmo", "polar", "lmo_gather", "lmo_scatter",
                           "variance_estimate", "dual_norms", "variance_finish", "update"}


def _events_of_estimation_step(rank, world, model, opt) -> list[tuple[str, str]]:
    """Steps 1 and 2 (k = 2: step 2 estimates); the (phase, event) pairs step 2 announced."""
    from engine_cases import backward_step

    xs = batches(2)
    backward_step(model, opt, rows(xs[0], rank, world))
    events: list[tuple[str, str]] = []
    handle = phases.subscribe(lambda name, event: events.append((name, event)))
    try:
        backward_step(model, opt, rows(xs[1], rank, world))
    finally:
        handle.remove()
    loss_fn(model, rows(xs[0], rank, world)).backward()
    opt.step()  # after remove(): nothing more is recorded
    return events


def _job(rank, world):
    from lanton_dist.engine import build_sharded_optimizer
    from lanton_dist.integrations.fsdp2 import LANTONFSDP2
    from test_fsdp2 import _shard

    model = make_model()
    zero = _events_of_estimation_step(rank, world, model, build_sharded_optimizer(
        model, OptimConfig(name="lanton", option="II", estimate_every=2), overlap=False))
    model = _shard(make_model(), world)
    fsdp2 = _events_of_estimation_step(rank, world, model, LANTONFSDP2(
        model, OptimConfig(name="lanton", estimate_every=2), overlap=False))
    return zero, fsdp2


@pytest.fixture(scope="module")
def events():
    return run(_job, 2, timeout_s=120)


def _top_level(events: list[tuple[str, str]]) -> list[str]:
    """The outermost phases in order; asserts every phase ends, innermost first."""
    stack, top = [], []
    for name, event in events:
        if event == "begin":
            if not stack:
                top.append(name)
            stack.append(name)
        else:
            assert stack and stack.pop() == name, f"{name} ends out of order in {events}"
    assert not stack, f"phases never ended: {stack}"
    return top


@pytest.mark.slow
@pytest.mark.parametrize("engine, expected, top", [
    (0, ZERO_ESTIMATION_PHASES, ["grad_reduce", "grad_reduce_half", "core", "param_gather"]),
    (1, FSDP2_ESTIMATION_PHASES, ["core"]),
], ids=["zero", "fsdp2"])
def test_a_subscriber_gets_every_phase_of_an_estimation_step_nested_on_2_ranks(events, engine, expected, top):
    for rank, result in enumerate(events):
        seen = result[engine]
        assert _top_level(seen) == top, f"rank {rank}"
        assert {name for name, _ in seen} == expected, f"rank {rank}"


def test_subscribers_see_begin_and_end_and_stop_after_remove():
    got: list[tuple[str, str]] = []
    handle = phases.subscribe(lambda name, event: got.append((name, event)))
    with phases.phase("outer"):
        with phases.phase("inner"):
            pass
    handle.remove()
    handle.remove()  # idempotent
    with phases.phase("outer"):
        pass
    assert got == [("outer", "begin"), ("inner", "begin"), ("inner", "end"), ("outer", "end")]


def test_nobody_listening_returns_one_shared_no_op():
    assert phases.phase("a") is phases.phase("b")


def test_announced_phases_are_torch_profiler_ranges():
    @phases.announces()
    def work(phase: str) -> torch.Tensor:
        return torch.ones(4) * 2

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phases.phase("outer_range"):
            work(phase="inner_range")
    names = {e.key for e in prof.key_averages()}
    assert {"lanton/outer_range", "lanton/inner_range"} <= names
