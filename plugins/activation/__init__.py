"""Activation-sparsity methods: ``substitute_activation`` relu, fatrelu (ProSparse), drelu (Turbo Sparse),
cats (baseline) and teal (training-free, every projection's input)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .substitute import DReLU, ReLU, SubstituteActivation
from .teal import TEAL
from .threshold import CATS, FATReLU

__all__ = ["CATS", "DReLU", "FATReLU", "ReLU", "SubstituteActivation", "TEAL"]


@hookimpl
def sparsify_methods():
    """Activation substitution methods."""
    return [ReLU, FATReLU, CATS, DReLU, TEAL]
