"""Stage methods: ``prune/random`` (a built-in kind) and ``quantize/round_to_grid`` (a kind of the plugin's own)."""
from __future__ import annotations

import torch
from pydantic import Field

from sparsify_core import Method, MetricInfo, Params, StageResult
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
