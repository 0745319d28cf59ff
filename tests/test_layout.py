"""Specification of the owner-aligned bucket layout and the ownership plan behind it
(lanton_dist.engine.layout / .ownership), on model shapes alone (no torch)."""
from __future__ import annotations

import math

import pytest

from lanton_dist.config import ModelConfig
from lanton_dist.engine.layout import MAX_PADDING, Layout, build_layout
from lanton_dist.engine.ownership import plan_ownership
from lanton_dist.groups import Geometry
from lanton_dist.plan import OptimSettings, ParallelLayout, StepPlanner, engine_order, llama_specs

SMALL = ModelConfig(vocab_size=512, dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=16)
#: (model, nodes, gpus per node, tp, pp): the planner presets the layout must serve.
PRESETS = [("llama-7b", 1, 8, 1, 1), ("llama-7b", 8, 8, 1, 1), ("llama-13b", 8, 8, 1, 1), ("llama-70b", 128, 8, 8, 8)]


def _specs(cfg: ModelConfig = SMALL):
    return engine_order(llama_specs(cfg))


def check_every_element_placed_once(layout: Layout, specs) -> None:
    """Pieces tile each parameter exactly, sit inside their segment and never overlap there."""
    covered = {s.name: [] for s in specs}
    for b in layout.buckets:
        for r in range(layout.world):
            spans = sorted((p.offset, p.offset + p.numel) for p in b.on_rank(r))
            assert all(0 <= a < z <= b.segment for a, z in spans), f"bucket {b.index} rank {r}: piece outside its segment"
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
def test_every_element_is_placed_exactly_once_and_hidden_matrices_lie_whole_in_their_owners_segment(world):
    specs = _specs()
    plan = plan_ownership(specs, world)
    total = sum(s.numel for s in specs)
    for cap in (total, total // 3, total // 8, 1):
        layout = build_layout(specs, plan, world, cap)
        check_every_element_placed_once(layout, specs)
        check_hidden_whole_on_owner(layout, specs, plan)
        assert layout.padding <= MAX_PADDING * total or len(layout.buckets) == 1


def test_the_bucket_cap_is_honoured_when_whole_matrices_allow_it():
    specs = _specs()
    world = 3
    plan = plan_ownership(specs, world)
    total = sum(s.numel for s in specs)
    for parts in (2, 3, 4):
        cap = math.ceil(total * 1.1 / parts)
        layout = build_layout(specs, plan, world, cap)
        assert layout.cap_honoured, (parts, layout.max_bucket_numel, cap)
        assert len(layout.buckets) >= parts
        assert layout.padding <= MAX_PADDING * total


@pytest.mark.parametrize("world", [2, 3, 7])
def test_the_plain_layout_always_honours_the_cap_and_splits_tensors_at_segment_ends(world):
    specs = _specs()
    total = sum(s.numel for s in specs)
    for cap in (total, 5000, 777):
        layout = build_layout(specs, None, world, cap)
        check_every_element_placed_once(layout, specs)
        assert layout.cap_honoured
        assert layout.padding < world * len(layout.buckets)   # only the rounding of the last segment
        assert any(len({p.rank for p in layout.pieces_of(s.name)}) > 1 for s in specs), "no tensor cut at a segment end"


def test_elementwise_tensors_fill_the_room_next_to_whole_matrices():
    """Padding only appears once the elementwise stream is used up: every segment filled before
    the last elementwise piece is full."""
    specs = _specs()
    world = 3
    plan = plan_ownership(specs, world)
    layout = build_layout(specs, plan, world, sum(s.numel for s in specs) // 3)
    elementwise = {s.name for s in specs if s.geometry is not Geometry.HIDDEN}
    slots = [(b, r) for b in layout.buckets for r in range(world)]
    last = max(i for i, (b, r) in enumerate(slots) if any(p.name in elementwise for p in b.on_rank(r)))
    for b, r in slots[:last]:
        assert sum(p.numel for p in b.on_rank(r)) == b.segment, f"bucket {b.index} rank {r} padded before the stream ended"
    split = [n for n in elementwise if len(layout.pieces_of(n)) > 1]
    assert split, "no elementwise tensor was cut to fill a segment"


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
