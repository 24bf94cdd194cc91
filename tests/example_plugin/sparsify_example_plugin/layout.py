"""``example_coo``: a sparse weight layout of the plugin's own, in plain torch.

Coordinate list: the ``(row, col, value)`` of every non-zero. Any sparsity
pattern fits, so ``from_dense`` never refuses a weight. ``matmul`` is the
reference (a gather and an ``index_add_``); ``kernel`` hands out
``torch.sparse.mm`` on the CPU for float32 and float64, and nothing elsewhere
(modules then fall back to dense compute, or refuse in strict mode).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sparsify_core import Layout, Params


class COOParams(Params):
    index_dtype: Literal["int32", "int64"] = Field("int64", description="dtype of the row and column indices")


class COO(Layout):
    """Coordinate list: (row, col, value) of every non-zero (the example plugin's layout)."""

    name = "example_coo"
    names = ("row", "col", "val")
    Params = COOParams

    @classmethod
    def from_dense(cls, weight, params=None):
        """Store every non-zero of ``weight`` ``[out, in]``.

        ``row`` and ``col`` are ``[nnz]`` of ``params.index_dtype``; ``val`` is ``[nnz]`` in the weight's dtype."""
        params = params or COOParams()
        weight = weight.detach()
        row, col = weight.nonzero(as_tuple=True)
        it = getattr(torch, params.index_dtype)
        return cls(weight.shape, params, row=row.to(it), col=col.to(it), val=weight[row, col].clone())

    def to_dense(self):
        w = torch.zeros(self.shape, dtype=self.val.dtype, device=self.val.device)
        w[self.row.long(), self.col.long()] = self.val
        return w

    def matmul(self, x):
        """Reference: gather the inputs of every non-zero, scale, add into its row."""
        prod = x[..., self.col.long()] * self.val.to(x.dtype)
        y = torch.zeros(*x.shape[:-1], self.shape[0], dtype=x.dtype, device=x.device)
        return y.index_add_(-1, self.row.long(), prod)

    def kernel(self, device, dtype):
        """torch.sparse.mm on the CPU (float32 and float64); none elsewhere."""
        if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.float64):
            return None
        # packed once per (device, dtype): the caller caches the kernel until the storage changes
        w = torch.sparse_coo_tensor(torch.stack([self.row.long(), self.col.long()]), self.val.to(dtype),
                                    self.shape, check_invariants=True).coalesce()
        out, n_in = self.shape

        def run(x, bias):
            y = torch.sparse.mm(w, x.reshape(-1, n_in).T).T.reshape(*x.shape[:-1], out)
            return y + bias.to(dtype) if bias is not None else y
        return run
