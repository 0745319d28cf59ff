"""Split Newton–Schulz: the rule for running one large matrix's NS over a team of ranks — which
matrices, which teams, which columns — shared by the engine (:mod:`lanton_dist.engine.splitns`,
which runs it) and the planner (:mod:`lanton_dist.plan.splitns`, which predicts its collectives).
Pure Python (no torch).

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

Where it plugs in (:mod:`lanton_dist.engine.splitns`, ``ShardedLANTON(ns_split_tolerance=τ)``,
``optim.ns_split_tolerance``; off by default). The ZeRO engine plans the split from its own
ownership plan (``tp = 1``: teams of DP ranks, group ``dp``) and hands the core a polar function
(:class:`~lanton_dist.engine.core.ShardedCore`'s ``polar``). Every step, on every rank, the split
matrices run as :func:`split_batches` (same-shape matrices of one team, batched), in that
order: the owner sends each teammate its column block (``ns_split_scatter``, one all-to-all
over the team's process group), every member with columns runs
:func:`~lanton_dist.newton_schulz.newton_schulz_columns` on its block (``ns_gram`` all-reduce
and ``ns_gram_gather`` — an all-to-all, the uneven all-gather of the rows of
:meth:`SplitBatch.rows` — per quintic step), and the blocks return to the owner
(``ns_split_gather``), which applies the LMO scale and writes the whole update into its
chunk as before (the layout and the bucket collectives are unchanged). Blocks and
rows go to the members in ascending rank order (:meth:`SplitBatch.columns`); member i's row
share is ``⌊m·K_i/n⌋ − ⌊m·K_{i−1}/n⌋`` (``K``: cumulative columns), so its NS FLOPs are its
column share up to one row. :func:`lanton_dist.plan.splitns.split_collectives` lists exactly what the engine's meter
records (``tests/test_split_ns.py``). Across nodes at TP 1 the Gram traffic costs more time
than the balance saves (``lanton-dist plan``), hence off by default. With TP the team would be
the TP group, whose Megatron shards of w_gate/w_up (rows of the tall matrix) and w_down
(columns of the wide one) already *are* column blocks of the wide orientation, so the scatter
and gather would disappear there — the planner models that case (group ``tp``); the Megatron
adapter does not implement it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from lanton_dist.engine.ownership import OwnershipPlan, ns_cost
from lanton_dist.groups import ParamSpec

#: Default slack of the per-rank NS target over the mean (plan_split's ``tolerance``): with it the
#: split reaches NS imbalance ≤ 1.02 for every preset on 64–1,024 ranks (docs/planning.md).
SPLIT_TOLERANCE = 0.02


def check_tolerance(tolerance: float) -> float:
    """``tolerance`` as a float, or ``ValueError`` unless finite and ``>= 0``."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"ns_split_tolerance must be a finite number >= 0 (None: no split), got {tolerance!r}")
    return float(tolerance)


@dataclass(frozen=True)
class SplitBatch:
    """Same-shape matrices split alike over one team: the engine's unit of split NS work.

    ``names``: the matrices, in plan order; ``owner``: the rank holding them whole;
    ``members``: ``(rank, columns)`` of every team member (owner included, possibly with 0
    columns), ascending rank; ``m × n``: the wide orientation (m ≤ n); ``group``: the team's
    group role (``dp`` | ``tp``)."""

    names: tuple[str, ...]
    owner: int
    members: tuple[tuple[int, int], ...]
    m: int
    n: int
    group: str

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(q for q, _ in self.members)

    @property
    def iterating(self) -> tuple[int, ...]:
        """Members with columns: they run the iteration (and its Gram collectives when > 1)."""
        return tuple(q for q, k in self.members if k > 0)

    def columns(self, rank: int) -> tuple[int, int]:
        """``[c0, c1)``: ``rank``'s columns of the wide orientation (blocks in ascending rank order)."""
        c0 = 0
        for q, k in self.members:
            if q == rank:
                return c0, c0 + k
            c0 += k
        raise ValueError(f"rank {rank} is not in the team of {self.names}")

    def rows(self, rank: int) -> tuple[int, int]:
        """``[r0, r1)``: ``rank``'s rows of the m × m polynomials, ``⌊m·c/n⌋`` at its column bounds."""
        c0, c1 = self.columns(rank)
        return self.m * c0 // self.n, self.m * c1 // self.n


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
        splittable = (x for x in by_owner[r] if len(x.blocks) == 1 and len(x.shape) == 2)
        for s in sorted(splittable, key=lambda x: (-ns_cost(x, ns_steps), x.name)):
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


def split_batches(plan: SplitPlan, hidden: list[ParamSpec]) -> list[SplitBatch]:
    """The split matrices grouped into :class:`SplitBatch` es (same team and column counts, same
    logical shape), in the order of their first matrix in ``plan.teams`` — the order every rank
    runs them in (a total order, so teams sharing ranks cannot deadlock)."""
    spec = {s.name: s for s in hidden}
    batches: dict[tuple, list[str]] = {}
    for name, team in plan.teams.items():
        batches.setdefault((team, spec[name].logical_shape), []).append(name)
    out = []
    for (team, _), names in batches.items():
        m, n = _shape(spec[names[0]])
        out.append(SplitBatch(tuple(names), team[0][0], tuple(sorted(team)), m, n, plan.gram[names[0]][1]))
    return out
