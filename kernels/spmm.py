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
        # the column-major BSR kernels (libraries built from older sources, in kernel A/Bs, lack them), asked
        # once here rather than on every call
        lib._bsr_columns = hasattr(lib, "sp_bsrt_matmul_f32") and bool(lib.sp_bsr_tile_columns())
        if lib._bsr_columns:
            for name in ("sp_bsrt_matmul_f32", "sp_bsrt_matvec_f32"):
                getattr(lib, name).argtypes = lib.sp_bsr_matmul_f32.argtypes
                getattr(lib, name).restype = ctypes.c_int
        lib._spmm_typed = True
    return lib


def cpu_kernel_available() -> bool:
    """True when the compiled sparse-matmul kernel loads here."""
    return _lib() is not None


def _takes(x: torch.Tensor, n_in: int) -> bool:
    """``x`` is what the CPU kernels compute: float32 on the CPU, ``n_in`` features, no autograd graph to keep."""
    return (x.dtype == torch.float32 and x.is_cpu and x.shape[-1] == n_in
            and not (x.requires_grad and torch.is_grad_enabled()))


def _bias_ptr(bias: torch.Tensor | None, out: int):
    """The bias' address (``None`` for no bias), or ``False`` where the kernels cannot take it."""
    if bias is None:
        return None
    if bias.dtype != torch.float32 or not bias.is_cpu or bias.shape != (out,) or not bias.is_contiguous():
        return False
    return bias.data_ptr()


