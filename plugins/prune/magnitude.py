"""Magnitude pruning (``docs/methods.md#magnitude``): unstructured or n:m, per layer or global."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparsify_core import Method, StageResult

from .masks import global_magnitude_masks, magnitude_mask, nm_mask
from .selection import (PruneParams, assign_sparsities, check_targets, prior_pruned, record_mask, select_targets,
                        summary)


class MagnitudeParams(PruneParams):
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: each weight matrix reaches its sparsity; "
                                 "global: one magnitude threshold across all targeted matrices")

    @model_validator(mode="after")
    def _global(self):
        if self.scope == "global" and (self.nm is not None or self.profile != "uniform"):
            raise ValueError("scope global takes an unstructured pattern and the uniform profile")
        return self


class Magnitude(Method):
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

    kind = "prune"
    name = "magnitude"
    Params = MagnitudeParams

    def data_splits(self, params):
        """The calibration split, read by the owl profile only."""
        return super().data_splits(params) if params.profile == "owl" else []

    def check(self, model, params) -> None:
        """Targets, n:m input widths and a per-layer profile, on the model's skeleton."""
        check_targets(model, params)

    def apply(self, ctx, params: MagnitudeParams) -> StageResult:
        targets = select_targets(ctx.model, params)
        per_layer = assign_sparsities(ctx, params, targets)
        nm = params.nm
        label = params.pattern if nm else f"{params.scope} {params.target_sparsity or 'profile'}"
        with ctx.progress(f"magnitude {label}", total=len(targets)) as task:
            prior = [prior_pruned(ctx, t) for t in targets]  # pruned before: count towards the request
            if params.scope == "global":
                masks = global_magnitude_masks([t.weight() for t in targets], params.sparsity, prior)
            else:
                masks = [nm_mask(t.weight().abs(), *nm, p) if nm else magnitude_mask(t.weight(), t.sparsity, p)
                         for t, p in zip(targets, prior)]
            for t, keep in zip(targets, masks):
                record_mask(ctx, t, keep)
                task.advance(1)
        return summary(ctx, targets, per_layer if params.profile != "uniform" else None)
