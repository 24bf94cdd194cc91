"""Model size metrics: logical parameter counts, tied/shared parameters counted once."""
from __future__ import annotations

import torch

from sparsify_core import Metric, MetricValue
from sparsify_core.ffn import is_stored_linear, weight_numel


def count_parameters(model: torch.nn.Module, *, nonzero: bool = False) -> int:
    """Number of logical (non-zero) parameter entries; a parameter shared by several modules counts once.

    Logical: a weight held in a sparse layout (a stored linear, see
    ``sparsify_core.ffn``) counts as the dense ``[out, in]`` matrix it stores,
    ``out * in`` entries (its non-zeros with ``nonzero``), not as its storage
    buffers; so converting a layout changes neither count.
    """
    total = sum(int(torch.count_nonzero(p)) if nonzero else p.numel() for p in model.parameters())
    stored = {id(m): m for m in model.modules() if is_stored_linear(m)}
    with torch.no_grad():
        for m in stored.values():
            total += int(torch.count_nonzero(m.dense_weight())) if nonzero else weight_numel(m)
    return total


class Parameters(Metric):
    """Number of parameters of the model (tied/shared parameters counted once; a sparse layout as its dense matrix)."""

    name = "parameters"
    higher_is_better = False
    unit = "params"
    fraction = False

    def finish(self, ctx):
        return [MetricValue(self.name, float(count_parameters(ctx.model)))]


class NonzeroParameters(Metric):
    """Number of non-zero parameters of the model (tied/shared parameters counted once, sparse layouts included)."""

    name = "nonzero_parameters"
    higher_is_better = False
    unit = "params"
    fraction = False

    def finish(self, ctx):
        return [MetricValue(self.name, float(count_parameters(ctx.model, nonzero=True)))]
