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

from .masks import wanda_scores
from .pruner import ScorePruner
from .selection import PruneParams, input_sq_norms


class WandaParams(PruneParams):
    """Wanda takes the shared pruning parameters only."""


class Wanda(ScorePruner):
    """Wanda: prune the lowest |W| x ||X||_2 per output row (or per m inputs for n:m), layer by layer.

    Needs the calibration split. Targets must sit inside the transformer
    layers (the default). Cost: one forward of each layer to gather input
    norms (stopped after its last targeted module) and one to feed the
    pruned layer's outputs to the next; memory: one layer's hidden states.
    """

    name = "wanda"
    Params = WandaParams
    calibration = "layerwise"
    group = "row"

    def scores(self, ctx, params, targets, layer=None):
        """``|W_ij| * ||X_j||_2`` of each target, ``X`` the layer's calibration inputs."""
        norms = input_sq_norms(layer, targets)
        return {t.name: wanda_scores(t.weight(), norms[t.name]) for t in targets}
