"""Weight layouts for Linear layers: CSR, BSR, n:m, n:m:g.

Each is a ``sparsify_core.Layout``: ``from_dense`` stores a weight exactly
(raising when the weight does not fit the format), ``to_dense`` gives it back
bit for bit, and ``matmul`` is the plain-torch reference computed from the
storage itself (never through ``to_dense``). The storage is a flat dict of
tensors (``tensors()`` / ``from_tensors``) so modules can hold it as buffers
and outputs save it with safetensors. ``kernel(device, dtype)`` hands out the
fast kernels of ``sparsify_kernels`` (float32 on the CPU: BSR tile kernels,
the n:m permute kernel for few tokens, panel CSR otherwise; CUDA: the Triton
n:m kernel for ``nm`` and ``nmg``), tested against ``matmul``.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from sparsify_core import Layout, Params
from sparsify_kernels import spmm

from . import formats as F


class StoredLayout(Layout):
    """A built-in weight layout (storage, params and kernels as in ``sparsify_core.Layout``)."""

    def nnz(self) -> int:
        """Stored non-zeros (explicit zeros of a fixed-pattern format included)."""
        return int(getattr(self, "val").numel())


def _cpu_ok(device, dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype == torch.float32 and spmm.cpu_kernel_available()


def _panel_kernel(dense, first=None, lazy: bool = False):
    """The panel-CSR CPU kernel over ``dense()`` (a function returning the dense weight); ``first(x, bias)`` is
    tried before it (``None``: declined). ``lazy``: the panel copy is packed on the first call ``first``
    declines, not before (a BSR weight whose tiles serve every call never holds it: 5 bytes per non-zero,
    more than the tiles' own 4 at 16 x 16); otherwise when the kernel is made (n:m's permute kernel declines
    one token and 16 or more, so nearly every model packs it anyway)."""
    if first is None:
        return spmm.panel_kernel(spmm.pack(dense()))
    panel = [] if lazy else [spmm.panel_kernel(spmm.pack(dense()))]

    def run(x, bias):
        y = first(x, bias)
        if y is not None:
            return y
        if not panel:
            panel.append(spmm.panel_kernel(spmm.pack(dense())))
        return panel[0](x, bias)
    run.first = first  # the kernel tried first (tests look at what it holds)
    return run


def _nm_kernel(layout, val, idx, device):
    """n:m kernels: the permute kernel for few tokens then panel CSR (CPU), or the Triton kernel (CUDA)."""
    p = layout.params
    if torch.device(device).type == "cuda":
        from sparsify_kernels import triton_kernels
        if not triton_kernels.available():
            return None
        val, idx = val.to(device), idx.to(device)
        return lambda x, bias: triton_kernels.nm_matmul(x, val, idx, p.n, p.m, layout.shape[1], bias)
    nm = spmm.pack_nm(val, idx, p.n, p.m, layout.shape)
    if nm is None or nm.window > spmm.NM_KERNEL_MAX_WINDOW:
        return _panel_kernel(layout.to_dense)
    permute, (lo, hi), n_in = spmm.nm_kernel(nm), spmm.NM_KERNEL_TOKENS, layout.shape[1]

    def few(x, bias):  # the token counts where the permute kernel is the faster one; else panel CSR
        return permute(x, bias) if lo <= x.numel() // n_in < hi else None
    return _panel_kernel(layout.to_dense, few)


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

    def kernel(self, device, dtype):
        """Panel CSR on the CPU (float32)."""
        return _panel_kernel(self.to_dense) if _cpu_ok(device, dtype) else None


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

    def kernel(self, device, dtype):
        """The BSR tile kernels straight from float32 tiles, else panel CSR (CPU, float32).

        Where the loaded kernels want tiles column-major (``spmm.bsr_tiles_by_columns``: AVX-512, tiles of a
        multiple of 16 rows), ``val`` is
        re-laid in place first (``spmm.tiles_by_columns``): same shape and values, each tile's columns
        contiguous in memory, so the module holding it keeps one copy; files still get row-major tiles."""
        if not _cpu_ok(device, dtype):
            return None
        tiles = None
        if self.val.dtype == torch.float32:
            if spmm.bsr_tiles_by_columns(self.val.shape[1]):
                spmm.tiles_by_columns(self.val)
            tiles = spmm.bsr_kernel(self.crow, self.col, self.val, self.shape)
        return _panel_kernel(self.to_dense, tiles, lazy=tiles is not None)


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

    def kernel(self, device, dtype):
        """CPU (float32): the permute kernel for fewer than 16 tokens, else panel CSR; CUDA: Triton."""
        if not (_cpu_ok(device, dtype) or torch.device(device).type == "cuda"):
            return None
        return _nm_kernel(self, self.val, self.idx, device)


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

    def kernel(self, device, dtype):
        """The n:m kernels (an n:m:g weight is n:m too)."""
        if not (_cpu_ok(device, dtype) or torch.device(device).type == "cuda"):
            return None
        val, idx = F.nm_from_dense(self.to_dense(), self.params.n, self.params.m)
        return _nm_kernel(self, val, idx, device)


WEIGHT_LAYOUTS: tuple[type[StoredLayout], ...] = (CSR, BSR, NM, NMG)
