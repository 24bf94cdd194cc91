"""Weight layouts for Linear layers: CSR, BSR, n:m, n:m:g.

Each is a ``sparsify_core.Layout``: ``from_dense`` stores a weight exactly
(raising when the weight does not fit the format), ``to_dense`` gives it back
bit for bit, and ``matmul`` is the plain-torch reference computed from the
storage itself (never through ``to_dense``). The storage is a flat dict of
tensors (``tensors()`` / ``from_tensors``) so modules can hold it as buffers
and outputs save it with safetensors. Fast kernels live in
``sparsify_kernels`` and are tested against ``matmul``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from sparsify_core import Layout, Params

from . import formats as F


class StoredLayout(Layout):
    """A layout whose storage is a dict of named tensors plus the dense shape."""

    names: ClassVar[tuple[str, ...]]

    def __init__(self, shape: tuple[int, int], params: Params, **tensors: torch.Tensor):
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = params
        for k in self.names:
            setattr(self, k, tensors[k])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage tensors by name (what a module registers as buffers)."""
        return {k: getattr(self, k) for k in self.names}

    @classmethod
    def from_tensors(cls, shape, params: Params, tensors: dict[str, torch.Tensor]) -> "StoredLayout":
        """Rebuild from ``tensors()`` output (e.g. loaded from safetensors)."""
        return cls(shape, params, **{k: tensors[k] for k in cls.names})

    def nbytes(self) -> int:
        """Bytes of storage (values and indices)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def nnz(self) -> int:
        """Stored non-zeros (explicit zeros of a fixed-pattern format included)."""
        return int(getattr(self, "val").numel())


class CSR(StoredLayout):
    """Compressed sparse rows: any sparsity pattern, int32 column indices."""

    name = "csr"
    names = ("crow", "col", "val")

    @classmethod
    def from_dense(cls, weight, params=None):
        crow, col, val = F.csr_from_dense(weight.detach())
        return cls(weight.shape, params or Params(), crow=crow, col=col, val=val)

    def to_dense(self):
        return F.csr_to_dense(self.crow, self.col, self.val, self.shape)

    def matmul(self, x):
        return F.csr_matmul(self.crow, self.col, self.val, self.shape, x)


class BSRParams(Params):
    block: tuple[int, int] = Field((16, 16), description="tile shape (rows, columns) stored densely")

    @model_validator(mode="after")
    def _positive(self):
        if min(self.block) < 1:
            raise ValueError("block sizes must be positive")
        return self


class BSR(StoredLayout):
    """Block-sparse rows: dense tiles (default 16x16) wherever a tile has a non-zero."""

    name = "bsr"
    names = ("crow", "col", "val")
    Params = BSRParams

    @classmethod
    def from_dense(cls, weight, params=None):
        params = params or BSRParams()
        crow, col, val = F.bsr_from_dense(weight.detach(), params.block)
        return cls(weight.shape, params, crow=crow, col=col, val=val)

    def to_dense(self):
        return F.bsr_to_dense(self.crow, self.col, self.val, self.shape)

    def matmul(self, x):
        return F.bsr_matmul(self.crow, self.col, self.val, self.shape, x)


class NMParams(Params):
    n: int = Field(2, ge=1, description="non-zeros kept in every block")
    m: int = Field(4, ge=2, le=256, description="block length along the input dimension")

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


class NM(StoredLayout):
    """n-of-m: at most n non-zeros in every m consecutive inputs; values plus uint8 positions."""

    name = "nm"
    names = ("val", "idx")
    Params = NMParams

    @classmethod
    def from_dense(cls, weight, params=None):
        params = params or NMParams()
        val, idx = F.nm_from_dense(weight.detach(), params.n, params.m)
        return cls(weight.shape, params, val=val, idx=idx)

    def to_dense(self):
        return F.nm_to_dense(self.val, self.idx, self.params.n, self.params.m, self.shape)

    def matmul(self, x):
        return F.nm_matmul(self.val, self.idx, self.params.n, self.params.m, self.shape, x)


class NMGParams(NMParams):
    g: int = Field(4, ge=1, description="vectors per pattern in each chunk of C(m, n) * g rows")

    @model_validator(mode="after")
    def _small_chunks(self):
        if F.combinations(self.m, self.n) * self.g > 32767:
            raise ValueError("C(m, n) * g must fit int16 row indices (at most 32767)")
        return self


class NMG(StoredLayout):
    """Grouped n-of-m (STen): every chunk of C(m,n)*g rows uses each n-of-m pattern exactly g times."""

    name = "nmg"
    names = ("val", "row")
    Params = NMGParams

    @classmethod
    def from_dense(cls, weight, params=None):
        params = params or NMGParams()
        val, row = F.nmg_from_dense(weight.detach(), params.n, params.m, params.g, exact=True)
        return cls(weight.shape, params, val=val, row=row)

    def to_dense(self):
        p = self.params
        return F.nmg_to_dense(self.val, self.row, p.n, p.m, p.g, self.shape)

    def matmul(self, x):
        p = self.params
        return F.nmg_matmul(self.val, self.row, p.n, p.m, p.g, self.shape, x)


WEIGHT_LAYOUTS: tuple[type[StoredLayout], ...] = (CSR, BSR, NM, NMG)
