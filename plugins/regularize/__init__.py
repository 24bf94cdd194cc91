"""Regularisation stages trained with the shared loop: ``regularize/progressive_l1`` (ProSparse)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .l1 import ProgressiveL1


@hookimpl
def sparsify_methods():
    return [ProgressiveL1]
