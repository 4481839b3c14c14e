"""Byzantine-robust FL, the pure math layer (issue 13): robust aggregators and untargeted attacks
over flattened client updates.

* :mod:`fedtrust.robust.types`: :class:`Updates` (the round's (n, d) deltas, weights, ids) and :class:`Aggregate`;
* :mod:`fedtrust.robust.aggregators`: aggregators registered under the ``"aggregator"`` kind;
* :mod:`fedtrust.robust.byzantine`: attack functions (sign flip, Gaussian, ALIE, IPM, min-max, min-sum, label flip).
"""

from fedtrust.robust.types import Aggregate, Updates

__all__ = ["Aggregate", "Updates"]
