"""Activation-sparsity methods: activation substitution (``substitute_activation/relu``)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .substitute import ReLU, SubstituteActivation

__all__ = ["ReLU", "SubstituteActivation"]


@hookimpl
def sparsify_methods():
    """Activation substitution methods."""
    return [ReLU]
