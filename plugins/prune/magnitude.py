"""Unstructured magnitude pruning (the weight-pruning baseline of METHODS.md)."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from sparsify_core import Method, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import prunable_modules

from .masks import global_magnitude_masks, magnitude_mask


class MagnitudeParams(Params):
    sparsity: float = Field(gt=0, lt=1, description="fraction of the targeted weights to zero")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: each weight matrix reaches `sparsity`; "
                                 "global: one magnitude threshold across all targeted matrices")
    targets: list[str] | None = Field(
        None, description="regexes (re.search) on module paths of Linear/Conv1D modules to prune; "
                          "default: every Linear/Conv1D inside the transformer layers")
    exclude: list[str] = Field(["lm_head"], description="regexes of module paths never pruned")

    @field_validator("targets", "exclude")
    @classmethod
    def _regexes(cls, v):
        for p in v or []:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regex {p!r}: {exc}") from None
        return v


class Magnitude(Method):
    """Unstructured magnitude pruning: zero the smallest |w|, per layer or globally.

    Exactly ``round(sparsity * n)`` weights are pruned (ties at the threshold
    broken by position), per weight matrix (``per_layer``) or over all
    targeted matrices together (``global``). Masks are recorded in the run's
    ``MaskSet`` so pruned weights stay zero through later stages; already
    pruned weights (zeros) count among the smallest. Memory: per layer, one
    matrix's ``|w|`` in float32; global, the same per pass of an exact
    threshold bisection (at most 31 passes over the targeted weights).
    """

    kind = "prune"
    name = "magnitude"
    Params = MagnitudeParams

    def apply(self, ctx, params: MagnitudeParams) -> StageResult:
        modules = prunable_modules(ctx.model, params.targets, params.exclude)
        if not modules:
            raise SparsifyError(f"no Linear/Conv1D module matches targets={params.targets} "
                                f"outside exclude={params.exclude}")
        weights = [m.weight for _, m in modules]
        with ctx.progress(f"magnitude {params.scope} {params.sparsity:g}", total=len(modules)) as task:
            if params.scope == "global":
                masks = global_magnitude_masks(weights, params.sparsity)
                task.advance(len(modules))
            else:
                masks = []
                for w in weights:
                    masks.append(magnitude_mask(w, params.sparsity))
                    task.advance(1)
        for (name, _), keep in zip(modules, masks):
            ctx.masks.set(f"{name}.weight", keep)
        ctx.masks.apply(ctx.model)

        per_module, pruned, total = {}, 0, 0
        for name, module in modules:
            keep = ctx.masks.get(f"{name}.weight")
            n_pruned = int((~keep).sum())
            per_module[name] = n_pruned / keep.numel()
            pruned, total = pruned + n_pruned, total + keep.numel()
        return StageResult(
            metrics={"sparsity": pruned / total, "weights_pruned": float(pruned),
                     "modules_pruned": float(len(modules))},
            info={"module_sparsity": per_module})