def panel_kernel(packed: Packed):
    """``run(x, bias)``: ``matmul`` over ``packed`` with the per-call Python work cut to a few checks.

    Kernels are called once per token per layer when decoding, where Python
    around a ~0.1 ms call is a visible share of it (measured on a 2-core Xeon:
    ~50-100 us per call before, most of it right after the kernel streamed
    the weight through the caches)."""
    out, n_in = packed.shape
    rowptr, off, val = packed.rowptr, packed.off, packed.val
    ptrs = (rowptr.data_ptr(), off.data_ptr(), val.data_ptr())

    def run(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        b = _bias_ptr(bias, out)
        if b is False or not _takes(x, n_in):
            return None
        lib = _lib()
        if lib is None:
            return None
        x2 = x if x.is_contiguous() else x.contiguous()
        T = x2.numel() // n_in
        y = torch.empty(T, out, dtype=torch.float32)  # ints, not a torch.Size: half the cost
        if T:
            lib.sp_pcsr_matmul_f32(x2.data_ptr(), T, n_in, out, *ptrs, b, y.data_ptr(), native.threads())
        return y if x.dim() == 2 else y.view(x.shape[:-1] + (out,))
    run.storage = (rowptr, off, val)  # the addresses above stay valid while run lives
    return run


def matmul(packed: Packed, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T + b`` from the packed weight, or ``None`` where the CPU kernel cannot (device, dtype, grad).

    ``x`` is ``[..., in]``, the result ``[..., out]``; a bias must be float32
    ``[out]`` (else ``None``). Repeated calls: ``panel_kernel``."""
    return panel_kernel(packed)(x, None if bias is None else bias.contiguous())


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


#: Where the n:m permute kernel pays over panel CSR (the layouts' dispatch, ``plugins/layouts/weight.py``):
#: 2 to 15 tokens and windows of at most 64 inputs (m / n <= 4). Measured on a 2-core Xeon (AVX-512),
#: 768 <-> 3072, 40 interleaved rounds: one token, panel CSR 1.02-2.70x dense torch against the permute
#: kernel's 0.87-1.70x (2:4, 1:4, 1:10); 4-15 tokens at 2:4 and 1:4 the permute kernel 0.95-1.70x against
#: 0.54-1.30x; 1:10 (windows of 160) panel CSR ahead at every token count.
NM_KERNEL_TOKENS = (2, 16)
NM_KERNEL_MAX_WINDOW = 64


def nm_kernel(packed: PackedNM):
    """``run(x, bias)``: ``nm_matmul`` over ``packed`` with the per-call Python work cut to a few checks."""
    out, n_in = packed.shape
    groups = packed.val.shape[1] // 16
    stride = groups * packed.window + 32
    val, pos = packed.val, packed.pos
    ptrs = (val.data_ptr(), pos.data_ptr())

    def run(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        b = _bias_ptr(bias, out)
        if b is False or not _takes(x, n_in):
            return None
        T = x.numel() // n_in
        if not 1 <= T < 16:
            return None
        lib = _lib()
        if lib is None or not hasattr(lib, "sp_nm_matvec_f32"):
            return None
        xpad = torch.zeros(T, stride, dtype=torch.float32)
        xpad[:, :n_in] = x.reshape(T, n_in)
        y = torch.empty(T, out, dtype=torch.float32)
        rc = lib.sp_nm_matvec_f32(xpad.data_ptr(), T, stride, out, groups, packed.window, *ptrs, b, y.data_ptr(),
                                  native.threads())
        return None if rc != 0 else y if x.dim() == 2 else y.view(x.shape[:-1] + (out,))
    run.storage = (val, pos)  # the addresses above stay valid while run lives
    return run


def nm_matmul(packed: PackedNM, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T + b`` for few tokens (< 16), float32, CPU, with the permute kernel (AVX-512 builds), else ``None``.
    Repeated calls: ``nm_kernel``."""
    return nm_kernel(packed)(x, None if bias is None else bias.contiguous())


#: From this many tokens on, BSR takes the many-token kernel (activations packed in 64-token tiles, a partial
#: tile only to its tokens rounded up to 16) instead of streaming the tiles once per token. Measured on a
#: 2-core Xeon (768 <-> 3072, 16 x 16 tiles, 50 / 90%): at 8 tokens it is ahead on AVX2 in every case (up to
#: 2x: 0.73 -> 1.47x dense torch at 768->3072, 50%) and on AVX-512 in all but 3072->768 at 90% (5.7 -> 4.5x);
#: at 4 tokens the per-token kernel still wins most cases on both.
BSR_MANY_TOKENS = 8


def bsr_tiles_by_columns(br: int) -> bool:
    """True where the loaded kernels want BSR tiles of ``br`` rows column-major in memory: the AVX-512 and
    AVX2 builds, tiles of 16 rows (the default 16 x 16).

    There a tile's column is one vector (two on AVX2): the many-token kernel
    keeps outputs along the vector lanes and stores them straight into ``Y``
    (no transposing write back), the few-token one loads each weight vector
    once for all tokens. Measured on the Xeon against row-major tiles, 768 <->
    3072 (details in ``kernels/csrc/spmm.cpp``): 4 tokens 1.6-3.7x ->
    2.7-11x dense, 1 token +5-70%, 1024 tokens at 90% +5-25%, at 50% within
    a few percent either way. Shorter tiles leave lanes empty (8 x 8 with 1024
    tokens: 0.77x dense by columns, 1.31x by rows); 32-row tiles by columns
    lost at one token (1.57x -> 1.36x, AVX-512), so both stay row-major (the
    column kernels compute any height right all the same). ``is_by_columns``
    tells a tensor's order; ``tiles_by_columns`` re-lays one in place."""
    lib = _lib()
    return br == 16 and lib is not None and lib._bsr_columns


def is_by_columns(val: torch.Tensor) -> bool:
    """``val [nnzb, br, bc]`` holds each tile column-major (strides ``(br*bc, 1, br)``), not row-major."""
    return val.dim() == 3 and not val.is_contiguous() and val.transpose(1, 2).is_contiguous()


def tiles_by_columns(val: torch.Tensor) -> bool:
    """Re-lay ``val [nnzb, br, bc]`` in place so that each tile is stored column-major.

    The tensor keeps its shape, dtype and values (every reader sees the same
    tiles; safetensors writers take ``.contiguous()``, row-major as before);
    only its memory changes, so modules holding it as a buffer hold the new
    order with no second copy. Returns whether ``val`` is column-major now
    (``False``: empty, or a tensor that cannot be changed in place, e.g. an
    inference-mode tensor outside inference mode; it stays row-major)."""
    if is_by_columns(val):
        return True
    if val.dim() != 3 or val.numel() == 0 or val.shape[1] == 1 or val.shape[2] == 1:
        return False  # one row or one column per tile: both orders are the same memory
    if val.is_inference() and not torch.is_inference_mode_enabled():
        return False  # torch refuses in-place changes there (after changing the strides: ask first)
    br, bc = val.shape[1:]
    by_cols = val.detach().transpose(1, 2).contiguous()
    with torch.no_grad():
        val.set_(by_cols.untyped_storage(), 0, val.shape, (br * bc, 1, br))
    return True


def bsr_kernel(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape):
    """``run(x, bias)``: ``bsr_matmul`` over these tiles with the per-weight work (index dtypes, addresses)
    done once; ``None`` when the tiles are not float32. Tiles stored column-major (``is_by_columns``) run the
    column-major kernels where the loaded library has them (AVX-512, AVX2), else (the portable build, a
    library from older sources) a row-major copy made on the first call that needs it."""
    out, n_in = shape
    br, bc = val.shape[1:]
    if val.dtype != torch.float32:
        return None
    crow = crow.to(torch.int64).contiguous()
    col = col.to(torch.int32).contiguous()
    by_cols = is_by_columns(val)
    tiles = val.transpose(1, 2) if by_cols else val.contiguous()  # by columns: [nnzb, bc, br], no copy
    rows_copy: list = []  # column-major tiles on a library without the column kernels: row-major, once

    def run(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        b = _bias_ptr(bias, out)
        if b is False or not _takes(x, n_in):
            return None
        T = x.numel() // n_in
        lib = _lib()
        if T == 0 or lib is None:
            return None
        cols = by_cols and lib._bsr_columns
        many = T >= BSR_MANY_TOKENS and (cols or br % 4 == 0)
        if T >= 16 and not cols and br % 4:
            return None
        if cols:
            fn, ptr = (lib.sp_bsrt_matmul_f32 if many else lib.sp_bsrt_matvec_f32), tiles.data_ptr()
        else:
            if by_cols and not rows_copy:
                rows_copy.append(val.contiguous())
            fn = lib.sp_bsr_matmul_f32 if many else lib.sp_bsr_matvec_f32
            ptr = (rows_copy[0] if by_cols else tiles).data_ptr()
        x2 = x if x.is_contiguous() else x.contiguous()
        y = torch.empty(T, out, dtype=torch.float32)
        if fn(x2.data_ptr(), T, n_in, out, br, bc, crow.data_ptr(), col.data_ptr(), ptr, b, y.data_ptr(),
              native.threads()) != 0:
            return None
        return y if x.dim() == 2 else y.view(x.shape[:-1] + (out,))
    run.storage = (crow, col, tiles, rows_copy)  # the addresses above stay valid while run lives
    return run


def bsr_matmul(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape, x: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T + b`` from BSR storage (tiles ``[nnzb, br, bc]``), straight from the tiles.

    ``BSR_MANY_TOKENS`` (8) tokens or more (``br`` a multiple of 4, or any
    ``br`` with column-major tiles): the tokens packed in tiles of 64, each
    activation or weight load shared by several multiply-adds. Fewer tokens (or another
    ``br`` below 16 tokens): the tiles streamed once per token (row-major) or
    once per 8 tokens (column-major). ``val`` either order (``is_by_columns``).
    ``None`` where the kernels do not apply (other dtype or device, the
    portable build: these kernels need AVX2+FMA or AVX-512). Repeated calls:
    ``bsr_kernel``.
    """
    run = bsr_kernel(crow, col, val, shape)
    return None if run is None else run(x, None if bias is None else bias.contiguous())
