"""Split Newton–Schulz: the planner's model of running one large matrix's NS over a team of ranks.

Why. Whole-matrix ownership balances NS FLOPs only as well as whole matrices pack: 13B on 64
ranks cannot go below 1.077 max/mean, and at 70B on 1,024 GPUs (TP 8, PP 8, DP 16) one FFN
matrix (28672 × 8192, 44 TFLOP of NS5) is 3.4× the mean NS work per rank. Here the matrices
an overloaded rank owns are split by **columns of the wide orientation** and the column blocks
run on teammates. With X = [X_1 … X_c] (m × n, m ≤ n: X or Xᵀ), member i holding k_i columns
and r_i = m·k_i/n rows of the m × m polynomial, per quintic iteration:

    A   = Σ_i X_i X_iᵀ                 2m²k_i FLOPs, then one all-reduce of m×m   (ns_gram)
    B[r_i rows] = bA + cA[r_i rows]·A   2m²r_i FLOPs, then one all-gather of m×m   (ns_gram_gather)
    X_i ← aX_i + B X_i                  2m²k_i FLOPs

— Megatron-core's "distributed" TP mode for Muon (Gram all-reduced once per iteration), with
the A² product split by rows as well instead of replicated (replicating it costs 2m³ per member
per iteration, 5.5 TFLOP per step at m = 8192: more than the mean NS work per rank at 70B). So
member i does exactly ``k_i/n`` of the whole matrix's NS FLOPs, and each member moves two m×m
collectives per iteration. The owner of the whole reduced gradient (the engine layout's owner)
sends each teammate its block (``ns_split_scatter``) and gets the orthogonalised block back
(``ns_split_gather``): ``Σ_{i≠owner} m·k_i`` elements each way. The nuclear-norm estimator
(``ns``) would split the same way; this model splits only the LMO's NS (the estimator's FLOPs
are reported unsplit).

Plan (:func:`plan_split`, deterministic from the ownership plan and shapes). Target per rank
``τ = (1 + tolerance) · mean`` of the whole-matrix plan. Overloaded ranks, heaviest first,
offload their largest single-block matrices until they are within τ: the owner keeps the
columns that fill it to τ, and the least-loaded candidates take as many columns as fit
under τ. Candidates are the
owner's TP group first when ``tp > 1`` (NVLink; team group ``tp``), then every NS rank of the
stage (team group ``dp``, across nodes at scale). Columns nobody can take stay with the owner.
At 70B on 1,024 GPUs TP-group teams alone reach only 1.28 (the DP owners' whole-shape NS totals
differ by that much); the few cross-node teams that bring it to 1.02 cost more Gram traffic
time (m = 8192: 268 MB per fp32 Gram collective) than they save — ``lanton-dist plan`` prints both
the NS time and the split's collective time.

Where it plugs in (the next core round). The core's LMO step (``ShardedCore._directions`` →
``lmo.newton_schulz`` on the owner's whole matrices) gains a ``SplitNS`` exchange next to
:class:`~lanton_dist.engine.core.MatrixExchange`: after the reduce-scatter, the owner of a
split matrix sends the column blocks to its team (one all-to-all per bucket of split matrices,
on the DP/TP group), every member runs ``newton_schulz_columns(X_i, gram_all_reduce)`` — the
same quintic iteration with the Gram matrix summed over the team's process group before the
polynomial — and the blocks return to the owner, which writes the whole update into its
segment as today (the layout, the all-gather and the meter are unchanged; the meter gains the
three phases above). With TP the team is the TP group, whose Megatron shards of w_gate/w_up
(rows of the tall matrix) and w_down (columns of the wide one) already *are* column blocks of
the wide orientation, so the scatter and gather disappear there and only the Gram all-reduces
remain. Test against the reference: ``newton_schulz_columns`` on c column blocks with a
CPU gloo group of c ranks equals ``newton_schulz`` on the whole matrix to fp64 rounding for
c = 1, 2, 3 (uneven blocks) and both orientations; then the engine's world-3 equivalence test
with a split forced by a tiny τ, and the meter equal to :func:`split_collectives` as
``tests/test_plan.py`` checks the other phases.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from lanton_dist.engine.ownership import OwnershipPlan, ns_cost
from lanton_dist.groups import ParamSpec
from lanton_dist.plan.predictions import Collective

#: Default slack of the per-rank NS target over the mean (plan_split's ``tolerance``).
SPLIT_TOLERANCE = 0.02


@dataclass(frozen=True)
class SplitPlan:
    """NS work per rank with large matrices split (module doc).

    ``flops``: per NS rank, with the split (the same total as ``whole_flops``, the whole-matrix plan's);
    ``teams``: matrix name → ``((rank, columns), …)`` (owner first) for every split matrix;
    ``gram``: matrix name → (``m``, team group name)."""

    ranks: int
    flops: tuple[int, ...]
    whole_flops: tuple[int, ...]
    teams: dict[str, tuple[tuple[int, int], ...]]
    gram: dict[str, tuple[int, str]]

    @property
    def imbalance(self) -> float:
        mean = sum(self.whole_flops) / self.ranks
        return max(self.flops) / mean if mean else 1.0

    @property
    def whole_imbalance(self) -> float:
        mean = sum(self.whole_flops) / self.ranks
        return max(self.whole_flops) / mean if mean else 1.0


def _shape(spec: ParamSpec) -> tuple[int, int]:
    """``(m, n)``: rows and columns of the wide orientation."""
    a, b = spec.shape[0], spec.numel // spec.shape[0]
    return min(a, b), max(a, b)


def plan_split(hidden: list[ParamSpec], ownership: OwnershipPlan, ns_steps: int, tp: int = 1,
               tolerance: float = SPLIT_TOLERANCE) -> SplitPlan:
    """Split the NS of overloaded ranks' largest matrices over teams (module doc). ``ownership``:
    the whole-matrix plan over the stage's NS ranks (rank ``q = d·tp + t`` when ``tp > 1``)."""
    R = ownership.world
    by_owner: dict[int, list[ParamSpec]] = defaultdict(list)
    for s in hidden:
        by_owner[ownership.owner[s.name]].append(s)
    load = [sum(ns_cost(s, ns_steps) for s in by_owner[r]) for r in range(R)]
    whole = tuple(load)
    tau = (1 + tolerance) * sum(load) / R
    teams: dict[str, tuple[tuple[int, int], ...]] = {}
    gram: dict[str, tuple[int, str]] = {}
    for r in sorted(range(R), key=lambda q: (-load[q], q)):
        for s in sorted((x for x in by_owner[r] if len(x.blocks) == 1), key=lambda x: (-ns_cost(x, ns_steps), x.name)):
            if load[r] <= tau:
                break
            m, n = _shape(s)
            per_col = ns_cost(s, ns_steps) / n
            rest = load[r] - ns_cost(s, ns_steps)
            keep = min(n, max(0, math.floor((tau - rest) / per_col)))
            left, parts, tp_only = n - keep, [], True
            group = [q for q in range(R) if q // tp == r // tp and q != r] if tp > 1 else []
            others = [q for q in range(R) if q != r and q not in group]
            for tier in (group, others):
                for q in sorted(tier, key=lambda q: (load[q], q)):
                    if not left:
                        break
                    k = min(left, math.floor((tau - load[q]) / per_col))
                    if k <= 0:
                        continue
                    parts.append((q, k))
                    load[q] += round(per_col * k)
                    left -= k
                    tp_only = tp_only and tier is group
            if not parts:
                continue
            keep += left
            load[r] = rest + ns_cost(s, ns_steps) - sum(round(per_col * k) for _, k in parts)
            teams[s.name] = ((r, keep), *parts)
            gram[s.name] = (m, "tp" if (tp > 1 and tp_only) else "dp")
    return SplitPlan(R, tuple(load), whole, teams, gram)


def split_collectives(plan: SplitPlan, hidden: list[ParamSpec], rank: int, ns_steps: int, elem: int) -> list[Collective]:
    """What NS rank ``rank`` would issue per step for the split matrices (module doc): per team it
    belongs to, the owner's ``ns_split_scatter`` (all-to-all: the teammates' blocks), each
    member's ``ns_steps`` × (all-reduce of A, all-gather of B: ``m²`` elements each;
    ``ns_gram``, ``ns_gram_gather``) and each teammate's ``ns_split_gather`` (its block back)."""
    spec = {s.name: s for s in hidden}
    out: list[Collective] = []
    for name, team in plan.teams.items():
        members = [(q, k) for q, k in team if k > 0]
        if rank not in {q for q, _ in team}:
            continue
        m, group = plan.gram[name]
        c = len(members)
        owner, keep = team[0]
        if rank == owner:
            out.append(Collective("all_to_all", "ns_split_scatter", group, len(team), spec[name].numel, elem, m * keep))
        else:
            k = dict(team)[rank]
            out.append(Collective("all_to_all", "ns_split_gather", group, len(team), m * k, elem, 0))
        if dict(team)[rank] > 0 and c > 1:
            out += [Collective("all_reduce", "ns_gram", group, c, m * m, elem),
                    Collective("all_gather", "ns_gram_gather", group, c, m * m, elem)] * ns_steps
    return out
