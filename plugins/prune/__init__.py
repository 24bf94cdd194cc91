"""Weight-pruning methods: ``prune/magnitude``, ``prune/wanda``, ``prune/sparsegpt``, ``prune/gmp`` (gradual).

Every method takes the shared ``PruneParams`` (sparsity, ``pattern``
unstructured or n:m, per-layer ``profile`` uniform / owl / explicit, module
``targets``); the mask math (``masks``, ``profiles``) and SparseGPT's
reconstruction (``sparsegpt_prune``) are pure functions on tensors.
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .gmp import GMP, GMPSchedule
from .magnitude import Magnitude
from .masks import (global_magnitude_masks, global_threshold, magnitude_mask, magnitude_ranks, nm_mask, nm_overflow,
                    parse_pattern, row_mask, row_quotas, wanda_scores)
from .profiles import layer_sparsities, outlier_ratio, owl_sparsities
from .schedule import cubic_sparsity, is_pruning_step, nm_keep, pruning_progress, pruning_window
from .selection import PruneParams
from .sparsegpt import SparseGPT, damped_factor, hessian_factor, reconstruction_error, sparsegpt_prune
from .wanda import Wanda

__all__ = ["Magnitude", "Wanda", "SparseGPT", "GMP", "GMPSchedule", "PruneParams", "cubic_sparsity",
           "is_pruning_step", "nm_keep", "pruning_progress", "pruning_window", "global_magnitude_masks", "global_threshold",
           "magnitude_mask", "magnitude_ranks", "nm_mask", "nm_overflow", "parse_pattern", "row_mask", "row_quotas",
           "wanda_scores", "layer_sparsities", "outlier_ratio", "owl_sparsities", "damped_factor", "hessian_factor",
           "reconstruction_error", "sparsegpt_prune"]


@hookimpl
def sparsify_methods():
    """Weight-pruning methods."""
    return [Magnitude, Wanda, SparseGPT, GMP]
