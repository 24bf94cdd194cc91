"""Sparse storage layouts: *how* non-zeros are stored and computed.

Kept apart from *which* entries are zero (masks, sparsifiers, routers). A
layout converts a dense weight to its storage, back to dense exactly, and
multiplies with it; its ``matmul`` in plain torch is the reference that fast
kernels (``sparsify_kernels``) are tested against.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .method import Params


class Layout(ABC):
    """A sparse weight layout for ``y = x @ W.T``."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    @classmethod
    @abstractmethod
    def from_dense(cls, weight: torch.Tensor, params: Params) -> "Layout":
        """Convert a dense ``[out, in]`` weight (its zeros define the sparsity)."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The exact dense weight back."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``[..., in]``."""

    @classmethod
    def describe(cls) -> str:
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]
