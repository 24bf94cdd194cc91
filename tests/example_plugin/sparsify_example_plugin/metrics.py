"""A static metric: ``weight_l2``."""
from __future__ import annotations

from sparsify_core import Metric, MetricValue


class WeightL2(Metric):
    """Euclidean norm of all parameters (a static metric)."""

    name = "weight_l2"
    higher_is_better = None  # describes the model; neither direction is better
    unit = ""
    fraction = False

    def finish(self, ctx):
        total = sum(float(p.detach().float().pow(2).sum()) for p in ctx.model.parameters())
        return [MetricValue(self.name, total ** 0.5)]
