"""Model size metrics: parameter counts, tied/shared parameters counted once."""
from __future__ import annotations

import torch

from sparsify_core import Metric, MetricValue


def count_parameters(model: torch.nn.Module, *, nonzero: bool = False) -> int:
    """Number of (non-zero) parameter entries; a parameter shared by several modules counts once."""
    return sum(int(torch.count_nonzero(p)) if nonzero else p.numel() for p in model.parameters())


class Parameters(Metric):
    """Number of parameters of the model (tied/shared parameters counted once)."""

    name = "parameters"

    def finish(self, ctx):
        return [MetricValue(self.name, float(count_parameters(ctx.model)))]


class NonzeroParameters(Metric):
    """Number of non-zero parameters of the model (tied/shared parameters counted once)."""

    name = "nonzero_parameters"

    def finish(self, ctx):
        return [MetricValue(self.name, float(count_parameters(ctx.model, nonzero=True)))]
