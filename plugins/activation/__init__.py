"""Activation-sparsity methods: ``substitute_activation`` relu, fatrelu (ProSparse) and cats (baseline)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .substitute import ReLU, SubstituteActivation
from .threshold import CATS, FATReLU

__all__ = ["CATS", "FATReLU", "ReLU", "SubstituteActivation"]


@hookimpl
def sparsify_methods():
    """Activation substitution methods."""
    return [ReLU, FATReLU, CATS]
