"""Sparse-weight matmul on the CPU through one packed kernel format ("panel CSR").

``pack(weight)`` turns any sparse ``[out, in]`` weight (from any layout's
``to_dense``, or its CSR) into the kernel's format: per panel of 128 inputs,
rows of (uint8 offset, fp32 value). ``matmul(packed, x)`` computes
``x @ W.T + b`` with the compiled kernel (``csrc/spmm.cpp``) or returns
``None`` where it cannot; ``reference`` is the plain-torch definition.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from . import native

PANEL = 128
_P, _I = ctypes.c_void_p, ctypes.c_int64


@dataclass
class Packed:
    """A weight in panel-CSR: ``rowptr [panels, out+1]`` (int64), ``off`` (uint8), ``val`` (fp32)."""

    shape: tuple[int, int]
    rowptr: torch.Tensor
    off: torch.Tensor
    val: torch.Tensor

    def to_dense(self) -> torch.Tensor:
        """The dense weight back (for tests)."""
        out, n_in = self.shape
        w = torch.zeros(out, n_in, dtype=self.val.dtype)
        for p in range(self.rowptr.shape[0]):
            rp = self.rowptr[p]
            rows = torch.repeat_interleave(torch.arange(out), rp[1:] - rp[:-1])
            sl = slice(int(rp[0]), int(rp[-1]))
            w[rows, p * PANEL + self.off[sl].long()] = self.val[sl]
        return w


def pack(weight: torch.Tensor) -> Packed:
    """Panel-CSR of a dense (mostly zero) ``[out, in]`` weight; zeros are dropped."""
    w = weight.detach().to(torch.float32).cpu()
    out, n_in = w.shape
    n_panels = max(1, -(-n_in // PANEL))
    rowptrs, offs, vals, base = [], [], [], 0
    for p in range(n_panels):
        blk = w[:, p * PANEL:(p + 1) * PANEL]
        nz = blk != 0
        counts = nz.sum(1)
        rp = torch.zeros(out + 1, dtype=torch.int64)
        rp[1:] = counts.cumsum(0)
        rows, cols = nz.nonzero(as_tuple=True)
        rowptrs.append(rp + base)
        offs.append(cols.to(torch.uint8))
        vals.append(blk[rows, cols])
        base += int(rp[-1])
    offs.append(torch.zeros(16, dtype=torch.uint8))  # the kernel reads indices 16 at a time
    return Packed((out, n_in), torch.stack(rowptrs).contiguous(), torch.cat(offs).contiguous(),
                  torch.cat(vals).contiguous())


def reference(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` in plain torch."""
    return torch.nn.functional.linear(x, weight, bias)


def _lib():
    lib = native.library()
    if lib is not None and not hasattr(lib, "_spmm_typed"):
        lib.sp_pcsr_matmul_f32.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_int]
        lib.sp_pcsr_matmul_f32.restype = ctypes.c_int
        lib.sp_nm_matvec_f32.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, ctypes.c_int]
        lib.sp_nm_matvec_f32.restype = ctypes.c_int
        lib.sp_bsr_matmul_f32.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_int]
        lib.sp_bsr_matmul_f32.restype = ctypes.c_int
        lib.sp_bsr_matvec_f32.argtypes = lib.sp_bsr_matmul_f32.argtypes
        lib.sp_bsr_matvec_f32.restype = ctypes.c_int
        lib._spmm_typed = True
    return lib


def cpu_kernel_available() -> bool:
    """True when the compiled sparse-matmul kernel loads here."""
    return _lib() is not None


