"""An example third-party sparsify plugin.

It implements every hook of ``sparsify_core/hookspecs.py`` but model sources
and layouts:

- ``sparsify_methods``: ``prune/random`` (a method of a built-in kind) and
  ``quantize/round_to_grid`` (a kind of its own);
- ``sparsify_data_sources``: ``arithmetic``, written-out sums;
- ``sparsify_metrics``: ``weight_l2``;
- the lifecycle hooks: a tracker that appends one JSON line per call to the
  file named by ``SPARSIFY_EXAMPLE_LOG`` (nothing without it), the way a
  plugin would forward a run to an experiment tracker.

Installed, it is found through the ``sparsify.plugins`` entry point in its
pyproject.toml.
"""
from __future__ import annotations

import json
import os

import torch
from pydantic import Field

from sparsify_core import DataSource, Method, Metric, MetricInfo, MetricValue, Params, StageResult, hookimpl
from sparsify_core.ffn import prunable_modules


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
        return StageResult(metrics={"layers_pruned": pruned},
                           metric_info={"layers_pruned": MetricInfo(higher_is_better=None, unit="layers")})


class RoundToGrid(Method):
    """Fake quantization: round each prunable weight to a symmetric grid of ``2**(bits-1)-1`` steps per sign.

    One scale per weight matrix (its largest magnitude), so a zero stays zero
    and pruned weights stay pruned. A kind of the plugin's own: recipes use it
    as ``kind: quantize, method: round_to_grid``.
    """

    kind = "quantize"
    name = "round_to_grid"

    class Params(Params):
        bits: int = Field(8, ge=2, le=16, description="bits per weight, sign included")

    def apply(self, ctx, params):
        levels = 2 ** (params.bits - 1) - 1
        worst, modules = 0.0, prunable_modules(ctx.model)
        with torch.no_grad():
            for _, module in modules:
                w = module.weight
                scale = float(w.abs().max()) / levels
                if scale == 0.0:
                    continue
                rounded = torch.round(w / scale) * scale
                worst = max(worst, float((rounded - w).abs().max()))
                w.copy_(rounded)
        return StageResult(metrics={"quantized_modules": len(modules), "max_abs_error": worst},
                           metric_info={"quantized_modules": MetricInfo(unit="modules"),
                                        "max_abs_error": MetricInfo(higher_is_better=False)})


class Arithmetic(DataSource):
    """Written-out sums ("12 + 30 = 42."), one document each; every ``eval_every``-th is held out for eval."""

    name = "arithmetic"

    class Params(Params):
        limit: int = Field(100, ge=4, le=1000, description="operands run from 0 to limit - 1")
        eval_every: int = Field(10, ge=2, description="every n-th sum goes to the eval partition")

    def texts(self, params):
        sums = [f"{a} + {b} = {a + b}." for a in range(params.limit) for b in range(params.limit)]
        return {"train": [s for i, s in enumerate(sums) if i % params.eval_every],
                "eval": sums[::params.eval_every]}


class WeightL2(Metric):
    """Euclidean norm of all parameters (a static metric)."""

    name = "weight_l2"
    higher_is_better = None  # describes the model; neither direction is better
    unit = ""
    fraction = False

    def finish(self, ctx):
        total = sum(float(p.detach().float().pow(2).sum()) for p in ctx.model.parameters())
        return [MetricValue(self.name, total ** 0.5)]


@hookimpl
def sparsify_methods():
    return [RandomPrune, RoundToGrid]


@hookimpl
def sparsify_data_sources():
    return [Arithmetic]


@hookimpl
def sparsify_metrics():
    return [WeightL2]


# -- the tracker: one JSON line per lifecycle call --------------------------------


def _track(event: str, **fields) -> None:
    path = os.environ.get("SPARSIFY_EXAMPLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


@hookimpl
def sparsify_run_started(run_id, recipe, resumed):
    _track("run_started", run=run_id, recipe=recipe.name, resumed=resumed)


@hookimpl
def sparsify_stage_started(run_id, index, stage):
    _track("stage_started", run=run_id, index=index, stage=stage.name, kind=stage.kind, method=stage.method)


@hookimpl
def sparsify_metrics_logged(run_id, stage, step, metrics):
    _track("metrics_logged", run=run_id, stage=stage, step=step, metrics=metrics)


@hookimpl
def sparsify_stage_finished(run_id, index, stage, status, metrics):
    _track("stage_finished", run=run_id, index=index, stage=stage.name, status=status, metrics=metrics)


@hookimpl
def sparsify_run_finished(run_id, status, reason):
    _track("run_finished", run=run_id, status=status, reason=reason)
