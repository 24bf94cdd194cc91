"""Weight-pruning methods: ``prune/magnitude``, ``prune/wanda``, ``prune/sparsegpt``, ``prune/nmg``, ``prune/gmp``,
``prune/maskllm`` and ``prune/width`` (structured: removes FFN neurons and attention heads, the model shrinks).

``ScorePruner`` (``pruner``) is the public template of a pruning method: a
criterion implements ``scores`` and inherits the targets, profiles,
selection (per matrix, per row, global, n:m), exact counting with earlier
masks, the masks and the metrics (``prune/magnitude``, ``prune/wanda`` and
``prune/nmg`` are written on it). Every method takes the shared
``PruneParams`` (sparsity, ``pattern`` unstructured or n:m, per-layer
``profile`` uniform / owl / explicit, module ``targets``) but ``prune/nmg``
(n, m, g); the mask math (``masks``, ``profiles``, ``schedule``) and
SparseGPT's reconstruction (``sparsegpt_prune``) are pure functions on
tensors. ``prune/gmp`` trains with the shared loop while its schedule prunes;
``prune/maskllm`` learns n:m masks (Gumbel-softmax over each group's
patterns, ``maskllm``'s pure functions) with the shared loop, weights frozen.
``prune/width`` (``width``) does not mask: it cuts whole neurons and heads out
of the Linear modules and the config (Minitron's activation importance).
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .gmp import GMP, GMPSchedule
from .magnitude import Magnitude
from .maskllm import MaskLLM, MaskLearner, hard_nm_mask, nm_patterns, prior_bonus, soft_nm_mask
from .masks import (global_magnitude_masks, global_threshold, magnitude_mask, magnitude_ranks, nm_mask, nm_overflow,
                    parse_pattern, row_mask, row_quotas, wanda_scores)
from .nmg import NMGPrune, nmg_keep_mask
from .profiles import layer_sparsities, outlier_ratio, owl_sparsities
from .pruner import ScopedPruneParams, ScorePruner, score_masks
from .schedule import cubic_sparsity, is_pruning_step, nm_keep, pruning_progress, pruning_window
from .selection import PruneParams, Target
from .sparsegpt import SparseGPT, damped_factor, hessian_factor, reconstruction_error, sparsegpt_prune
from .wanda import Wanda
from .width import Width, WidthParams, head_counts, head_output_norms, select_heads, token_means, top_units

__all__ = ["ScorePruner", "ScopedPruneParams", "Target", "score_masks", "Magnitude", "Wanda", "SparseGPT", "GMP",
           "GMPSchedule", "NMGPrune", "nmg_keep_mask", "PruneParams", "cubic_sparsity", "is_pruning_step", "nm_keep",
           "pruning_progress", "pruning_window", "global_magnitude_masks", "global_threshold", "magnitude_mask",
           "magnitude_ranks", "nm_mask", "nm_overflow", "parse_pattern", "row_mask", "row_quotas", "wanda_scores",
           "layer_sparsities", "outlier_ratio", "owl_sparsities", "damped_factor", "hessian_factor",
           "reconstruction_error", "sparsegpt_prune", "MaskLLM", "MaskLearner", "nm_patterns", "soft_nm_mask",
           "hard_nm_mask", "prior_bonus", "Width", "WidthParams", "head_counts", "head_output_norms",
           "select_heads", "token_means", "top_units"]


@hookimpl
def sparsify_methods():
    """Weight-pruning methods."""
    return [Magnitude, Wanda, SparseGPT, NMGPrune, GMP, MaskLLM, Width]