def matmul(packed: Packed, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T + b`` from the packed weight, or ``None`` where the CPU kernel cannot (device, dtype, grad)."""
    out, n_in = packed.shape
    if x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    lib = _lib()
    if lib is None:
        return None
    x2 = x.reshape(-1, n_in).contiguous()
    y = torch.empty(x2.shape[0], out, dtype=torch.float32)
    if x2.shape[0]:
        b = bias.contiguous() if bias is not None else None
        lib.sp_pcsr_matmul_f32(x2.data_ptr(), x2.shape[0], n_in, out, packed.rowptr.data_ptr(),
                               packed.off.data_ptr(), packed.val.data_ptr(), None if b is None else b.data_ptr(),
                               y.data_ptr(), native.threads())
    return y.reshape(*x.shape[:-1], out)


@dataclass
class PackedNM:
    """An n:m weight for the few-token kernel: groups of 16 non-zeros over windows of ``16 m / n`` inputs."""

    shape: tuple[int, int]
    window: int
    val: torch.Tensor  # [out, groups * 16]
    pos: torch.Tensor  # [out, groups * 16] uint8


def pack_nm(val: torch.Tensor, idx: torch.Tensor, n: int, m: int, shape) -> PackedNM | None:
    """From an n:m layout's ``(val, idx)``; ``None`` where the kernel does not apply (16 % n, or m / n > 16)."""
    if 16 % n or 16 * m // n > 256:
        return None
    out = shape[0]
    per_group = 16 // n  # blocks of m in a group of 16 non-zeros
    k = torch.arange(val.shape[1])
    pos = (k // n) % per_group * m + idx.long()
    groups = -(-val.shape[1] // 16)
    v = torch.zeros(out, groups * 16, dtype=torch.float32)
    p = torch.zeros(out, groups * 16, dtype=torch.uint8)
    v[:, : val.shape[1]] = val.float()
    p[:, : val.shape[1]] = pos.to(torch.uint8)
    return PackedNM((out, shape[1]), 16 * m // n, v.contiguous(), p.contiguous())


def nm_matmul(packed: PackedNM, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T + b`` for few tokens (< 16), float32, CPU, with the permute kernel (AVX-512 builds), else ``None``."""
    out, n_in = packed.shape
    if x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
        return None
    lib = _lib()
    if lib is None or not hasattr(lib, "sp_nm_matvec_f32"):
        return None
    x2 = x.reshape(-1, n_in)
    T = x2.shape[0]
    if not 1 <= T < 16:
        return None
    groups = packed.val.shape[1] // 16
    stride = groups * packed.window + 32
    xpad = torch.zeros(T, stride, dtype=torch.float32)
    xpad[:, :n_in] = x2
    y = torch.empty(T, out, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else None
    rc = lib.sp_nm_matvec_f32(xpad.data_ptr(), T, stride, out, groups, packed.window, packed.val.data_ptr(),
                              packed.pos.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                              native.threads())
    if rc != 0:
        return None
    return y.reshape(*x.shape[:-1], out)


def bsr_matmul(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape, x: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T + b`` from BSR storage (tiles ``[nnzb, br, bc]``), straight from the tiles.

    16+ tokens (``br`` a multiple of 4): four rows of a tile share every
    activation load. Fewer tokens: tile rows stream into one accumulator per
    row. ``None`` where the kernels do not apply (other dtype or device, the
    portable build: these kernels need AVX2+FMA or AVX-512).
    """
    out, n_in = shape
    br, bc = val.shape[1:]
    if x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
        return None
    x2 = x.reshape(-1, n_in).contiguous()
    T = x2.shape[0]
    many = T >= 16
    if T == 0 or (many and br % 4) or val.dtype != torch.float32:
        return None
    lib = _lib()
    if lib is None:
        return None
    y = torch.empty(T, out, dtype=torch.float32)
    crow = crow.to(torch.int64).contiguous()
    col = col.to(torch.int32).contiguous()
    val = val.contiguous()
    b = bias.contiguous() if bias is not None else None
    fn = lib.sp_bsr_matmul_f32 if many else lib.sp_bsr_matvec_f32
    rc = fn(x2.data_ptr(), T, n_in, out, br, bc, crow.data_ptr(), col.data_ptr(), val.data_ptr(),
            None if b is None else b.data_ptr(), y.data_ptr(), native.threads())
    return None if rc != 0 else y.reshape(*x.shape[:-1], out)
