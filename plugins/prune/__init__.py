"""Weight-pruning methods: unstructured magnitude pruning (``prune/magnitude``)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .magnitude import Magnitude
from .masks import global_magnitude_masks, global_threshold, magnitude_mask

__all__ = ["Magnitude", "global_magnitude_masks", "global_threshold", "magnitude_mask"]


@hookimpl
def sparsify_methods():
    """Weight-pruning methods."""
    return [Magnitude]
