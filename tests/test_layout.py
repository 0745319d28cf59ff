"""Specification of the owner-aligned bucket layout and the ownership plan behind it
(lanton_dist.engine.layout / .ownership), on model shapes alone (no torch)."""
from __future__ import annotations

import math

import pytest

from lanton_dist.config import ModelConfig
from lanton_dist.engine.layout import Layout, build_layout
from lanton_dist.engine.ownership import plan_ownership
from lanton_dist.groups import Geometry
from lanton_dist.plan import OptimSettings, ParallelLayout, StepPlanner, engine_order, llama_specs

SMALL = ModelConfig(vocab_size=512, dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=16)
#: (model, nodes, gpus per node, tp, pp): the planner presets the layout must serve.
PRESETS = [("llama-7b", 1, 8, 1, 1), ("llama-7b", 8, 8, 1, 1), ("llama-13b", 8, 8, 1, 1), ("llama-70b", 128, 8, 8, 8)]


def _specs(cfg: ModelConfig = SMALL):
    return engine_order(llama_specs(cfg))


def check_every_element_placed_once(layout: Layout, specs) -> None:
    """Pieces tile each parameter exactly, sit inside their chunk and never overlap there."""
    covered = {s.name: [] for s in specs}
    for b in layout.buckets:
        for r in range(layout.world):
            spans = sorted((p.offset, p.offset + p.numel) for p in b.on_rank(r))
            assert all(0 <= a < z <= b.segments[r] for a, z in spans), f"bucket {b.index} rank {r}: piece outside its chunk"
            assert all(z <= a2 for (_, z), (a2, _) in zip(spans, spans[1:])), f"bucket {b.index} rank {r}: pieces overlap"
        for p in b.pieces:
            covered[p.name].append((p.start, p.stop))
    for s in specs:
        pos = 0
        for a, z in sorted(covered[s.name]):
            assert a == pos, f"{s.name}: gap or overlap at element {pos}"
            pos = z
        assert pos == s.numel, f"{s.name}: {pos} of {s.numel} elements placed"


def check_hidden_whole_on_owner(layout: Layout, specs, plan) -> None:
    for s in specs:
        if s.geometry is Geometry.HIDDEN:
            pieces = layout.pieces_of(s.name)
            assert [(p.start, p.stop, p.rank) for p in pieces] == [(0, s.numel, plan.owner[s.name])], s.name


