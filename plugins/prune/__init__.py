"""Weight-pruning methods: ``prune/magnitude``, ``prune/wanda``, ``prune/sparsegpt``.

Every method takes the shared ``PruneParams`` (sparsity, ``pattern``
unstructured or n:m, per-layer ``profile`` uniform / owl / explicit, module
``targets``); the mask math (``masks``, ``profiles``) and SparseGPT's
reconstruction (``sparsegpt_prune``) are pure functions on tensors.
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .magnitude import Magnitude
from .masks import (global_magnitude_masks, global_threshold, magnitude_mask, nm_mask, parse_pattern, row_mask,
                    wanda_scores)
from .profiles import layer_sparsities, outlier_ratio, owl_sparsities
from .selection import PruneParams
from .sparsegpt import SparseGPT, hessian_factor, reconstruction_error, sparsegpt_prune
from .wanda import Wanda

__all__ = ["Magnitude", "Wanda", "SparseGPT", "PruneParams", "global_magnitude_masks", "global_threshold",
           "magnitude_mask", "nm_mask", "parse_pattern", "row_mask", "wanda_scores", "layer_sparsities",
           "outlier_ratio", "owl_sparsities", "hessian_factor", "reconstruction_error", "sparsegpt_prune"]


@hookimpl
def sparsify_methods():
    """Weight-pruning methods."""
    return [Magnitude, Wanda, SparseGPT]
