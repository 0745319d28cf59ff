"""The option names every layer validates against, in one torch-free place.

The planner and the ``lanton-dist`` CLI import them without torch; the optimizer modules that
own the behaviour behind each name (the engine's core, :mod:`lanton_dist.nuclear`,
:mod:`lanton_dist.noise`, :mod:`lanton_dist.factory`) validate against the same tuples.
"""
from __future__ import annotations

#: Optimizers: ``lanton``, ``scion`` (LANTON with ``noise_adaptive=False``), ``dmuon``, ``adamw``.
ALGORITHMS: tuple[str, ...] = ("lanton", "scion", "dmuon", "adamw")
#: Nuclear-norm estimators of :func:`lanton_dist.nuclear.nuclear_norm` (``auto`` resolves to one).
ESTIMATORS: tuple[str, ...] = ("exact", "ns", "rsvd")
#: LANTON's gradient-noise estimators: Option I (previous step's gradient), II (two half batches).
OPTIONS: tuple[str, ...] = ("I", "II")
#: How LANTON's noise floor α is chosen per group (:mod:`lanton_dist.noise`): as configured, or from the first estimate.
ALPHA_MODES: tuple[str, ...] = ("fixed", "auto")
#: Bucket layouts of the ZeRO engine: ``owner`` (whole matrices on their owners) or ``plain``.
ZERO_LAYOUTS: tuple[str, ...] = ("owner", "plain")
