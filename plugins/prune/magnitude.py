"""Magnitude pruning (``docs/methods.md#magnitude``): unstructured or n:m, per layer or global."""
from __future__ import annotations

from .pruner import ScopedPruneParams, ScorePruner


class MagnitudeParams(ScopedPruneParams):
    """The shared pruning parameters and ``scope`` (per matrix, or one threshold over all targets)."""


class Magnitude(ScorePruner):
    """Magnitude pruning: zero the smallest |w|, per matrix, globally, or keeping n of every m.

    Unstructured: exactly ``round(sparsity * n)`` weights are pruned (ties at
    the threshold broken by position), per weight matrix (``per_layer``, with
    the matrix's layer sparsity under a profile) or over all targeted matrices
    together (``global``). ``pattern: n:m`` keeps the n largest |w| of every m
    consecutive inputs of each row. Masks are recorded in the run's
    ``MaskSet`` so pruned weights stay zero through later stages; weights
    pruned by earlier stages are taken first and count towards the request.
    Memory: per layer, one
    matrix's ``|w|`` in float32; global, the same per pass of an exact
    threshold bisection (at most 31 passes over the targeted weights).
    """

    name = "magnitude"
    Params = MagnitudeParams

    def scores(self, ctx, params, targets, layer=None):
        """The weights themselves (views, no copy): ``score_masks`` ranks by ``|w|``."""
        return {t.name: t.weight() for t in targets}