@pytest.mark.parametrize("world", [2, 3, 5])
def test_every_element_is_placed_once_hidden_matrices_lie_whole_on_their_owner_and_every_parameter_is_contiguous(world):
    specs = _specs()
    plan = plan_ownership(specs, world)
    total = sum(s.numel for s in specs)
    for cap in (total, total // 3, total // 8, 5000, 1):
        layout = build_layout(specs, plan, world, cap)
        check_every_element_placed_once(layout, specs)
        check_hidden_whole_on_owner(layout, specs, plan)
        assert all(span is not None for span in layout.flat_spans().values()), cap   # every parameter a view
        split = sum(1 for b in layout.buckets if len({p.name for p in b.pieces}) == 1 and len(b.pieces) > 1)
        assert layout.padding < world * max(split, 1), cap    # only the rounding of the even splits


@pytest.mark.parametrize("world", [2, 3, 5])
def test_every_bucket_honours_the_cap_but_one_holding_a_single_larger_matrix(world):
    specs = _specs()
    plan = plan_ownership(specs, world)
    largest = max(s.numel for s in specs if s.geometry is Geometry.HIDDEN)
    for cap in (largest * 3, largest, largest // 2, 1000):
        layout = build_layout(specs, plan, world, cap)
        assert layout.cap_honoured
        for b in layout.buckets:
            assert b.numel <= cap or (len(b.pieces) == 1 and b.pieces[0].numel > cap), (cap, b.index, b.numel)


def test_buckets_follow_backward_order():
    """Bucket 0 holds the last parameters (the first gradients of backward), and so on."""
    specs = _specs()
    plan = plan_ownership(specs, 3)
    layout = build_layout(specs, plan, 3, sum(s.numel for s in specs) // 6)
    order = {s.name: i for i, s in enumerate(specs)}
    firsts = [max(order[p.name] for p in b.pieces) for b in layout.buckets]
    lasts = [min(order[p.name] for p in b.pieces) for b in layout.buckets]
    assert all(lo >= hi2 for lo, hi2 in zip(lasts, firsts[1:])), (firsts, lasts)


def test_large_elementwise_tensors_are_split_evenly_and_small_ones_balance_the_ranks():
    specs = _specs()
    world = 3
    plan = plan_ownership(specs, world)
    cap = 4000
    layout = build_layout(specs, plan, world, cap)
    for s in specs:
        pieces = layout.pieces_of(s.name)
        if s.geometry is not Geometry.HIDDEN and s.numel * world > cap:   # the 512×64 embedding and head
            assert len(pieces) > 1 and {p.rank for p in pieces} == set(range(world)), s.name
            assert max(p.numel for p in pieces) - min(p.numel for p in pieces) <= math.ceil(cap / world), s.name
        else:
            assert len(pieces) == 1, s.name
    held = [layout.held(r) for r in range(world)]
    assert max(held) <= sum(held) / world + max(s.numel for s in specs if s.geometry is Geometry.HIDDEN)


@pytest.mark.parametrize("world", [2, 3, 7])
def test_the_plain_layout_always_honours_the_cap_and_splits_tensors_at_segment_ends(world):
    specs = _specs()
    total = sum(s.numel for s in specs)
    for cap in (total, 5000, 777):
        layout = build_layout(specs, None, world, cap)
        check_every_element_placed_once(layout, specs)
        assert layout.cap_honoured and all(b.uniform for b in layout.buckets)
        assert layout.padding < world   # only the rounding of the last chunk
        assert any(len({p.rank for p in layout.pieces_of(s.name)}) > 1 for s in specs), "no tensor cut at a chunk end"


@pytest.mark.parametrize("model,nodes,gpus,tp,pp", PRESETS)
def test_planner_preset_layouts_pad_at_most_five_percent(model, nodes, gpus, tp, pp):
    """7B on 8 and 64 ranks, 13B on 64, 70B on 1,024 (TP 8, PP 8, DP 16): every stage's layout,
    built by the engine's own functions on TP-local shapes, pads ≤ 5% (70B used to pad 85%)."""
    planner = StepPlanner(model, ParallelLayout(nodes=nodes, gpus_per_node=gpus, tp=tp, pp=pp), OptimSettings())
    for st in planner.stages:
        assert st.layout.padding_fraction <= 0.05, (st.index, st.layout.padding_fraction)
        assert max(st.dp_plan.numel) <= math.ceil(st.layout.numel / st.layout.world) * 1.05


def test_layout_and_ownership_are_deterministic_from_names_and_shapes():
    specs = _specs()
    a = plan_ownership(specs, 3)
    b = plan_ownership(list(reversed(specs)), 3)
    assert a.owner == b.owner
    total = sum(s.numel for s in specs)
    assert build_layout(specs, a, 3, total // 3) == build_layout(specs, b, 3, total // 3)


def test_ownership_caps_owned_elements_where_flop_balance_alone_pads():
    """13B on 64 ranks: pure NS-FLOP balance gives one rank 8% more elements than its share (the
    layout's padding); the element cap keeps it within 5%."""
    specs = _specs(StepPlanner("llama-13b", ParallelLayout(), OptimSettings()).model)
    share = math.ceil(sum(s.numel for s in specs) / 64)
    flops_only = plan_ownership(specs, 64, balance_numel=False)
    capped = plan_ownership(specs, 64)
    assert max(flops_only.numel) > 1.08 * share
    assert max(capped.numel) <= 1.05 * share
    assert set(capped.owner) == set(flops_only.owner)


def test_bad_layout_arguments_are_clear_errors():
    specs = _specs()
    with pytest.raises(ValueError, match="world"):
        build_layout(specs, None, 0, 100)
    with pytest.raises(ValueError, match="bucket_numel"):
        build_layout(specs, None, 2, 0)
