"""Sparse layouts and the ``layout_convert`` stage methods.

Weight layouts (``csr``, ``bsr``, ``nm``, ``nmg``) store a Linear's weight;
the activation-sparse and mixture-of-experts FFN modules compute only the
active neurons of an FFN block. Formats are pure functions (``formats``),
layouts wrap them (``weight``), modules hold layouts and call the fast kernels
of ``sparsify_kernels`` (``modules``).
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .weight import BSR, CSR, NM, NMG, WEIGHT_LAYOUTS, StoredLayout

__all__ = ["BSR", "CSR", "NM", "NMG", "StoredLayout", "WEIGHT_LAYOUTS"]


@hookimpl
def sparsify_layouts():
    """Weight layouts: CSR, BSR, n:m, n:m:g."""
    return list(WEIGHT_LAYOUTS)
