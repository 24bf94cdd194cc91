"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs"): prune by |W| times input norm.

Score ``|W_ij| * ||X_j||_2``, with ``||X_j||_2`` the norm of input feature
``j`` over the calibration tokens, compared within each output row
(unstructured) or within each group of m consecutive inputs of a row (n:m).
Unstructured, each row prunes its share of the matrix's
``round(sparsity * numel)``, rows differing by at most one weight
(``masks.row_mask``), so the matrix total is exact. No weight update.
Layers are processed in order, each calibrated on the outputs of the
already pruned layers before it (as the reference code does).
"""
from __future__ import annotations

from sparsify_core import Method, StageResult
from sparsify_core.calibration import CalibrationLayer, calibrate

from .masks import structured_mask, wanda_scores
from .selection import (PruneParams, assign_sparsities, by_layer, check_targets, input_sq_norms, prior_pruned,
                        record_mask, select_targets, summary)


class WandaParams(PruneParams):
    """Wanda takes the shared pruning parameters only."""


class Wanda(Method):
    """Wanda: prune the lowest |W| x ||X||_2 per output row (or per m inputs for n:m), layer by layer.

    Needs the calibration split. Targets must sit inside the transformer
    layers (the default). Cost: one forward of each layer to gather input
    norms (stopped after its last targeted module) and one to feed the
    pruned layer's outputs to the next; memory: one layer's hidden states.
    """

    kind = "prune"
    name = "wanda"
    Params = WandaParams

    def check(self, model, params) -> None:
        """Targets, n:m input widths and a per-layer profile, on the model's skeleton."""
        check_targets(model, params, inside_layers=True)

    def apply(self, ctx, params: WandaParams) -> StageResult:
        targets = select_targets(ctx.model, params, inside_layers=True)
        per_layer = assign_sparsities(ctx, params, targets)
        groups = by_layer(targets)
        nm = params.nm

        def visit(layer: CalibrationLayer) -> None:
            mine = groups.get(layer.index)
            if not mine:
                return
            norms = input_sq_norms(layer, mine)
            for t in mine:
                scores = wanda_scores(t.weight(), norms[t.name])
                record_mask(ctx, t, structured_mask(scores, t.sparsity, nm, prior_pruned(ctx, t)))

        tokens = calibrate(ctx, visit, split=params.calibration_split, batch_size=params.batch_size,
                           description=f"wanda {params.pattern if nm else 'unstructured'}")
        return summary(ctx, targets, per_layer if params.profile != "uniform" else None,
                       calibration_tokens=float(tokens))
