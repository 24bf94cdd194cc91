"""An example third-party sparsify plugin.

It adds a stage method (``prune``/``random``), a metric (``weight_l2``) and a
lifecycle hook that appends every logged metric to a JSON-lines file, the way
a plugin would forward them to an experiment tracker. Installed, it is found
through the ``sparsify.plugins`` entry point in its pyproject.toml.
"""
from __future__ import annotations

import json
import os

import torch
from pydantic import Field

from sparsify_core import Method, Metric, MetricValue, Params, StageResult, hookimpl


class RandomPrune(Method):
    """Random unstructured pruning of every Linear layer but lm_head (a baseline)."""

    kind = "prune"
    name = "random"

    class Params(Params):
        sparsity: float = Field(gt=0, lt=1, description="fraction of weights to zero in each layer")

    def apply(self, ctx, params):
        gen = torch.Generator().manual_seed(ctx.seed)
        pruned = 0
        for name, module in ctx.model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                keep = torch.rand(module.weight.shape, generator=gen) >= params.sparsity
                ctx.masks.set(f"{name}.weight", keep)
                pruned += 1
        ctx.masks.apply(ctx.model)
        return StageResult(metrics={"layers_pruned": pruned})


class WeightL2(Metric):
    """Euclidean norm of all parameters (a static metric)."""

    name = "weight_l2"

    def finish(self, ctx):
        total = sum(float(p.detach().float().pow(2).sum()) for p in ctx.model.parameters())
        return [MetricValue(self.name, total ** 0.5)]


@hookimpl
def sparsify_methods():
    return [RandomPrune]


@hookimpl
def sparsify_metrics():
    return [WeightL2]


@hookimpl
def sparsify_metrics_logged(run_id, stage, step, metrics):
    path = os.environ.get("SPARSIFY_EXAMPLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"run": run_id, "stage": stage, "step": step, "metrics": metrics}) + "\n")
