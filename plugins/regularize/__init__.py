"""Regularisation stages trained with the shared loop: ``regularize/progressive_l1`` (ProSparse),
and ``regularize/blockwise_l1`` (FFN-local variant)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .blockwise import BlockwiseL1
from .l1 import ProgressiveL1


@hookimpl
def sparsify_methods():
    return [ProgressiveL1, BlockwiseL1]
