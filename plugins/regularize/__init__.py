"""Regularisation stages trained with the shared loop: ``regularize/progressive_l1`` (ProSparse),
``regularize/blockwise_l1`` (FFN-local variant) and ``regularize/lte`` (LTE's two-stage training of
routers and model, on FFNs a ``moeify`` stage split into experts; ``docs/methods.md#lte``)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .blockwise import BlockwiseL1
from .l1 import ProgressiveL1
from .lte import LTE

__all__ = ["LTE", "BlockwiseL1", "ProgressiveL1"]


@hookimpl
def sparsify_methods():
    """``regularize/progressive_l1``, ``regularize/blockwise_l1`` and ``regularize/lte``."""
    return [ProgressiveL1, BlockwiseL1, LTE]
