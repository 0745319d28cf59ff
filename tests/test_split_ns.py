"""Specification of split Newton–Schulz (issue #12 item 4): the column-split iteration equals the
whole-matrix kernel, and the ZeRO engine with a split forced equals the single-process
reference, runs each matrix's NS once with the plan's per-rank work, and moves exactly the
bytes the planner lists (:func:`lanton_dist.plan.splitns.split_collectives`)."""
from __future__ import annotations

import pytest
import torch

from distributed import run
from engine_cases import batches, make_model, max_rel_err, reference_run, rows, sharded_run, backward_step, loss_fn
from lanton_dist.config import OptimConfig
from lanton_dist.engine.meter import Collectives, CommMeter
from lanton_dist.newton_schulz import newton_schulz, newton_schulz_columns, newton_schulz_flops
from lanton_dist.plan.splitns import SplitBatch, SplitPlan, split_batches, split_collectives

SPLIT_PHASES = ("ns_split_scatter", "ns_gram", "ns_gram_gather", "ns_split_gather")


def _column_team(rank: int, world: int, batch: SplitBatch, meter: CommMeter):
    """gram_sum / gather_rows over the default gloo group, through the engine's metered all-to-all."""
    coll = Collectives(meter, None, "dp")
    counts = [batch.rows(q)[1] - batch.rows(q)[0] for q in batch.ranks]
    m = batch.m

    def gram_sum(A):
        coll.all_reduce(A, "ns_gram").wait()

    def gather_rows(R):
        mine = R.transpose(0, 1).reshape(1, -1)
        out = R.new_empty(m * R.size(0) * m)
        coll.all_to_all(out, mine.expand(world, -1).reshape(-1), [k * R.size(0) * m for k in counts],
                        [mine.numel()] * world, "ns_gram_gather").wait()
        return out.view(m, R.size(0), m).transpose(0, 1)

    return gram_sum, gather_rows


def _columns_worker(rank, world, cases):
    """This rank's blocks, per case ``(x, ks, kwargs)``: x ``(b, m, n)`` in its wide orientation."""
    out = []
    for x, ks, kwargs in cases:
        batch = SplitBatch(("x",), 0, tuple(enumerate(ks)), x.shape[-2], x.shape[-1], "dp")
        c0, c1 = batch.columns(rank)
        gram_sum, gather_rows = _column_team(rank, world, batch, CommMeter())
        out.append(newton_schulz_columns(x[..., c0:c1], batch.rows(rank), gram_sum, gather_rows, **kwargs))
    return out


COLUMN_CASES = {  # team size → (column counts, shape, options)
    1: [((24,), (2, 8, 24), {})],
    2: [((7, 17), (2, 8, 24), {}), ((20, 4), (3, 24, 8), {})],
    3: [((3, 10, 11), (2, 8, 24), {}),
        ((3, 10, 11), (3, 24, 8), {}),  # tall: split the columns of its transpose
        ((5, 0, 19), (1, 8, 24), {}),   # a member with no columns
        ((3, 10, 11), (2, 8, 24), {"start": "gram", "schedule": "polar_express", "steps": 6, "refine_steps": 2}),
        ((3, 10, 11), (2, 8, 24), {"symmetric": True})],
}


@pytest.mark.parametrize("c", [1, 2, 3])
def test_column_split_newton_schulz_equals_the_whole_matrix_kernel_in_fp64(c):
    """c = 1, 2, 3 uneven column blocks over a gloo group of c ranks, batched, both orientations
    (a tall matrix is split as its wide transpose), the start/schedule/refine/symmetric options:
    the concatenated blocks equal ``newton_schulz`` of the whole matrix to ≤ 1e-10 (fp64)."""
    torch.manual_seed(0)
    xs = [torch.randn(*shape, dtype=torch.float64) for _, shape, _ in COLUMN_CASES[c]]
    cases = [((x.mT if x.shape[-2] > x.shape[-1] else x).contiguous(), ks, kw) for x, (ks, _, kw) in zip(xs, COLUMN_CASES[c])]
    blocks = run(_columns_worker, c, cases)
    for i, (x, (_, _, kwargs)) in enumerate(zip(xs, COLUMN_CASES[c])):
        got = torch.cat([blocks[r][i] for r in range(c)], dim=-1)
        got = got.mT if x.shape[-2] > x.shape[-1] else got
        assert (got - newton_schulz(x, **kwargs)).abs().max().item() <= 1e-10, (c, i)


def test_column_split_refuses_torch_compile_and_bad_rows():
    x = torch.randn(1, 4, 6)
    with pytest.raises(ValueError, match="torch.compile"):
        newton_schulz_columns(x, (0, 4), lambda a: None, lambda r: r, compile_backend="aot_eager")
    with pytest.raises(ValueError, match="row range"):
        newton_schulz_columns(x, (2, 5), lambda a: None, lambda r: r)
    with pytest.raises(ValueError, match="start"):
        newton_schulz_columns(x, (0, 4), lambda a: None, lambda r: r, start="nope")
